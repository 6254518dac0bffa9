"""python -m riffusion.server --checkpoint DIR [--host 127.0.0.1] [--port 3013]

riffusion-app's inference API on Paddle: POST /run_inference/ with
  {"alpha", "num_inference_steps", "seed_image_id", "mask_image_id",
   "start": {"prompt", "seed", "denoising", "guidance", "negative_prompt"}, "end": {...}}
answers {"image": "data:image/jpeg;base64,...", "audio": "data:audio/mpeg;base64,...", "duration_s"}.
A bad body answers 400 with {"error": "..."}.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from riffusion import seed_images
from riffusion.audio import image_to_audio, without_clipping, write_audio
from riffusion.console import add_version, quiet_third_party

if TYPE_CHECKING:
    from riffusion.pipeline import PromptInput

MAX_BODY_BYTES = 64 * 1024
MAX_STEPS = 500


class BadRequest(ValueError):
    pass


def _number(body: dict, key: str, default=None, low=None, high=None, integer=False):
    value = body.get(key, default)
    kinds = (int,) if integer else (int, float)  # the web app sends 7 where 7.0 is meant
    if value is None or isinstance(value, bool) or not isinstance(value, kinds):
        raise BadRequest(f"{key!r} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise BadRequest(f"{key!r} must be in [{low}, {high}], got {value!r}")
    return value if integer else float(value)


def _prompt(body: dict, key: str) -> PromptInput:
    from riffusion.pipeline import PromptInput  # imports Paddle: only once main() has quieted its warnings

    part = body.get(key)
    if not isinstance(part, dict):
        raise BadRequest(f"{key!r} must be an object with a prompt and a seed")
    prompt = part.get("prompt")
    if not isinstance(prompt, str):
        raise BadRequest(f"{key}.prompt must be a string")
    negative = part.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise BadRequest(f"{key}.negative_prompt must be a string or null")
    return PromptInput(
        prompt=prompt,
        seed=_number(part, "seed", integer=True, low=0, high=2**32 - 1),
        negative_prompt=negative,
        denoising=_number(part, "denoising", 0.75, low=0.0, high=1.0),
        guidance=_number(part, "guidance", 7.0, low=0.0, high=50.0),
    )


def parse_request(raw: bytes, seed_folder=seed_images.FOLDER) -> dict:
    """The validated inference request, or BadRequest naming what is wrong."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(f"body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    seeds, masks = seed_images.seed_ids(seed_folder), seed_images.mask_ids(seed_folder)
    seed_id = body.get("seed_image_id", "og_beat")
    if seed_id not in seeds:
        raise BadRequest(f"unknown seed_image_id {seed_id!r} (known: {', '.join(seeds)})")
    mask_id = body.get("mask_image_id")
    if mask_id is not None and mask_id not in masks:
        raise BadRequest(f"unknown mask_image_id {mask_id!r} (known: {', '.join(masks)})")
    return {
        "alpha": _number(body, "alpha", low=0.0, high=1.0),
        "num_inference_steps": _number(body, "num_inference_steps", 50, low=1, high=MAX_STEPS, integer=True),
        "seed_image_id": seed_id,
        "mask_image_id": mask_id,
        "start": _prompt(body, "start"),
        "end": _prompt(body, "end"),
    }


def run_inference(pipeline, request: dict, lock: threading.Lock, seed_folder=seed_images.FOLDER) -> dict:
    init_image = seed_images.load(request["seed_image_id"], seed_folder)
    mask = seed_images.load(request["mask_image_id"], seed_folder) if request["mask_image_id"] else None
    with lock:  # one model, and its scheduler keeps state between steps
        image = pipeline.interpolate(request["start"], request["end"], request["alpha"], init_image, mask,
                                     request["num_inference_steps"])
    audio, sample_rate = image_to_audio(image)
    jpeg, mp3 = io.BytesIO(), io.BytesIO()
    image.save(jpeg, format="JPEG")
    write_audio(mp3, without_clipping(audio), sample_rate, format="MP3")
    return {
        "image": "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode(),
        "audio": "data:audio/mpeg;base64," + base64.b64encode(mp3.getvalue()).decode(),
        "duration_s": round(audio.shape[-1] / sample_rate, 3),
    }


class Handler(BaseHTTPRequestHandler):
    server_version = "riffusion-paddle"

    def do_OPTIONS(self):  # CORS preflight from the web app
        self._reply(HTTPStatus.NO_CONTENT, None)

    def do_GET(self):
        if self.path.rstrip("/") == "":
            self._reply(HTTPStatus.OK, {"status": "ok", "seed_images": seed_images.seed_ids(self.server.seed_folder),
                                        "mask_images": seed_images.mask_ids(self.server.seed_folder)})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}"})

    def do_POST(self):
        if self.path.rstrip("/") != "/run_inference":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY_BYTES:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": f"Content-Length must be 1..{MAX_BODY_BYTES} bytes"})
            return
        try:
            request = parse_request(self.rfile.read(length), self.server.seed_folder)
        except BadRequest as error:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            return
        self._reply(HTTPStatus.OK, run_inference(self.server.pipeline, request, self.server.lock, self.server.seed_folder))

    def _reply(self, status: HTTPStatus, payload: dict | None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Content-Type")
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def make_server(pipeline, host: str = "127.0.0.1", port: int = 3013,
                seed_folder=seed_images.FOLDER) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), Handler)
    server.pipeline = pipeline
    server.seed_folder = seed_folder
    server.lock = threading.Lock()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m riffusion.server", description="riffusion-app's inference server on Paddle",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_version(parser)
    parser.add_argument("--checkpoint", required=True, help="a ppdiffusers library made by `python -m convert` "
                        "(a release folder brings its own export/ and seed_images/)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3013)
    parser.add_argument("--export", help="a folder made by python -m export: run its static or ONNX programs")
    parser.add_argument("--runtime", choices=("dynamic", "static", "onnx"),
                        help="default: the fastest the export holds (onnx, else static), dynamic without --export")
    parser.add_argument("--seed-images", help="folder of seed images and masks (default: the release's seed_images/, "
                        "else the built-in library)")
    args = parser.parse_args(argv)
    quiet_third_party()
    from pathlib import Path

    from riffusion.layout import SEED_FOLDER

    if not (Path(args.checkpoint) / "model_index.json").is_file():
        print(f"error: {args.checkpoint}: not a converted library (no model_index.json)", file=sys.stderr)
        return 1
    seed_folder = Path(args.seed_images) if args.seed_images else Path(args.checkpoint) / SEED_FOLDER
    if not seed_images.seed_ids(seed_folder):
        if args.seed_images:
            print(f"error: {seed_folder}: no seed images (*.png) there", file=sys.stderr)
            return 1
        seed_folder = seed_images.FOLDER
    from riffusion.pipeline import RiffusionPipeline

    pipeline = RiffusionPipeline.from_pretrained(args.checkpoint, exported=args.export, runtime=args.runtime)
    server = make_server(pipeline, args.host, args.port, seed_folder)
    print(f"serving riffusion on http://{args.host}:{server.server_port}/run_inference/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
