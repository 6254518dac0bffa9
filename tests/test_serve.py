"""The Ray Serve app (riffusion.serve) on the tiny model: the same bytes as the stdlib server for the same
request and for bad bodies (one parser, one response builder), concurrent users answered, and every
failure a JSON error with CORS: a full queue or a dead replica 503 with Retry-After, a timeout 504, an
inference exception 500; the health check fails when the model cannot run. Skipped only without Ray."""

import asyncio
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml

serve = pytest.importorskip("ray.serve", reason="the `serve` extra (ray[serve]) is not installed")

from riffusion import app_api  # noqa: E402
from riffusion.model_options import ModelOptions  # noqa: E402
from riffusion.ports import free_port  # noqa: E402
from riffusion.serve import RiffusionIngress, RiffusionModel, app_builder, build  # noqa: E402

APP_REQUEST = {  # as riffusion-app sends it: integers where floats are meant
    "alpha": 0.25, "num_inference_steps": 2, "seed_image_id": "og_beat", "mask_image_id": None,
    "start": {"prompt": "church bells", "seed": 42, "denoising": 0.75, "guidance": 7},
    "end": {"prompt": "jazz", "seed": 123, "denoising": 0.75, "guidance": 7},
}


@pytest.fixture(scope="module")
def ray_url(paddle_library, narrow_seed_folder):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(ModelOptions(paddle_library), seed_images=str(narrow_seed_folder), max_batch_size=4,
                        batch_wait_s=0.3, num_cpus=1), name="riffusion", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def stdlib_url(paddle_library, narrow_seed_folder):
    """The stdlib server with the model loaded as its command line and every Ray replica load it."""
    from riffusion.server import close, make_server

    server = make_server(ModelOptions(paddle_library).load(quiet=True), "127.0.0.1", 0, narrow_seed_folder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    close(server)


def post(url, body, timeout=300):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{url}/run_inference/", data=data, headers={"Content-Type": "application/json"},
                         timeout=timeout)


def test_ray_and_stdlib_servers_give_the_same_bytes(ray_url, stdlib_url):
    for request in (APP_REQUEST, dict(APP_REQUEST, mask_image_id="mask_top_third_75", alpha=0.9)):
        from_ray, from_stdlib = post(ray_url, request), post(stdlib_url, request)
        assert from_ray.status_code == from_stdlib.status_code == 200, from_ray.text[:300]
        assert from_ray.content == from_stdlib.content
        assert from_ray.headers["Access-Control-Allow-Origin"] == "*"
        assert abs(from_ray.json()["duration_s"] - 0.31) < 0.02
    assert requests.get(ray_url, timeout=30).content == requests.get(stdlib_url, timeout=30).content


@pytest.mark.parametrize("body", [
    b"{not json",
    b"[1, 2]",
    b'{"alpha": NaN}',
    json.dumps(dict(APP_REQUEST, seed_image_id="../../etc/passwd")).encode(),
    json.dumps(dict(APP_REQUEST, alpha=1.5)).encode(),
    json.dumps(dict(APP_REQUEST, end={"prompt": 3, "seed": 1})).encode(),
])
def test_bad_bodies_get_the_same_400(ray_url, stdlib_url, body):
    from_ray, from_stdlib = post(ray_url, body, 30), post(stdlib_url, body, 30)
    assert from_ray.status_code == from_stdlib.status_code == 400
    assert from_ray.content == from_stdlib.content and from_ray.json()["error"]
    assert from_ray.headers["Access-Control-Allow-Origin"] == "*"


def test_preflight_and_unknown_path(ray_url):
    preflight = requests.options(f"{ray_url}/run_inference/", timeout=30)
    assert preflight.status_code == 204 and "POST" in preflight.headers["Access-Control-Allow-Methods"]
    missing = requests.post(f"{ray_url}/other/", json=APP_REQUEST, timeout=30)
    assert missing.status_code == 404 and missing.json() == {"error": "no such path /other/"}


