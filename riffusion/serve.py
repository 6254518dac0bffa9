"""riffusion-app's inference API on Ray Serve: many replicas, on one machine or a cluster, with the
requests of different users batched into shared UNet calls (riffusion.batching).

    python -m riffusion.serve --checkpoint DIR [--host 127.0.0.1] [--port 3013] [--replicas 1]
        [--max-batch-size 4] [--batch-wait-s 0.05] [--address auto|ray://HOST:10001]
    serve run riffusion/serve_config.yaml          # or: serve deploy riffusion/serve_config.yaml

Two deployments. `RiffusionIngress` answers HTTP: it parses and answers with riffusion.app_api, the
stdlib server's module (same validation, same bytes), and turns every failure into a JSON error with
CORS: a full queue or a replica that died under the request -> 503 with Retry-After, a request past
its timeout -> 504, an exception in inference -> 500. `RiffusionModel` holds the pipeline (one
thread owns it, as Paddle Inference needs) and batches with @serve.batch; its queue is bounded by
Serve (max_ongoing_requests per replica, max_queued_requests per caller), its health check runs the
model when it has been idle, and Serve lets its in-flight requests finish before it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.requests import Request
from starlette.responses import Response

from riffusion import app_api
from riffusion import seed_images as seeds  # `seed_images` is the folder argument's name below
from riffusion.app_api import BadRequest, Reply
from riffusion.errors import InputError

APP_NAME = "riffusion"
DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_BATCH_WAIT_S = 0.05
DEFAULT_REQUEST_TIMEOUT_S = 300.0
DEFAULT_MAX_QUEUED = 8  # per replica, beyond the batch being computed
HEALTHY_AFTER_SUCCESS_S = 300.0  # a replica that answered this recently needs no probe
PROBE_TIMEOUT_S = 60.0  # two full-size UNet steps on a busy CPU fit
PROBE_STEPS = 2  # the fewest with a UNet call at full denoising (schedulers skip the first of one)


def _response(reply: Reply) -> Response:
    return Response(content=reply.body, status_code=reply.status, headers=dict(reply.headers))


class ReplicaGone(RuntimeError):
    """The model replica running a request stopped before it answered."""


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=DEFAULT_MAX_BATCH_SIZE + DEFAULT_MAX_QUEUED,
                  graceful_shutdown_wait_loop_s=1.0, graceful_shutdown_timeout_s=DEFAULT_REQUEST_TIMEOUT_S,
                  health_check_period_s=10.0, health_check_timeout_s=PROBE_TIMEOUT_S + 10.0)
class RiffusionModel:
    """One pipeline per replica; requests arriving within `batch_wait_s` of each other (up to
    `max_batch_size`) run as one batch. Batching is live-tunable through user_config."""

    def __init__(self, checkpoint: str, export: str | None = None, runtime: str | None = None,
                 seed_images: str | None = None):
        from riffusion.pipeline import RiffusionPipeline

        self.seed_folder = seeds.folder_for(checkpoint, seed_images)
        # One thread owns the pipeline: Paddle Inference predictors fail when called from another thread.
        self.owner = ThreadPoolExecutor(1, thread_name_prefix="riffusion-model")
        self.pipeline = self.owner.submit(RiffusionPipeline.from_pretrained, checkpoint, exported=export,
                                          runtime=runtime).result()
        self.busy = 0  # requests inside this replica (waiting for a batch or in one)
        # A replica whose model cannot run fails here, before Serve sends it requests; the probe also
        # warms the model up, so that Serve's first health check finds it healthy without running it.
        self.owner.submit(self._probe).result()
        self.last_success = time.monotonic()

    def reconfigure(self, config: dict) -> None:
        self.infer_batch.set_max_batch_size(int(config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)))
        self.infer_batch.set_batch_wait_timeout_s(float(config.get("batch_wait_s", DEFAULT_BATCH_WAIT_S)))

    async def infer(self, request: app_api.InferenceRequest) -> Reply:
        self.busy += 1
        try:
            outcome = await self.infer_batch(request)
            if isinstance(outcome, Exception):
                raise outcome
            image, audio, rate = outcome
        finally:
            self.busy -= 1
        loop = asyncio.get_running_loop()  # JPEG and MP3 encoding overlap the next batch's UNet calls
        return await loop.run_in_executor(None, app_api.inference_reply, image, audio, rate, request)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def infer_batch(self, requests: list[app_api.InferenceRequest]) -> list:
        from riffusion.batching import infer_many

        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self.owner, infer_many, self.pipeline, requests, self.seed_folder)
        if any(not isinstance(result, Exception) for result in results):
            self.last_success = time.monotonic()
        return results  # an exception in the list is raised to its own caller only

    async def check_health(self) -> None:
        """Raise when the model cannot run: busy or recently successful replicas are healthy; an idle one
        denoises the first seed image in PROBE_STEPS steps (on its owner thread, like any request)."""
        if self.busy or time.monotonic() - self.last_success < HEALTHY_AFTER_SUCCESS_S:
            return
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.run_in_executor(self.owner, self._probe), PROBE_TIMEOUT_S)
        self.last_success = time.monotonic()

    def _probe(self) -> None:
        import numpy as np

        from riffusion.pipeline import PromptInput

        image = seeds.load(seeds.seed_ids(self.seed_folder)[0], self.seed_folder)
        steps = []
        prompt = PromptInput("", denoising=1.0)
        latents = self.pipeline.interpolate_latents(prompt, prompt, 0.0, image, None, PROBE_STEPS,
                                                    on_step=lambda done, total: steps.append(done)).numpy()
        if not steps or not np.isfinite(latents).all():
            raise RuntimeError(f"the model cannot run: its probe made {len(steps)} UNet steps, finite latents: "
                               f"{bool(np.isfinite(latents).all())}")

    def __del__(self):
        self.owner.shutdown(wait=False, cancel_futures=True)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
class RiffusionIngress:
    """HTTP in and out: riffusion.app_api's parser and replies, failures as JSON errors with CORS."""

    def __init__(self, model, checkpoint: str, seed_images: str | None = None,
                 max_steps: int = app_api.DEFAULT_MAX_STEPS, request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S):
        self.model = model
        self.seed_folder = seeds.folder_for(checkpoint, seed_images)
        self.max_steps = max_steps
        self.request_timeout_s = request_timeout_s
        self.seconds_per_request = 10.0  # a first guess for Retry-After until a request has been answered

    async def __call__(self, http: Request) -> Response:
        return _response(await self.answer(http.method, http.url.path, await http.body()))

    async def answer(self, method: str, path: str, body: bytes) -> Reply:
        route = path.rstrip("/")
        if method == "OPTIONS":
            return app_api.preflight_reply()
        if method == "GET" and route == "":
            return app_api.status_reply(self.seed_folder, self.max_steps)
        if method != "POST" or route != "/run_inference":
            return app_api.error_reply(HTTPStatus.NOT_FOUND, f"no such path {path}")
        try:
            request = app_api.parse_request(body, self.seed_folder, self.max_steps)
        except BadRequest as error:
            return app_api.error_reply(HTTPStatus.BAD_REQUEST, str(error))
        started = time.monotonic()
        response = self.model.infer.remote(request)
        try:
            reply = await asyncio.wait_for(response, self.request_timeout_s)
            self.seconds_per_request = 0.8 * self.seconds_per_request + 0.2 * (time.monotonic() - started)
            return reply
        except asyncio.TimeoutError:
            response.cancel()
            return app_api.error_reply(HTTPStatus.GATEWAY_TIMEOUT,
                                       f"inference took longer than {self.request_timeout_s:g} s; try fewer steps")
        except BackPressureError as error:  # every replica's queue is full
            return app_api.error_reply(HTTPStatus.SERVICE_UNAVAILABLE, f"all replicas are busy: {error.message}",
                                       self.retry_after_s())
        except (RayActorError, DeploymentUnavailableError) as error:
            return app_api.error_reply(HTTPStatus.SERVICE_UNAVAILABLE,
                                       f"the replica serving this request stopped ({type(error).__name__}); "
                                       "try again", self.retry_after_s())
        except RayTaskError as error:  # the exception raised inside inference
            cause = error.as_instanceof_cause()
            if isinstance(cause, RayActorError):
                return app_api.error_reply(HTTPStatus.SERVICE_UNAVAILABLE,
                                           "the replica serving this request stopped; try again", self.retry_after_s())
            return app_api.error_reply(HTTPStatus.INTERNAL_SERVER_ERROR, f"inference failed: {_cause(error)}")
        except Exception as error:
            return app_api.error_reply(HTTPStatus.INTERNAL_SERVER_ERROR, f"inference failed: {error}")

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.seconds_per_request))


