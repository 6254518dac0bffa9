"""riffusion-app's contract without a socket or a model (riffusion.app_api, shared by the stdlib server
and the Ray Serve app): every value the app can send from its URL parameters is parsed as decided
against riffusion-hobby, non-finite numbers are refused, and replies carry CORS and exact bytes."""

import base64
import io
import json

import numpy as np
import pytest
import soundfile
from PIL import Image

from riffusion import app_api, seed_images
from riffusion.app_api import BadRequest, parse_request

APP_BODY = {  # as riffusion-app's ModelInference.tsx builds it, serialised by JSON.stringify
    "alpha": 0.25, "num_inference_steps": 50, "seed_image_id": "og_beat", "mask_image_id": None,
    "start": {"prompt": "church bells", "seed": 3, "denoising": 0.75, "guidance": 7},
    "end": {"prompt": "church bells", "seed": 4, "denoising": 0.75, "guidance": 7},
}


def parse(max_steps=app_api.DEFAULT_MAX_STEPS, **changes):
    body = json.loads(json.dumps(APP_BODY))
    for key, value in changes.items():
        part, _, field = key.partition("__")
        if field:
            body[part][field] = value
        else:
            body[part] = value
    return parse_request(json.dumps(body).encode(), seed_images.FOLDER, max_steps)


def test_the_apps_default_request_parses_as_sent():
    request = parse()
    assert (request.alpha, request.num_inference_steps, request.seed_image_id, request.mask_image_id) == (
        0.25, 50, "og_beat", None)
    assert (request.start.seed, request.end.seed, request.start.guidance, request.start.denoising) == (3, 4, 7.0, 0.75)


@pytest.mark.parametrize("sent, used", [
    (1.0000000000000002, 1.0),  # 0.25 + 15 steps of ?alphaVelocity=0.05
    (1.0009, 1.0),  # the app rolls over only past 1 + 1e-3
    (-1e-17, 0.0),
    (0.7500000000000001, 0.7500000000000001),
])
def test_alpha_within_the_apps_rounding_is_clamped(sent, used):
    assert parse(alpha=sent).alpha == used


@pytest.mark.parametrize("mask", [None, ""])
def test_no_mask_is_null_or_the_empty_string_the_app_sends_for_none(mask):
    assert parse(mask_image_id=mask).mask_image_id is None


@pytest.mark.parametrize("sent, used", [
    (-1, 2**32 - 1), (2**32 + 5, 5), (5 - 2**32, 5), (2**64 - 1, 2**32 - 1), (-(2**63), 0), (4294967295, 4294967295),
])
def test_seeds_torch_takes_are_reduced_as_its_generator_sees_them(sent, used):
    assert parse(start__seed=sent).start.seed == used


@pytest.mark.parametrize("sent, used", [(1.5, 1.0), (-0.3, 0.0), (0.95, 0.95), (1, 1.0)])
def test_denoising_is_clamped_to_what_the_step_arithmetic_can_use(sent, used):
    assert parse(end__denoising=sent).end.denoising == used


@pytest.mark.parametrize("guidance", [80, 1000, 0.5, -3])
def test_guidance_past_50_and_below_1_is_accepted(guidance):
    assert parse(start__guidance=guidance).start.guidance == guidance


def test_step_count_is_capped_at_the_servers_maximum():
    assert parse(max_steps=10).num_inference_steps == 10
    assert parse(num_inference_steps=3, max_steps=10).num_inference_steps == 3
    assert parse(num_inference_steps=10**30, max_steps=10).num_inference_steps == 10


@pytest.mark.parametrize("raw, message", [
    (b'{"alpha": NaN}', "body holds NaN: numbers must be finite"),
    (b'{"alpha": Infinity}', "body holds Infinity"),
    (b'{"alpha": 0.5, "start": {"prompt": "a", "seed": 1, "guidance": -Infinity}}', "body holds -Infinity"),
    (b'{"alpha": 1e400}', "alpha must be a finite number"),
    (b"[" * 30000 + b"]" * 30000, "body is not JSON"),
    (b"\xff\xfe{", "body is not JSON"),
    (b"x" * (app_api.MAX_BODY_BYTES + 1), "more than 65536"),
])
def test_non_finite_and_malformed_bodies_are_refused(raw, message):
    with pytest.raises(BadRequest) as error:
        parse_request(raw)
    assert message in str(error.value)


@pytest.mark.parametrize("changes, message", [
    ({"alpha": 1.5}, "alpha must be in [0, 1], got 1.5"),
    ({"alpha": -0.05}, "alpha must be in [0, 1], got -0.05"),
    ({"alpha": None}, "alpha must be a number, got None"),  # JSON.stringify(NaN) is null
    ({"alpha": "0.5"}, "alpha must be a number, got '0.5'"),
    ({"num_inference_steps": 0}, "num_inference_steps must be at least 1, got 0"),
    ({"num_inference_steps": None}, "num_inference_steps must be an integer, got None"),
    ({"num_inference_steps": 2.5}, "num_inference_steps must be an integer"),
    ({"start__seed": 2**64}, "start.seed must be in [-2**63, 2**64 - 1]"),
    ({"start__seed": -(2**63) - 1}, "start.seed must be in [-2**63, 2**64 - 1]"),
    ({"end__seed": 7.0}, "end.seed must be an integer, got 7.0"),
    ({"end__seed": True}, "end.seed must be an integer, got True"),
    ({"end__guidance": 1000.5}, "end.guidance must be at most 1000"),
    ({"start__denoising": None}, "start.denoising must be a number, got None"),
    ({"end__prompt": 3}, "end.prompt must be a string, got 3"),
    ({"start": None}, "start must be an object"),
    ({"seed_image_id": "../../etc/passwd"}, "unknown seed_image_id '../../etc/passwd'"),
    ({"mask_image_id": "og_beat"}, "unknown mask_image_id 'og_beat'"),
])
def test_values_outside_the_contract_are_named(changes, message):
    with pytest.raises(BadRequest) as error:
        parse(**changes)
    assert message in str(error.value)


def test_error_reply_is_json_with_cors_and_retry_after():
    reply = app_api.error_reply(503, "busy", retry_after_s=7)
    headers = dict(reply.headers)
    assert reply.status == 503 and json.loads(reply.body) == {"error": "busy"}
    assert headers["Access-Control-Allow-Origin"] == "*" and headers["Content-Type"] == "application/json"
    assert headers["Retry-After"] == "7"


def test_inference_reply_carries_a_jpeg_and_an_mp3():
    image = Image.fromarray((np.random.default_rng(0).random((512, 64, 3)) * 255).astype(np.uint8))
    audio = (np.sin(np.arange(44100) * 2 * np.pi * 440 / 44100) * 1.5).astype(np.float32)[None]
    reply = app_api.inference_reply(image, audio, 44100, parse(max_steps=20))
    body = json.loads(reply.body)
    assert reply.status == 200 and body["duration_s"] == 1.0 and body["num_inference_steps"] == 20
    jpeg = base64.b64decode(body["image"].removeprefix("data:image/jpeg;base64,"))
    assert Image.open(io.BytesIO(jpeg)).size == (64, 512)
    decoded, rate = soundfile.read(io.BytesIO(base64.b64decode(body["audio"].removeprefix("data:audio/mpeg;base64,"))))
    assert rate == 44100 and abs(len(decoded) - 44100) < 2000 and np.abs(decoded).max() < 1.0
