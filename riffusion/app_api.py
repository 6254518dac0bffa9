"""riffusion-app's inference API, whatever carries it (the stdlib server here, a Ray Serve app):
the request parser, the inference call, and every reply's status, headers and bytes.

    request = parse_request(raw_body, seed_folder, max_steps)      # BadRequest -> error_reply(400, ...)
    image, audio, rate = infer(pipeline, request, seed_folder)      # on the thread that owns the pipeline
    reply = inference_reply(image, audio, rate, request)            # Reply(status, headers, body)

What the app sends and what we do with it (riffusion-hobby, the app's own server, answers all of it):
- "alpha": in [0, 1]; the app steps it by `alphaVelocity` and rolls over past 1 + 1e-3, so values up to
  ALPHA_TOLERANCE outside are float rounding (0.25 + 15 * 0.05 = 1.0000000000000002) and are clamped.
  Further out the hobby extrapolates the prompts; we refuse it (the app sends that only with an
  alphaVelocity <= 0 or > 1.75, where it never finishes a transition).
- "seed": any integer torch's generator takes, [-2**63, 2**64 - 1]. The hobby's CPU generator (and
  Paddle's) sees it modulo 2**32, so it is reduced so: 5, 5 + 2**32 and 5 - 2**32 draw the same noise.
- "denoising": any finite number, clamped to [0, 1]. The hobby's step arithmetic already treats
  values above 1 as 1; below 0 it returns noise.
- "guidance": any finite number up to MAX_GUIDANCE; <= 1 means no classifier-free guidance, as in the
  hobby. Past MAX_GUIDANCE every pixel saturates: such a value is a mistake, not a setting.
- "num_inference_steps": an integer >= 1 (the hobby fails below), clamped to the operator's max_steps
  (at most STEPS_LIMIT; the hobby fails at 1000); the reply's "num_inference_steps" says what ran.
- "mask_image_id": null or "" (the app's `?maskImageId=none`) is no mask.
- NaN and Infinity (which Python's JSON reader would take) and numbers that overflow to them are
  refused, as are unknown seed or mask image ids; unknown keys are ignored, as the hobby does.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from riffusion import seed_images
from riffusion.audio import image_to_audio, without_clipping, write_audio
from riffusion.errors import InputError

if TYPE_CHECKING:
    from riffusion.pipeline import PromptInput

MAX_BODY_BYTES = 64 * 1024
DEFAULT_MAX_STEPS = 100  # twice the app's 50; an operator on a slow machine sets fewer (--max-steps)
# the most an operator may allow: PNDM past a few hundred steps changes nothing audible, and at 1000 it
# indexes past its 1000 training timesteps (steps_offset 1) and fails
STEPS_LIMIT = 500
ALPHA_TOLERANCE = 1e-3  # the app's own rollover tolerance
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MAX_GUIDANCE = 1000.0

CORS_HEADERS = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
    ("Access-Control-Allow-Headers", "Content-Type"),
)


class BadRequest(InputError):
    """The body is not a request we serve; the message names the field and the value."""


@dataclass(frozen=True)
class InferenceRequest:
    alpha: float
    num_inference_steps: int  # what will run: the requested count capped at the server's max_steps
    seed_image_id: str
    mask_image_id: str | None
    start: PromptInput
    end: PromptInput


@dataclass(frozen=True)
class Reply:
    """One HTTP answer: every transport writes exactly these headers and bytes."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


# --- parsing ---------------------------------------------------------------------------------------


def _refuse_constant(name: str):
    raise BadRequest(f"body holds {name}: numbers must be finite")


def _number(body: dict, key: str, default=None, where: str = "") -> float:
    value = body.get(key, default)
    # the app sends 7 where 7.0 is meant: integers are numbers
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{where}{key} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise BadRequest(f"{where}{key} must be a finite number, got {body.get(key)!r}")
    return value


def _integer(body: dict, key: str, default=None, where: str = "") -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{where}{key} must be an integer, got {value!r}")
    return value


def _prompt(body: dict, key: str) -> PromptInput:
    from riffusion.pipeline import PromptInput  # imports Paddle: only once a command has quieted its logs

    part = body.get(key)
    if not isinstance(part, dict):
        raise BadRequest(f"{key} must be an object with a prompt and a seed, got {part!r}")
    where = f"{key}."
    prompt = part.get("prompt")
    if not isinstance(prompt, str):
        raise BadRequest(f"{where}prompt must be a string, got {prompt!r}")
    negative = part.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise BadRequest(f"{where}negative_prompt must be a string or null, got {negative!r}")
    seed = _integer(part, "seed", where=where)
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise BadRequest(f"{where}seed must be in [-2**63, 2**64 - 1], got {seed}")
    guidance = _number(part, "guidance", 7.0, where)
    if guidance > MAX_GUIDANCE:
        raise BadRequest(f"{where}guidance must be at most {MAX_GUIDANCE:g}, got {guidance!r}")
    return PromptInput(
        prompt=prompt,
        seed=seed % 2**32,
        negative_prompt=negative,
        denoising=min(max(_number(part, "denoising", 0.75, where), 0.0), 1.0),
        guidance=guidance,
    )