def _cause(error: RayTaskError) -> str:
    cause = getattr(error, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(error).splitlines()[0]


def build(checkpoint: str, export: str | None = None, runtime: str | None = None, seed_images: str | None = None,
          replicas: int = 1, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
          max_queued: int = DEFAULT_MAX_QUEUED, max_steps: int = app_api.DEFAULT_MAX_STEPS,
          request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, num_cpus: float = 1, num_gpus: float = 0):
    """The Serve application: ingress + `replicas` model replicas."""
    if not (Path(checkpoint) / "model_index.json").is_file():
        raise InputError(f"{checkpoint}: not a converted library (no model_index.json)")
    seeds.folder_for(checkpoint, seed_images)
    model = RiffusionModel.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max_batch_size + max_queued, max_queued_requests=max_queued * replicas,
        graceful_shutdown_timeout_s=request_timeout_s,
        user_config={"max_batch_size": max_batch_size, "batch_wait_s": batch_wait_s},
    ).bind(checkpoint, export, runtime, seed_images)
    # a stopping ingress waits for its requests' answers as long as a request may take
    return RiffusionIngress.options(graceful_shutdown_timeout_s=request_timeout_s).bind(
        model, checkpoint, seed_images, max_steps, request_timeout_s)


def app_builder(args: dict):
    """`serve run riffusion.serve:app_builder checkpoint=DIR ...` and serve_config.yaml's import_path."""
    known = set(build.__code__.co_varnames[:build.__code__.co_argcount])
    unknown = set(args) - known
    if unknown:
        raise InputError(f"unknown application args {sorted(unknown)} (known: {sorted(known)})")
    numbers = {"replicas": int, "max_batch_size": int, "max_queued": int, "max_steps": int, "batch_wait_s": float,
               "request_timeout_s": float, "num_cpus": float, "num_gpus": float}
    return build(**{key: numbers.get(key, str)(value) if value is not None else None for key, value in args.items()})


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m riffusion.serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description="riffusion-app's inference server on Ray Serve (replicas, batching)")
    parser.add_argument("--checkpoint", required=True, help="a ppdiffusers library made by `python -m convert` "
                        "(a release folder brings its own export/ and seed_images/); on a cluster, a path every node has")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3013)
    parser.add_argument("--export", help="a folder made by python -m export: run its static or ONNX programs")
    parser.add_argument("--runtime", choices=("dynamic", "static", "onnx"),
                        help="default: the fastest the export holds (onnx, else static), dynamic without --export")
    parser.add_argument("--seed-images", help="folder of seed images and masks (default: the release's seed_images/, "
                        "else the built-in library)")
    parser.add_argument("--replicas", type=_positive(int), default=1, help="model replicas (one pipeline each)")
    parser.add_argument("--max-batch-size", type=_positive(int), default=DEFAULT_MAX_BATCH_SIZE,
                        help="requests per shared UNet call")
    parser.add_argument("--batch-wait-s", type=float, default=DEFAULT_BATCH_WAIT_S,
                        help="how long a request waits for others to batch with")
    parser.add_argument("--max-queued", type=_positive(int), default=DEFAULT_MAX_QUEUED,
                        help="requests that may wait per replica beyond its batch; more get 503 with Retry-After")
    parser.add_argument("--max-steps", type=_positive(int), default=app_api.DEFAULT_MAX_STEPS,
                        help="run at most this many denoising steps per request")
    parser.add_argument("--request-timeout-s", type=_positive(float), default=DEFAULT_REQUEST_TIMEOUT_S,
                        help="a request not answered by then gets 504")
    parser.add_argument("--num-cpus", type=_positive(float), default=1, help="CPUs Ray reserves per model replica")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs Ray reserves per model replica")
    parser.add_argument("--address", help="a running Ray cluster (auto, or ray://HOST:10001); default: start one here")
    args = parser.parse_args(argv)
    if not 0 <= args.batch_wait_s <= 60 or args.max_steps > app_api.STEPS_LIMIT or args.num_gpus < 0:
        parser.error("--batch-wait-s must be in [0, 60], --max-steps at most "
                     f"{app_api.STEPS_LIMIT}, --num-gpus at least 0")
    try:
        app = build(args.checkpoint, args.export, args.runtime, args.seed_images, args.replicas, args.max_batch_size,
                    args.batch_wait_s, args.max_queued, args.max_steps, args.request_timeout_s, args.num_cpus,
                    args.num_gpus)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    import ray

    ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"serving riffusion on http://{args.host}:{args.port}/run_inference/ ({args.replicas} replicas, "
              f"batches of up to {args.max_batch_size})", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping (in-flight requests finish first)", file=sys.stderr, flush=True)
        if args.address is None:
            serve.shutdown()
        else:  # a shared cluster: leave its other applications alone
            serve.delete(APP_NAME)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