def test_concurrent_users_each_get_their_answer(ray_url):
    """Four users at once (batched together within the 0.3 s wait): four different, complete answers."""
    bodies = [dict(APP_REQUEST, alpha=alpha) for alpha in (0.0, 0.3, 0.6, 1.0)]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda body: post(ray_url, body), bodies))
    assert [reply.status_code for reply in replies] == [200] * 4
    images = [reply.json()["image"] for reply in replies]
    assert len(set(images)) == 4 and all(image.startswith("data:image/jpeg;base64,") for image in images)


class FakeHandle:
    """A model handle whose replies fail as Ray makes them fail."""

    def __init__(self, outcome):
        self.infer = self
        self.outcome = outcome
        self.cancelled = False

    def remote(self, request):
        return self

    def cancel(self):
        self.cancelled = True

    def __await__(self):
        if self.outcome == "hang":
            yield from asyncio.sleep(3600).__await__()
        raise self.outcome


def ingress(outcome, narrow_seed_folder, timeout_s=300.0):
    return RiffusionIngress.func_or_class(FakeHandle(outcome), "unused", str(narrow_seed_folder),
                                          request_timeout_s=timeout_s)


def answer(app, body=APP_REQUEST):
    return asyncio.run(app.answer("POST", "/run_inference/", json.dumps(body).encode()))


def test_failures_are_json_errors_with_cors(narrow_seed_folder):
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    cases = [
        (BackPressureError(num_queued_requests=16, max_queued_requests=16), 503, "all replicas are busy"),
        (ActorDiedError(), 503, "the replica serving this request stopped"),
        (RayTaskError("infer", "traceback", ZeroDivisionError("division by zero")), 500,
         "inference failed: ZeroDivisionError: division by zero"),
    ]
    for error, status, message in cases:
        reply = answer(ingress(error, narrow_seed_folder))
        headers = dict(reply.headers)
        assert reply.status == status and message in json.loads(reply.body)["error"], reply
        assert headers["Access-Control-Allow-Origin"] == "*" and headers["Content-Type"] == "application/json"
        assert (status == 503) == ("Retry-After" in headers)
        if status == 503:
            assert int(headers["Retry-After"]) >= 1
    app = ingress("hang", narrow_seed_folder, timeout_s=0.2)
    reply = answer(app)
    assert reply.status == 504 and "longer than 0.2 s" in json.loads(reply.body)["error"]
    assert app.model.cancelled  # the work is cancelled, not left running for nobody


def test_health_check_fails_when_the_model_cannot_run(paddle_library, narrow_seed_folder):
    """Also: a replica loads the model as the CLI does, a plain library's UNet from the export cache."""
    model = RiffusionModel.func_or_class(ModelOptions(paddle_library), seed_images=str(narrow_seed_folder))  # probes once
    assert (model.pipeline.runtime, model.pipeline.precision) == ("static", "fp32")
    model.last_success = 0.0
    asyncio.run(model.check_health())  # idle for long: the probe runs again, and passes

    class Broken:
        config = model.pipeline.pipe.unet.config

        def __call__(self, *args, **kwargs):
            raise RuntimeError("predictor lost its weights")

    model.pipeline.pipe.unet = Broken()
    model.last_success = 0.0
    with pytest.raises(RuntimeError, match="predictor lost its weights"):
        asyncio.run(model.check_health())


def test_config_file_builds_the_app_and_bad_args_are_refused(paddle_library, tmp_path):
    from importlib.resources import files

    config = yaml.safe_load(files("riffusion").joinpath("serve_config.yaml").read_text())
    application = config["applications"][0]
    assert application["import_path"] == "riffusion.serve:app_builder"
    assert {deployment["name"] for deployment in application["deployments"]} == {"RiffusionModel", "RiffusionIngress"}
    args = dict(application["args"], checkpoint=str(paddle_library))
    assert app_builder(args) is not None
    from riffusion.errors import InputError

    with pytest.raises(InputError, match="not a converted library"):
        app_builder(dict(args, checkpoint=str(tmp_path)))
    with pytest.raises(InputError, match="unknown application args"):
        app_builder(dict(args, replica=2))


