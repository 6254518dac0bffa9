"""The riffusion-app inference server over a real socket: the app's exact request, data URLs that
decode to a JPEG spectrogram and MP3 audio, 400s for bad bodies, CORS, and concurrent requests."""

import base64
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import soundfile
from PIL import Image

from riffusion import seed_images
from riffusion.pipeline import RiffusionPipeline
from riffusion.server import make_server

APP_REQUEST = {  # as riffusion-app sends it: integers where floats are meant
    "alpha": 0.25, "num_inference_steps": 2, "seed_image_id": "og_beat", "mask_image_id": None,
    "start": {"prompt": "church bells", "seed": 42, "denoising": 0.75, "guidance": 7},
    "end": {"prompt": "jazz", "seed": 123, "denoising": 0.75, "guidance": 7},
}


@pytest.fixture(scope="module")
def pipeline(paddle_library):
    return RiffusionPipeline.from_pretrained(paddle_library)


def serve(pipeline, seed_folder):
    server = make_server(pipeline, "127.0.0.1", 0, seed_folder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def url(pipeline):
    """The server with the real seed image library (512x512: a full 5.12 s clip)."""
    server = serve(pipeline, seed_images.FOLDER)
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def narrow_url(pipeline, tmp_path_factory):
    """The server with the library cut to 64 columns (0.64 s), 8x cheaper for the tiny model on a CPU."""
    folder = tmp_path_factory.mktemp("narrow_seeds")
    for name in seed_images.seed_ids() + seed_images.mask_ids():
        seed_images.load(name).crop((0, 0, 64, 512)).save(folder / f"{name}.png")
    server = serve(pipeline, folder)
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def data_url(value: str, mime: str) -> bytes:
    prefix = f"data:{mime};base64,"
    assert value.startswith(prefix)
    return base64.b64decode(value[len(prefix):])


def test_app_request_gives_a_spectrogram_and_its_audio(url):
    response = requests.post(f"{url}/run_inference/", json=APP_REQUEST, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    body = response.json()
    image = Image.open(io.BytesIO(data_url(body["image"], "image/jpeg")))
    assert image.format == "JPEG" and image.size == (512, 512)
    audio, sample_rate = soundfile.read(io.BytesIO(data_url(body["audio"], "audio/mpeg")))
    assert sample_rate == 44100
    assert abs(len(audio) / sample_rate - 5.11) < 0.06  # MP3 frames pad the end a little
    assert abs(body["duration_s"] - 5.11) < 0.01


def test_mask_image_is_accepted(narrow_url):
    request = dict(APP_REQUEST, mask_image_id="mask_top_third_75")
    response = requests.post(f"{narrow_url}/run_inference/", json=request, timeout=120)
    assert response.status_code == 200
    assert abs(response.json()["duration_s"] - 0.63) < 0.02


def changed(**top):
    request = json.loads(json.dumps(APP_REQUEST))
    for key, value in top.items():
        if value is KeyError:
            del request[key]
        else:
            request[key] = value
    return request


@pytest.mark.parametrize("body, message", [
    (b"{not json", "body is not JSON"),
    (b"[1, 2]", "body must be a JSON object"),
    (changed(seed_image_id="../../etc/passwd"), "unknown seed_image_id '../../etc/passwd'"),
    (changed(mask_image_id="og_beat"), "unknown mask_image_id 'og_beat'"),
    (changed(alpha=1.5), "'alpha' must be in [0.0, 1.0]"),
    (changed(alpha="0.5"), "'alpha' must be a number"),
    (changed(num_inference_steps=2.5), "'num_inference_steps' must be an integer"),
    (changed(start=KeyError), "'start' must be an object"),
    (changed(end={"prompt": "x", "seed": True}), "'seed' must be an integer"),
    (changed(end={"prompt": 3, "seed": 1}), "end.prompt must be a string"),
    (changed(end={"prompt": "x", "seed": 1, "denoising": -0.1}), "'denoising' must be in [0.0, 1.0]"),
])
def test_bad_bodies_get_400_with_a_message(url, body, message):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = requests.post(f"{url}/run_inference/", data=data, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_cors_preflight_unknown_path_and_empty_body(url):
    preflight = requests.options(f"{url}/run_inference/", timeout=10)
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert requests.post(f"{url}/other/", json=APP_REQUEST, timeout=10).status_code == 404
    assert requests.post(f"{url}/run_inference/", data=b"", timeout=10).status_code == 400
    assert requests.get(url, timeout=10).json()["seed_images"] == ["agile", "marim", "motorway", "og_beat", "vibes"]


def test_concurrent_requests_do_not_corrupt_each_other(narrow_url):
    requests_ = [changed(alpha=alpha) for alpha in (0.0, 0.5, 1.0)]

    def run(request):
        response = requests.post(f"{narrow_url}/run_inference/", json=request, timeout=300)
        assert response.status_code == 200
        return response.json()["image"]

    sequential = [run(request) for request in requests_]
    with ThreadPoolExecutor(max_workers=3) as pool:
        concurrent = list(pool.map(run, requests_))
    assert concurrent == sequential
    assert len(set(sequential)) == 3


def test_server_refuses_a_seed_folder_without_images(paddle_library, tmp_path, capsys):
    from riffusion.server import main

    assert main(["--checkpoint", str(paddle_library), "--seed-images", str(tmp_path)]) == 1
    assert f"{tmp_path}: no seed images (*.png) there" in capsys.readouterr().err
