"""python -m riffusion.server --checkpoint DIR [--host 127.0.0.1] [--port 3013] [--max-steps 100]

riffusion-app's inference API on Paddle: POST /run_inference/ with
  {"alpha", "num_inference_steps", "seed_image_id", "mask_image_id",
   "start": {"prompt", "seed", "denoising", "guidance", "negative_prompt"}, "end": {...}}
answers {"image": "data:image/jpeg;base64,...", "audio": "data:audio/mpeg;base64,...", "duration_s",
"num_inference_steps"}. What is accepted, and every reply's bytes, are riffusion.app_api's; this module
is the transport: HTTP threads read, queue and answer, one worker thread runs the model
(riffusion.worker), a request whose client hangs up is dropped at the next denoising step, a full
queue answers 503 with Retry-After, SIGINT and SIGTERM stop the server.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from riffusion import app_api, seed_images
from riffusion.app_api import BadRequest, Reply
from riffusion.console import HelpFormatter, add_version, command, quiet_third_party
from riffusion.cpu_tuning import tune_cpu_runtime
from riffusion.errors import InputError
from riffusion.model_options import ModelOptions, add_model_options
from riffusion.ports import listen_error, port_number
from riffusion.worker import Busy, Cancelled, InferenceWorker

SOCKET_TIMEOUT_S = 30.0  # a client that sends or reads nothing for this long loses its connection
CLIENT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
DEFAULT_MAX_PENDING = 8


class Handler(BaseHTTPRequestHandler):
    server_version = "riffusion-paddle"
    timeout = SOCKET_TIMEOUT_S  # socketserver sets it on the connection: no read or write waits longer

    def do_OPTIONS(self):  # CORS preflight from the web app
        self._send(app_api.preflight_reply())

    def do_GET(self):
        if self.path.rstrip("/") == "":
            self._send(app_api.status_reply(self.server.seed_folder, self.server.max_steps))
        else:
            self._send(app_api.error_reply(HTTPStatus.NOT_FOUND, f"no such path {self.path}"))

    def do_POST(self):
        with self.server.answering:
            self.server.in_flight += 1
        try:
            self._send(self._inference())
        except Exception as error:  # whatever broke, the client gets an answer, not a closed socket
            self.log_error("inference failed: %r", error)
            self._send(app_api.error_reply(HTTPStatus.INTERNAL_SERVER_ERROR, f"inference failed: {error}"))
        finally:
            with self.server.answering:
                self.server.in_flight -= 1
                self.server.answering.notify_all()

    def _inference(self) -> Reply | None:
        if self.path.rstrip("/") != "/run_inference":
            return app_api.error_reply(HTTPStatus.NOT_FOUND, f"no such path {self.path}")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if not 0 < length <= app_api.MAX_BODY_BYTES:
            return app_api.error_reply(HTTPStatus.BAD_REQUEST,
                                       f"Content-Length must be 1..{app_api.MAX_BODY_BYTES} bytes")
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            return app_api.error_reply(HTTPStatus.REQUEST_TIMEOUT, f"no body within {self.timeout:g} s")
        server = self.server
        try:
            request = app_api.parse_request(raw, server.seed_folder, server.max_steps)
        except BadRequest as error:
            return app_api.error_reply(HTTPStatus.BAD_REQUEST, str(error))

        def work(check):
            image, audio, rate = app_api.infer(server.pipeline, request, server.seed_folder,
                                               on_step=lambda done, total: check())
            return app_api.inference_reply(image, audio, rate, request)

        try:
            job = server.worker.submit(work)
        except Busy as busy:
            return app_api.error_reply(HTTPStatus.SERVICE_UNAVAILABLE, str(busy), busy.retry_after_s)
        except Cancelled as stopping:
            return app_api.error_reply(HTTPStatus.SERVICE_UNAVAILABLE, str(stopping), 1)
        while not job.wait(CLIENT_POLL_S):
            if self._client_gone():
                job.cancel()
                self.log_message("client left: request dropped")
                return None
        try:
            return job.result()
        except Cancelled:
            return app_api.error_reply(HTTPStatus.SERVICE_UNAVAILABLE, "the server is stopping", 1)

    def _client_gone(self) -> bool:
        """True once the client has closed its end (HTTP/1.0: it sends nothing more after the body)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:  # reset by the peer
            return True

    def _send(self, reply: Reply | None) -> None:
        if reply is None:
            return
        try:
            self.send_response(reply.status)
            for name, value in reply.headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
        except OSError as error:  # the client left or stalled while we answered
            self.log_error("could not answer: %r", error)
            self.close_connection = True

    def log_message(self, format, *args):
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