def test_cli_refuses_bad_arguments(paddle_library, tmp_path, capsys):
    """Bad values stop python -m riffusion.serve with one line and exit 1 before Ray starts: no library, no seed
    images, a missing LoRA, a precision the export cannot run, a port already taken."""
    from riffusion.serve import main

    library = str(paddle_library)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (["--checkpoint", str(tmp_path)], "not a converted library"),
            (["--checkpoint", library, "--seed-images", str(tmp_path)], "no seed images"),
            (["--checkpoint", library, "--lora", str(tmp_path / "nowhere")], "no paddle_lora_weights.safetensors"),
            (["--checkpoint", library, "--precision", "int8", "--port", str(free_port())], "holds no int8 programs"),
            (["--checkpoint", library, "--port", str(port)],
             f"port {port} on 127.0.0.1 is already in use (another server?); stop it or choose another with --port"),
        ]
        for args, message in cases:
            assert main(args) == 1, args
            err = capsys.readouterr().err
            errors = [line for line in err.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1 and message in errors[0], (args, err)
            assert "running:" not in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["--checkpoint", library, "--max-batch-size", "0"])


@pytest.mark.parametrize("option, value, message", [
    ("--precision", "fp16", "argument --precision: invalid choice: 'fp16' (choose from 'fp32', 'bf16', 'int8')"),
    ("--scheduler", "euler", "argument --scheduler: invalid choice: 'euler' (choose from 'library', 'dpmsolver++')"),
    ("--lora-scale", "nan", "argument --lora-scale: must be a finite number, got nan"),
])
def test_model_options_are_checked_alike_everywhere(paddle_library, tmp_path, capsys, option, value, message):
    """The riffusion CLI, the stdlib server, the Ray app's command line and its config file's args refuse a bad
    model option with the same message (one definition, riffusion.model_options), before any work."""
    from riffusion import cli, server, serve as ray_app
    from riffusion.errors import InputError

    common = ["--library", str(paddle_library), option, value]
    for main, args in ((cli.main, ["text-to-audio", "x", str(tmp_path / "x.wav"), *common]),
                       (server.main, common), (ray_app.main, common)):
        with pytest.raises(SystemExit) as exit:
            main(args)
        assert exit.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")
    with pytest.raises(InputError) as refused:
        app_builder({"checkpoint": str(paddle_library), option[2:].replace("-", "_"): value})
    assert str(refused.value) == f"application args: {message}"


def test_model_options_in_the_config_reach_the_replica(ray_url, paddle_library, tiny_lora, narrow_seed_folder):
    """serve_config.yaml's args (strings, as YAML may give them) with a LoRA and DPM-Solver++ deploy a replica
    whose answer is byte for byte what the stdlib server's loader gives for the same options, and differs from
    the answers without the LoRA or without the scheduler: both reached the replica."""
    args = {"checkpoint": str(paddle_library), "seed_images": str(narrow_seed_folder), "lora": str(tiny_lora),
            "lora_scale": "1", "scheduler": "dpmsolver++", "precision": "fp32", "num_cpus": "0.5"}
    body = json.dumps(APP_REQUEST).encode()
    handle = serve.run(app_builder(args), name="tuned", route_prefix=None)
    try:
        reply = handle.answer.remote("POST", "/run_inference/", body).result(timeout_s=300)
    finally:
        serve.delete("tuned")
    assert reply.status == 200, reply.body[:300]

    def local(**options) -> bytes:
        pipeline = ModelOptions(paddle_library, **options).load(quiet=True)
        request = app_api.parse_request(body, narrow_seed_folder, app_api.DEFAULT_MAX_STEPS)
        return app_api.inference_reply(*app_api.infer(pipeline, request, narrow_seed_folder), request).body

    assert reply.body == local(lora=tiny_lora, scheduler="dpmsolver++")
    assert reply.body != local(lora=tiny_lora)
    assert reply.body != local(runtime="dynamic", scheduler="dpmsolver++")
