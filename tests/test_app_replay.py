"""riffusion-app's own request sequence against the server on dynamic, static (Paddle Inference) and
ONNX components, each request on a new connection: every answer is a 200 whose JPEG and MP3 decode.

The sequence follows the app's source (riffusion-app b17ce40, pages/index.tsx and
components/ModelInference.tsx): alpha starts at 0, is reset to 0.25, then steps by `alphaVelocity`
in float arithmetic and rolls over past 1 + 1e-3 (so ?alphaVelocity=0.05 sends 1.0000000000000002);
in one prompt the end seed is seed + 1, a transition uses one seed for both ends; URL parameters give
seeds (parseInt, so negative ones too), the seed image, denoising, and the mask id ("" for `none`);
it always asks for 50 steps, and JSON.stringify writes 7 for 7.0. Paddle Inference predictors used
to fail on the second or third request of this sequence (a new thread per request)."""

import base64
import io
import json

import pytest
import requests
import soundfile
from PIL import Image

from riffusion.pipeline import RiffusionPipeline
from riffusion.server import close, make_server

PROMPTS = ("(caribbean:1.5) (jazz:0.3)", "church bells on sunday", "lo-fi beat for the holidays")


def js_json(value) -> bytes:
    """JSON as JavaScript's JSON.stringify writes it: integral numbers without a fraction."""
    def plain(item):
        if isinstance(item, dict):
            return {key: plain(inner) for key, inner in item.items()}
        if isinstance(item, float) and item.is_integer():
            return int(item)
        return item

    return json.dumps(plain(value), separators=(",", ":")).encode()


def app_requests(count: int, alpha_velocity: float = 0.25, seed: int = 3, seed_image_id: str = "og_beat",
                 mask_image_id: str | None = None, denoising: float = 0.75, guidance: float = 7.0,
                 prompts=PROMPTS) -> list[bytes]:
    alpha, state = 0.0, "SAME_PROMPT"
    start, up_next = prompts[0], list(prompts[1:])
    end = start
    bodies = []
    for number in range(count):
        transitioning = state == "TRANSITION"
        bodies.append(js_json({
            "alpha": alpha, "num_inference_steps": 50, "seed_image_id": seed_image_id, "mask_image_id": mask_image_id,
            "start": {"prompt": start, "seed": seed, "denoising": denoising, "guidance": guidance},
            "end": {"prompt": end if transitioning else start, "seed": seed if transitioning else seed + 1,
                    "denoising": denoising, "guidance": guidance},
        }))
        if number == 0:
            alpha = 0.25  # the app's reset on entering SAME_PROMPT lands while the first request runs
        alpha = alpha + alpha_velocity
        if alpha > 1 + 1e-3:
            alpha -= 1
            if state == "SAME_PROMPT":
                if up_next:
                    state, end, alpha = "TRANSITION", up_next.pop(0), 0.25
                seed += 1
            else:
                start = end
                if up_next:
                    end = up_next.pop(0)
                else:
                    state, alpha = "SAME_PROMPT", 0.25
    return bodies


SEQUENCES = {  # runtime: the app's URL parameters and how many requests it sends
    "static": dict(count=17, alpha_velocity=0.05, mask_image_id="", prompts=PROMPTS[:1]),  # ?alphaVelocity=0.05&maskImageId=none
    "onnx": dict(count=8, seed_image_id="agile", seed=808, mask_image_id="mask_top_third_75", denoising=0.95),
    "dynamic": dict(count=8, seed=-5, alpha_velocity=0.3, guidance=80.0, denoising=1.2),
}


def test_the_sequence_holds_the_values_the_app_really_sends():
    static = [json.loads(body) for body in app_requests(**SEQUENCES["static"])]
    assert [body["alpha"] for body in static][14:17] == [0.9500000000000003, 1.0000000000000002, 0.050000000000000266]
    assert static[0]["start"]["guidance"] == 7 and b'"alpha":0,' in app_requests(1)[0] and b'"guidance":7}' in app_requests(1)[0]
    onnx = [json.loads(body) for body in app_requests(**SEQUENCES["onnx"])]
    assert [(body["start"]["prompt"], body["end"]["prompt"]) for body in onnx][4:6] == [
        (PROMPTS[0], PROMPTS[1]), (PROMPTS[0], PROMPTS[1])]  # a transition: one seed at both ends
    assert onnx[5]["start"]["seed"] == onnx[5]["end"]["seed"] == 809


@pytest.mark.parametrize("runtime", list(SEQUENCES))
def test_the_apps_requests_all_get_a_jpeg_and_an_mp3(paddle_library, exported, narrow_seed_folder, runtime):
    import threading

    folder, _ = exported
    pipeline = RiffusionPipeline.from_pretrained(paddle_library, exported=folder, runtime=runtime)
    server = make_server(pipeline, "127.0.0.1", 0, narrow_seed_folder, max_steps=2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    answers = []
    try:
        for body in app_requests(**SEQUENCES[runtime]):
            # the app's route posts the body without a content type; requests opens a new connection each time
            response = requests.post(f"http://127.0.0.1:{server.server_port}/run_inference/", data=body, timeout=600)
            answers.append(response.status_code)
            assert response.status_code == 200, (len(answers), body, response.text)
            reply = response.json()
            jpeg = base64.b64decode(reply["image"].removeprefix("data:image/jpeg;base64,"))
            with Image.open(io.BytesIO(jpeg)) as image:
                assert image.format == "JPEG" and image.size == (32, 512)
                assert max(hi - lo for lo, hi in image.getextrema()) > 0
            mp3 = base64.b64decode(reply["audio"].removeprefix("data:audio/mpeg;base64,"))
            audio, rate = soundfile.read(io.BytesIO(mp3))
            assert rate == 44100 and abs(len(audio) / rate - reply["duration_s"]) < 0.06
            assert reply["duration_s"] == pytest.approx(0.31, abs=0.02) and reply["num_inference_steps"] == 2
    finally:
        server.shutdown()
        close(server)
    assert answers == [200] * SEQUENCES[runtime]["count"]