def parse_request(raw: bytes, seed_folder: Path = seed_images.FOLDER,
                  max_steps: int = DEFAULT_MAX_STEPS) -> InferenceRequest:
    """The validated request from a POST /run_inference/ body, or BadRequest naming what is wrong."""
    if not 1 <= max_steps <= STEPS_LIMIT:
        raise ValueError(f"max_steps must be in [1, {STEPS_LIMIT}], got {max_steps}")
    if len(raw) > MAX_BODY_BYTES:
        raise BadRequest(f"body is {len(raw)} bytes, more than {MAX_BODY_BYTES}")
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"body is not JSON: {str(error)[:200]}") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    seeds, masks = seed_images.seed_ids(seed_folder), seed_images.mask_ids(seed_folder)
    seed_id = body.get("seed_image_id", "og_beat")
    if seed_id not in seeds:
        raise BadRequest(f"unknown seed_image_id {seed_id!r} (known: {', '.join(seeds)})")
    mask_id = body.get("mask_image_id") or None  # the app sends "" for ?maskImageId=none
    if mask_id is not None and mask_id not in masks:
        raise BadRequest(f"unknown mask_image_id {mask_id!r} (known: {', '.join(masks)})")
    alpha = _number(body, "alpha")
    if not -ALPHA_TOLERANCE <= alpha <= 1 + ALPHA_TOLERANCE:
        raise BadRequest(f"alpha must be in [0, 1], got {alpha!r}")
    steps = _integer(body, "num_inference_steps", 50)
    if steps < 1:
        raise BadRequest(f"num_inference_steps must be at least 1, got {steps}")
    return InferenceRequest(
        alpha=min(max(alpha, 0.0), 1.0),
        num_inference_steps=min(steps, max_steps),
        seed_image_id=seed_id,
        mask_image_id=mask_id,
        start=_prompt(body, "start"),
        end=_prompt(body, "end"),
    )


# --- inference -------------------------------------------------------------------------------------


def infer(pipeline, request: InferenceRequest, seed_folder: Path = seed_images.FOLDER,
          on_step: Callable[[int, int], None] | None = None) -> tuple[Image.Image, np.ndarray, int]:
    """(spectrogram image, audio, sample rate) for a parsed request. Run it on the one thread that owns
    the pipeline: Paddle Inference predictors fail when called from a different thread each time.
    `on_step` goes to the denoising loop (raise from it to stop)."""
    init_image, mask = request_images(request, seed_folder)
    image = pipeline.interpolate(request.start, request.end, request.alpha, init_image, mask,
                                 request.num_inference_steps, on_step=on_step)
    audio, sample_rate = image_to_audio(image)
    return image, audio, sample_rate


def request_images(request: InferenceRequest, seed_folder: Path) -> tuple[Image.Image, Image.Image | None]:
    """The request's seed image and its mask (None without one); riffusion.batching uses it too."""
    init_image = _image(request.seed_image_id, seed_folder)
    return init_image, _image(request.mask_image_id, seed_folder) if request.mask_image_id else None


def _image(image_id: str, seed_folder: Path) -> Image.Image:
    try:
        image = seed_images.load(image_id, seed_folder)
    except (OSError, ValueError) as error:  # PIL's errors for damaged files
        raise OSError(f"seed image {image_id!r} is unreadable: {error}") from error
    return image


# --- replies ---------------------------------------------------------------------------------------


def json_reply(status: int, payload: dict, extra_headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    body = json.dumps(payload).encode()
    return Reply(int(status), (("Content-Type", "application/json"),) + CORS_HEADERS + extra_headers, body)


def error_reply(status: int, message: str, retry_after_s: int | None = None) -> Reply:
    extra = () if retry_after_s is None else (("Retry-After", str(retry_after_s)),)
    return json_reply(status, {"error": message}, extra)


def preflight_reply() -> Reply:
    return Reply(204, CORS_HEADERS, b"")


def status_reply(seed_folder: Path = seed_images.FOLDER, max_steps: int = DEFAULT_MAX_STEPS) -> Reply:
    return json_reply(200, {"status": "ok", "seed_images": seed_images.seed_ids(seed_folder),
                            "mask_images": seed_images.mask_ids(seed_folder), "max_steps": max_steps})


def inference_reply(image: Image.Image, audio: np.ndarray, sample_rate: int, request: InferenceRequest) -> Reply:
    """riffusion-hobby's answer: the spectrogram as a JPEG data URL, the audio as an MP3 data URL, its
    duration, and the step count that ran."""
    jpeg, mp3 = io.BytesIO(), io.BytesIO()
    image.save(jpeg, format="JPEG")
    write_audio(mp3, without_clipping(audio), sample_rate, format="MP3")
    return json_reply(200, {
        "image": "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode(),
        "audio": "data:audio/mpeg;base64," + base64.b64encode(mp3.getvalue()).decode(),
        "duration_s": round(audio.shape[-1] / sample_rate, 3),
        "num_inference_steps": request.num_inference_steps,
    })
