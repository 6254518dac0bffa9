"""The riffusion-app inference server over a real socket: the app's exact request, data URLs that
decode to a JPEG spectrogram and MP3 audio, 400s for bad bodies, a 500 with JSON and CORS when
inference fails, the step cap, dropping work whose client left, a bounded queue (503), a listen
backlog that holds a burst, socket timeouts for stalled clients, and SIGINT/SIGTERM stopping it."""

import base64
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import soundfile
from PIL import Image

from riffusion import seed_images
from riffusion.model_options import ModelOptions
from riffusion.pipeline import RiffusionPipeline
from riffusion.ports import free_port
from riffusion.server import close, make_server

APP_REQUEST = {  # as riffusion-app sends it: integers where floats are meant
    "alpha": 0.25, "num_inference_steps": 2, "seed_image_id": "og_beat", "mask_image_id": None,
    "start": {"prompt": "church bells", "seed": 42, "denoising": 0.75, "guidance": 7},
    "end": {"prompt": "jazz", "seed": 123, "denoising": 0.75, "guidance": 7},
}


@pytest.fixture(scope="module")
def pipeline(paddle_library):
    return RiffusionPipeline.from_pretrained(paddle_library)


class Spy:
    """A pipeline that records the step counts it was asked for and the steps it reached; each step
    waits `delay_s`, so a test can act while inference runs on any machine."""

    def __init__(self, pipeline, delay_s: float = 0.0):
        self.pipeline, self.delay_s = pipeline, delay_s
        self.asked, self.reached = [], []

    def interpolate(self, start, end, alpha, init_image, mask, steps, on_step=None):
        self.asked.append(steps)

        def step(done, total):
            self.reached.append((done, total))
            time.sleep(self.delay_s)
            on_step(done, total)

        return self.pipeline.interpolate(start, end, alpha, init_image, mask, steps, on_step=step)


def serve(pipeline, seed_folder, **options):
    server = make_server(pipeline, "127.0.0.1", 0, seed_folder, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(server):
    server.shutdown()
    close(server)


@pytest.fixture(scope="module")
def url(paddle_library, exported):
    """The server with the real seed image library (512x512: a full 5.12 s clip), on the static
    programs (the dynamic tiny VAE takes minutes at this size on a busy CPU)."""
    server = serve(RiffusionPipeline.from_pretrained(paddle_library, exported=exported[0], runtime="static"),
                   seed_images.FOLDER)
    yield f"http://127.0.0.1:{server.server_port}"
    stop(server)


@pytest.fixture(scope="module")
def narrow_folder(narrow_seed_folder):
    return narrow_seed_folder


@pytest.fixture(scope="module")
def narrow_url(pipeline, narrow_folder):
    server = serve(pipeline, narrow_folder)
    yield f"http://127.0.0.1:{server.server_port}"
    stop(server)


def data_url(value: str, mime: str) -> bytes:
    prefix = f"data:{mime};base64,"
    assert value.startswith(prefix)
    return base64.b64decode(value[len(prefix):])


def post(url, body, timeout=600):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{url}/run_inference/", data=data, headers={"Content-Type": "application/json"},
                         timeout=timeout)


def changed(**top):
    request = json.loads(json.dumps(APP_REQUEST))
    for key, value in top.items():
        part, _, field = key.partition("__")
        if value is KeyError:
            del request[key]
        elif field:
            request[part][field] = value
        else:
            request[key] = value
    return request


def test_app_request_gives_a_spectrogram_and_its_audio(url):
    response = post(url, APP_REQUEST)
    assert response.status_code == 200, response.text
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    body = response.json()
    image = Image.open(io.BytesIO(data_url(body["image"], "image/jpeg")))
    assert image.format == "JPEG" and image.size == (512, 512)
    audio, sample_rate = soundfile.read(io.BytesIO(data_url(body["audio"], "audio/mpeg")))
    assert sample_rate == 44100
    assert abs(len(audio) / sample_rate - 5.11) < 0.06  # MP3 frames pad the end a little
    assert abs(body["duration_s"] - 5.11) < 0.01
    assert body["num_inference_steps"] == 2


