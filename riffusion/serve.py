"""riffusion-app's inference API on Ray Serve: many replicas, on one machine or a cluster, with the
requests of different users batched into shared UNet calls (riffusion.batching).

    python -m riffusion.serve --checkpoint DIR [--host 127.0.0.1] [--port 3013] [--replicas 1]
        [--max-batch-size 4] [--batch-wait-s 0.05] [--address auto|ray://HOST:10001]
        [--export DIR] [--runtime R] [--precision P] [--scheduler S] [--lora RUN] [--lora-scale X]
    serve run riffusion/serve_config.yaml          # or: serve deploy riffusion/serve_config.yaml

The model options are riffusion.model_options's, as the CLI and the stdlib server take them; the config
file's `args` are the same options in snake_case, read by the same parser. Every replica gets them and
loads the model as the CLI does (a plain library's UNet from its node's export cache).

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

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.requests import Request
from starlette.responses import Response

from riffusion import app_api
from riffusion import seed_images as seeds  # `seed_images` is the folder argument's name below
from riffusion.app_api import BadRequest, Reply
from riffusion.console import HelpFormatter, add_version, command, quiet_third_party
from riffusion.cpu_tuning import tune_cpu_runtime
from riffusion.errors import InputError
from riffusion.model_options import ModelOptions, add_model_options
from riffusion.ports import check_free, port_number

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

    def __init__(self, options: ModelOptions, seed_images: str | None = None):
        tune_cpu_runtime()  # a replica is a process of its own, with Paddle not loaded yet
        self.seed_folder = seeds.folder_for(options.checkpoint, seed_images)
        # One thread owns the pipeline: Paddle Inference predictors fail when called from another thread.
        self.owner = ThreadPoolExecutor(1, thread_name_prefix="riffusion-model")
        # loaded as the CLI and the stdlib server load it (a plain library's UNet from this node's export cache)
        self.pipeline = self.owner.submit(options.load).result()
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


def build(options: ModelOptions, seed_images: str | None = None, replicas: int = 1,
          max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
          max_queued: int = DEFAULT_MAX_QUEUED, max_steps: int = app_api.DEFAULT_MAX_STEPS,
          request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, num_cpus: float = 1, num_gpus: float = 0):
    """The Serve application: ingress + `replicas` model replicas, each loading the model with `options`.
    InputError for what can be checked here (the library, export, LoRA and seed folders)."""
    options.check()
    seeds.folder_for(options.checkpoint, seed_images)
    model = RiffusionModel.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max_batch_size + max_queued, max_queued_requests=max_queued * replicas,
        graceful_shutdown_timeout_s=request_timeout_s,
        user_config={"max_batch_size": max_batch_size, "batch_wait_s": batch_wait_s},
    ).bind(options, seed_images)  # Serve gives every replica these arguments
    # a stopping ingress waits for its requests' answers as long as a request may take
    return RiffusionIngress.options(graceful_shutdown_timeout_s=request_timeout_s).bind(
        model, str(options.checkpoint), seed_images, max_steps, request_timeout_s)


def _build(args: argparse.Namespace):
    return build(ModelOptions.from_args(args), args.seed_images, args.replicas, args.max_batch_size, args.batch_wait_s,
                 args.max_queued, args.max_steps, args.request_timeout_s, args.num_cpus, args.num_gpus)


class _ConfigArgs(argparse.ArgumentParser):
    def error(self, message):
        raise InputError(f"application args: {message}")


def app_builder(args: dict):
    """`serve run riffusion.serve:app_builder checkpoint=DIR ...` and serve_config.yaml's import_path: `args`
    are the command line's options (snake_case names), read and checked by its own parser."""
    parser = _parser(_ConfigArgs)
    known = {action.dest for action in parser._actions if action.dest != "help"}
    unknown = set(args) - known
    if unknown:
        raise InputError(f"unknown application args {sorted(unknown)} (known: {sorted(known)})")
    argv = [part for key, value in args.items() if value is not None
            for part in (f"--{key.replace('_', '-')}", str(value))]
    return _build(parser.parse_args(argv))


