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

from riffusion import app_api, seed_images  # noqa: E402
from riffusion.serve import RiffusionIngress, RiffusionModel, app_builder, build  # noqa: E402

APP_REQUEST = {  # as riffusion-app sends it: integers where floats are meant
    "alpha": 0.25, "num_inference_steps": 2, "seed_image_id": "og_beat", "mask_image_id": None,
    "start": {"prompt": "church bells", "seed": 42, "denoising": 0.75, "guidance": 7},
    "end": {"prompt": "jazz", "seed": 123, "denoising": 0.75, "guidance": 7},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def narrow_seeds(tmp_path_factory):
    """The seed library cut to 64 columns (0.64 s of audio): 8x cheaper for the tiny model."""
    folder = tmp_path_factory.mktemp("narrow_seeds")
    for name in seed_images.seed_ids() + seed_images.mask_ids():
        seed_images.load(name).crop((0, 0, 64, 512)).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def ray_url(paddle_library, narrow_seeds):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(str(paddle_library), seed_images=str(narrow_seeds), max_batch_size=4, batch_wait_s=0.3,
                        num_cpus=1), name="riffusion", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def stdlib_url(paddle_library, narrow_seeds):
    from riffusion.pipeline import RiffusionPipeline
    from riffusion.server import close, make_server

    server = make_server(RiffusionPipeline.from_pretrained(paddle_library), "127.0.0.1", 0, narrow_seeds)
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
        assert abs(from_ray.json()["duration_s"] - 0.63) < 0.02
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


def ingress(outcome, narrow_seeds, timeout_s=300.0):
    return RiffusionIngress.func_or_class(FakeHandle(outcome), "unused", str(narrow_seeds),
                                          request_timeout_s=timeout_s)


def answer(app, body=APP_REQUEST):
    return asyncio.run(app.answer("POST", "/run_inference/", json.dumps(body).encode()))


def test_failures_are_json_errors_with_cors(narrow_seeds):
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    cases = [
        (BackPressureError(num_queued_requests=16, max_queued_requests=16), 503, "all replicas are busy"),
        (ActorDiedError(), 503, "the replica serving this request stopped"),
        (RayTaskError("infer", "traceback", ZeroDivisionError("division by zero")), 500,
         "inference failed: ZeroDivisionError: division by zero"),
    ]
    for error, status, message in cases:
        reply = answer(ingress(error, narrow_seeds))
        headers = dict(reply.headers)
        assert reply.status == status and message in json.loads(reply.body)["error"], reply
        assert headers["Access-Control-Allow-Origin"] == "*" and headers["Content-Type"] == "application/json"
        assert (status == 503) == ("Retry-After" in headers)
        if status == 503:
            assert int(headers["Retry-After"]) >= 1
    app = ingress("hang", narrow_seeds, timeout_s=0.2)
    reply = answer(app)
    assert reply.status == 504 and "longer than 0.2 s" in json.loads(reply.body)["error"]
    assert app.model.cancelled  # the work is cancelled, not left running for nobody


def test_health_check_fails_when_the_model_cannot_run(paddle_library, narrow_seeds):
    model = RiffusionModel.func_or_class(str(paddle_library), seed_images=str(narrow_seeds))  # probes once
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
    from riffusion.serve import main

    assert main(["--checkpoint", str(tmp_path)]) == 1
    assert "not a converted library" in capsys.readouterr().err
    assert main(["--checkpoint", str(paddle_library), "--seed-images", str(tmp_path)]) == 1
    assert "no seed images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(paddle_library), "--max-batch-size", "0"])