class RiffusionServer(ThreadingHTTPServer):
    request_queue_size = 128  # listen backlog: socketserver's 5 reset connections when 20 arrived at once
    daemon_threads = True


def make_server(pipeline, host: str = "127.0.0.1", port: int = 3013, seed_folder: Path = seed_images.FOLDER,
                max_steps: int = app_api.DEFAULT_MAX_STEPS, max_pending: int = DEFAULT_MAX_PENDING,
                socket_timeout_s: float = SOCKET_TIMEOUT_S) -> RiffusionServer:
    """A server for `pipeline` (which must not have run on another thread: its worker thread runs it
    from now on; it may be set as `server.pipeline` later, before serve_forever, so that the port is
    taken before a long model load). Call `serve_forever()`, then `close(server)`. InputError when the
    port cannot be listened on."""
    if not 1 <= max_steps <= app_api.STEPS_LIMIT:
        raise ValueError(f"max_steps must be in [1, {app_api.STEPS_LIMIT}], got {max_steps}")
    handler = type("Handler", (Handler,), {"timeout": socket_timeout_s})
    try:
        server = RiffusionServer((host, port), handler)
    except OSError as error:
        raise listen_error(host, port, error) from None
    server.pipeline = pipeline
    server.seed_folder = Path(seed_folder)
    server.max_steps = max_steps
    server.worker = InferenceWorker(max_pending)
    server.answering, server.in_flight = threading.Condition(), 0
    return server


def close(server: RiffusionServer, grace_s: float = 5.0) -> None:
    """Cancel the model's work (it ends at its next step), give the waiting clients their 503s (up to
    `grace_s`) and free the socket. Call it once serve_forever has returned."""
    server.worker.stop()
    with server.answering:
        server.answering.wait_for(lambda: server.in_flight == 0, timeout=grace_s)
    server.server_close()


def _count(high: int):
    def parse(text: str) -> int:
        value = int(text)
        if not 1 <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [1, {high}], got {value}")
        return value

    return parse


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # serve_forever runs on this (main) thread: leave it as SIGINT does


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m riffusion.server", description="riffusion-app's inference server on Paddle",
                                     formatter_class=HelpFormatter)
    add_version(parser)
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=3013, help="0: any free port (the server says which)")
    parser.add_argument("--seed-images", help="folder of seed images and masks (default: the release's seed_images/, "
                        "else the built-in library)")
    parser.add_argument("--max-steps", type=_count(app_api.STEPS_LIMIT), default=app_api.DEFAULT_MAX_STEPS,
                        help="run at most this many denoising steps per request (requests asking more get this "
                        "many; the reply's num_inference_steps says what ran). riffusion-app gives up on a "
                        f"request after 60 s: on a slow machine set what fits (at most {app_api.STEPS_LIMIT})")
    parser.add_argument("--max-pending", type=_count(1024), default=DEFAULT_MAX_PENDING,
                        help="requests that may wait for the model; more are answered 503 with Retry-After")
    args = parser.parse_args(argv)
    quiet_third_party()
    tune_cpu_runtime()
    options = ModelOptions.from_args(args)
    options.check()
    seed_folder = seed_images.folder_for(args.checkpoint, args.seed_images)
    # the port first: one taken by another server is said now, not after minutes of loading
    server = make_server(None, args.host, args.port, seed_folder, args.max_steps, args.max_pending)
    try:
        server.pipeline = options.load()
    except BaseException as error:
        close(server)
        if isinstance(error, ValueError):
            raise InputError(str(error)) from None
        raise
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        print(f"serving riffusion on http://{args.host}:{server.server_port}/run_inference/ "
              f"(at most {args.max_steps} steps per request)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)
    finally:
        close(server)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # the server has closed everything it opened; the interpreter's teardown of Paddle's predictors
    # would add seconds (7 s measured here) to a SIGINT or SIGTERM
    os._exit(code)