def _number(kind, low: float, high: float = math.inf, low_open: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high or not math.isfinite(value):
            if high < math.inf:
                raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}], got {text}")
            raise argparse.ArgumentTypeError(f"must be {'more than' if low_open else 'at least'} {low:g}, got {text}")
        return value

    return parse


def _parser(parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The application's options, shared by the command line and serve_config.yaml's args."""
    parser = parser_class(prog="python -m riffusion.serve", formatter_class=HelpFormatter,
                          description="riffusion-app's inference server on Ray Serve (replicas, batching)")
    add_model_options(parser)
    parser.add_argument("--seed-images", help="folder of seed images and masks (default: the release's seed_images/, "
                        "else the built-in library)")
    parser.add_argument("--replicas", type=_number(int, 1), default=1, help="model replicas (one pipeline each)")
    parser.add_argument("--max-batch-size", type=_number(int, 1), default=DEFAULT_MAX_BATCH_SIZE,
                        help="requests per shared UNet call")
    parser.add_argument("--batch-wait-s", type=_number(float, 0, 60), default=DEFAULT_BATCH_WAIT_S,
                        help="how long a request waits for others to batch with")
    parser.add_argument("--max-queued", type=_number(int, 1), default=DEFAULT_MAX_QUEUED,
                        help="requests that may wait per replica beyond its batch; more get 503 with Retry-After")
    parser.add_argument("--max-steps", type=_number(int, 1, app_api.STEPS_LIMIT), default=app_api.DEFAULT_MAX_STEPS,
                        help="run at most this many denoising steps per request")
    parser.add_argument("--request-timeout-s", type=_number(float, 0, low_open=True), default=DEFAULT_REQUEST_TIMEOUT_S,
                        help="a request not answered by then gets 504")
    parser.add_argument("--num-cpus", type=_number(float, 0, low_open=True), default=1,
                        help="CPUs Ray reserves per model replica")
    parser.add_argument("--num-gpus", type=_number(float, 0), default=0, help="GPUs Ray reserves per model replica")
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    parser = add_version(_parser())
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=3013)
    parser.add_argument("--address", help="a running Ray cluster (auto, or ray://HOST:10001); default: start one here")
    args = parser.parse_args(argv)
    quiet_third_party()
    tune_cpu_runtime()
    app = _build(args)
    if args.address is None:  # on a cluster the HTTP proxies run on its nodes, and the replicas export there
        check_free(args.host, args.port)
        ModelOptions.from_args(args).prepare()  # checked, and exported once here for this machine's replicas
    import ray

    ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    code = 0
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"serving riffusion on http://{args.host}:{args.port}/run_inference/ ({args.replicas} replicas, "
              f"batches of up to {args.max_batch_size})", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    except RuntimeError as error:  # Serve's "Deploying application riffusion failed: ..."
        print(f"error: the model replicas did not start: {_replica_error(error)}", file=sys.stderr)
        code = 1
    finally:
        print("stopping (in-flight requests finish first)", file=sys.stderr, flush=True)
        if args.address is None:
            serve.shutdown()
        else:  # a shared cluster: leave its other applications alone
            serve.delete(APP_NAME)
        ray.shutdown()
    return code


def _replica_error(error: RuntimeError) -> str:
    """The last exception line of the failed deployment's message (a replica's constructor traceback), without
    its class name; Serve's own message when there is none."""
    try:
        deployments = serve.status().applications[APP_NAME].deployments.values()
        text = "\n".join(deployment.message for deployment in deployments if deployment.message)
    except Exception:  # Serve itself is what failed
        text = ""
    errors = [line.strip() for line in text.splitlines() if "Error: " in line]
    return errors[-1].split("Error: ", 1)[1] if errors else str(error).splitlines()[0]


if __name__ == "__main__":
    sys.exit(main())