def test_a_mask_and_the_apps_empty_mask_id(narrow_url):
    masked = post(narrow_url, changed(mask_image_id="mask_top_third_75"))
    assert masked.status_code == 200
    assert abs(masked.json()["duration_s"] - 0.31) < 0.02
    # ?maskImageId=none makes the app send "": no mask, as null
    unmasked = [post(narrow_url, changed(mask_image_id=mask)) for mask in (None, "")]
    assert [r.status_code for r in unmasked] == [200, 200]
    assert unmasked[0].json()["image"] == unmasked[1].json()["image"] != masked.json()["image"]


def test_negative_seeds_draw_the_noise_of_their_reduction(narrow_url):
    """Paddle's generator raises on a negative seed (the connection used to drop); -1 is 2**32 - 1."""
    images = [post(narrow_url, changed(start__seed=seed, end__seed=seed)) for seed in (-1, 2**32 - 1)]
    assert [r.status_code for r in images] == [200, 200]
    assert images[0].json()["image"] == images[1].json()["image"]


def test_guidance_at_or_below_1_is_no_guidance_as_in_the_hobby(narrow_url):
    """riffusion-hobby (and diffusers) skip classifier-free guidance at guidance <= 1: -3 and 0.5, which
    the app sends from ?guidance=, draw what 1 draws; 7 differs."""
    images = [post(narrow_url, changed(start__guidance=value, end__guidance=value)).json()["image"]
              for value in (1, 0.5, -3, 7)]
    assert images[0] == images[1] == images[2] != images[3]


@pytest.mark.parametrize("body, message", [
    (b"{not json", "body is not JSON"),
    (b'{"alpha": NaN, "start": {"prompt": "x", "seed": 1}, "end": {"prompt": "x", "seed": 1}}', "body holds NaN"),
    (b'{"alpha": 0.5, "start": {"prompt": "x", "seed": 1, "guidance": Infinity}}', "body holds Infinity"),
    (changed(seed_image_id="../../etc/passwd"), "unknown seed_image_id '../../etc/passwd'"),
    (changed(alpha=1.5), "alpha must be in [0, 1]"),
    (changed(end__seed=True), "end.seed must be an integer"),
])
def test_bad_bodies_get_400_with_a_message_and_cors(url, body, message):
    response = post(url, body, timeout=30)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_cors_preflight_unknown_path_and_empty_body(url):
    preflight = requests.options(f"{url}/run_inference/", timeout=10)
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert requests.post(f"{url}/other/", json=APP_REQUEST, timeout=10).status_code == 404
    assert requests.post(f"{url}/run_inference/", data=b"", timeout=10).status_code == 400
    status = requests.get(url, timeout=10).json()
    assert status["seed_images"] == ["agile", "marim", "motorway", "og_beat", "vibes"] and status["max_steps"] == 100


def test_concurrent_requests_do_not_corrupt_each_other(narrow_url):
    requests_ = [changed(alpha=alpha) for alpha in (0.0, 0.5, 1.0)]

    def run(request):
        response = post(narrow_url, request, timeout=300)
        assert response.status_code == 200
        return response.json()["image"]

    sequential = [run(request) for request in requests_]
    with ThreadPoolExecutor(max_workers=3) as pool:
        concurrent = list(pool.map(run, requests_))
    assert concurrent == sequential
    assert len(set(sequential)) == 3


def test_an_inference_error_answers_500_with_json_and_cors(pipeline, narrow_folder, tmp_path):
    """An unreadable seed image raises inside inference: the client gets a JSON 500 with CORS (it
    used to get a closed socket, "other side closed" in the app), and the server goes on serving."""
    (tmp_path / "og_beat.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "agile.png").write_bytes((narrow_folder / "agile.png").read_bytes())
    server = serve(pipeline, tmp_path)
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        failed = post(url, APP_REQUEST)
        assert failed.status_code == 500
        assert failed.headers["Access-Control-Allow-Origin"] == "*"
        assert failed.json()["error"].startswith("inference failed: seed image 'og_beat' is unreadable")
        assert post(url, changed(seed_image_id="agile")).status_code == 200
    finally:
        stop(server)


def test_max_steps_caps_what_runs_and_the_reply_says_so(pipeline, narrow_folder):
    spy = Spy(pipeline)
    server = serve(spy, narrow_folder, max_steps=3)
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        capped, asked = post(url, changed(num_inference_steps=50)), post(url, changed(num_inference_steps=2))
        assert [capped.json()["num_inference_steps"], asked.json()["num_inference_steps"]] == [3, 2]
        assert spy.asked == [3, 2]
    finally:
        stop(server)


def test_work_whose_client_left_stops_at_the_next_step(pipeline, narrow_folder):
    """The app aborts a request after 60 s; the model must not go on working for nobody."""
    spy = Spy(pipeline, delay_s=0.2)
    server = serve(spy, narrow_folder, max_steps=200)
    try:
        body = json.dumps(changed(num_inference_steps=200, start__denoising=1.0, end__denoising=1.0)).encode()
        client = socket.create_connection(("127.0.0.1", server.server_port))
        client.sendall(b"POST /run_inference/ HTTP/1.0\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 60
        while len(spy.reached) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        client.close()
        left = len(spy.reached)
        deadline, seen = time.monotonic() + 30, -1
        while len(spy.reached) != seen and time.monotonic() < deadline:  # until no step for 1 s
            seen = len(spy.reached)
            time.sleep(1.0)
        total = spy.reached[-1][1]
        assert total == 200 and 3 <= left and len(spy.reached) <= left + 10, (left, spy.reached[-1])
        started = time.monotonic()  # the model is free for the next client at once
        assert post(f"http://127.0.0.1:{server.server_port}", APP_REQUEST).status_code == 200
        assert time.monotonic() - started < 30
    finally:
        stop(server)


def test_a_full_queue_answers_503_with_retry_after(pipeline, narrow_folder):
    spy = Spy(pipeline, delay_s=0.3)
    server = serve(spy, narrow_folder, max_pending=1)
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            running = pool.submit(post, url, changed(num_inference_steps=20))  # 20 steps of at least 0.3 s
            deadline = time.monotonic() + 60
            while not spy.reached and time.monotonic() < deadline:
                time.sleep(0.05)
            waiting = pool.submit(post, url, APP_REQUEST)
            while server.worker.pending < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            refused = post(url, APP_REQUEST, timeout=30)
            assert [running.result().status_code, waiting.result().status_code] == [200, 200]
        assert refused.status_code == 503
        assert refused.headers["Access-Control-Allow-Origin"] == "*"
        assert int(refused.headers["Retry-After"]) >= 1
        assert "the queue for the model is full (1 waiting)" in refused.json()["error"]
    finally:
        stop(server)


def test_a_burst_of_40_connections_is_held_in_the_backlog(pipeline, narrow_folder):
    """socketserver's backlog of 5 let a burst of 20 lose connections; 40 arriving while the server
    is not accepting all complete their handshake, then all get answers."""
    server = make_server(pipeline, "127.0.0.1", 0, narrow_folder)
    clients = []
    try:
        for _ in range(40):
            client = socket.socket()
            client.settimeout(0.5)
            client.connect(("127.0.0.1", server.server_port))  # times out once the backlog is full
            clients.append(client)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        for client in clients:
            client.settimeout(30)
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answers = [client.makefile("rb").readline() for client in clients]
        assert answers == [b"HTTP/1.0 200 OK\r\n"] * 40
        with ThreadPoolExecutor(max_workers=40) as pool:
            statuses = list(pool.map(lambda _: requests.get(f"http://127.0.0.1:{server.server_port}/", timeout=30).status_code,
                                     range(40)))
        assert statuses == [200] * 40
    finally:
        for client in clients:
            client.close()
        stop(server)


def test_a_stalled_client_loses_its_connection(pipeline, narrow_folder):
    server = serve(pipeline, narrow_folder, socket_timeout_s=1.0)
    try:
        silent = socket.create_connection(("127.0.0.1", server.server_port))
        partial = socket.create_connection(("127.0.0.1", server.server_port))
        partial.sendall(b"POST /run_inference/ HTTP/1.0\r\nContent-Length: 500\r\n\r\n{\"alpha\"")
        started = time.monotonic()
        for client in (silent, partial):
            assert select.select([client], [], [], 10)[0], "the server kept a stalled connection open"
        reply = b""
        while chunk := partial.recv(65536):  # headers and body may arrive in separate segments
            reply += chunk
        assert reply.startswith(b"HTTP/1.0 408") and b"no body within 1 s" in reply
        assert silent.recv(1) == b""  # closed
        assert time.monotonic() - started < 5
    finally:
        silent.close()
        partial.close()
        stop(server)


def test_server_refuses_a_seed_folder_without_images(paddle_library, tmp_path, capsys):
    from riffusion.server import main

    assert main(["--checkpoint", str(paddle_library), "--seed-images", str(tmp_path)]) == 1
    assert f"{tmp_path}: no seed images (*.png) there" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_the_server_promptly_even_mid_request(paddle_library, narrow_folder, signum):
    """Also: a plain library is served as the CLI runs it, its UNet's static program from the export cache."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "riffusion.server", "--checkpoint", str(paddle_library), "--seed-images",
         str(narrow_folder), "--port", str(port), "--max-steps", "500"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        said = []
        for line in process.stdout:
            said.append(line.rstrip("\n"))
            if line.startswith("serving"):
                break
        assert "running: unet Paddle Inference, text_encoder Paddle dynamic, vae Paddle dynamic" in said, said
        with ThreadPoolExecutor(max_workers=1) as pool:
            long = changed(num_inference_steps=500, start__denoising=1.0, end__denoising=1.0)
            pending = pool.submit(post, f"http://127.0.0.1:{port}", long, 300)
            time.sleep(3)
            started = time.monotonic()
            process.send_signal(signum)
            assert process.wait(timeout=60) == 0
            stopped_s = time.monotonic() - started
            assert pending.result().status_code == 503  # told, not dropped
        assert stopped_s < 20, f"took {stopped_s:.1f} s"
    finally:
        process.kill()
        process.wait()


def test_a_port_in_use_is_one_line_before_the_model_loads(paddle_library):
    """Another server on the port: python -m riffusion.server says so in one line naming the port and exits 1,
    before it exports or loads anything (it used to load the model first and end in a traceback)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "riffusion.server", "--library", str(paddle_library),
                                 "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is already in use (another server?); stop it or choose another with --port"]
    assert result.stdout == ""


def test_model_options_reach_the_server(paddle_library, exported, tiny_lora, narrow_folder, capsys):
    """The stdlib server's model comes from riffusion.model_options, as the CLI's and every Ray replica's: a LoRA
    at scale 0 answers the base model's bytes and at scale 1 other bytes, --scheduler dpmsolver++ other bytes,
    --runtime onnx --precision fp32 runs onnxruntime, --runtime dynamic opts out of the export cache, and a
    precision the export does not hold is one line and exit 1."""
    from riffusion.server import main

    def reply(**options) -> bytes:
        server = serve(ModelOptions(paddle_library, **options).load(quiet=True), narrow_folder)
        try:
            response = post(f"http://127.0.0.1:{server.server_port}", APP_REQUEST)
            assert response.status_code == 200, response.text
            return response.content
        finally:
            stop(server)

    base = reply(runtime="dynamic")
    assert reply(lora=tiny_lora, lora_scale=0.0) == base
    assert reply(lora=tiny_lora) != base
    assert reply(runtime="dynamic", scheduler="dpmsolver++") != base
    onnx = ModelOptions(paddle_library, export=exported[0], runtime="onnx", precision="fp32").load()
    assert (onnx.runtime, onnx.precision) == ("onnx", "fp32")
    assert "running: unet onnxruntime, text_encoder onnxruntime, vae onnxruntime" in capsys.readouterr().err
    dynamic = ModelOptions(paddle_library, runtime="dynamic").load(quiet=True)
    assert (dynamic.runtime, type(dynamic.pipe.unet).__name__) == ("dynamic", "UNet2DConditionModel")
    assert main(["--library", str(paddle_library), "--export", str(exported[0]), "--precision", "int8",
                 "--port", "0"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "holds no int8 programs" in errors[0], errors
