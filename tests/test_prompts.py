"""Prompt weighting `(text:weight)` and long prompts (up to 3 x 75 tokens), as riffusion-hobby reads them:
the parser against the hobby's documented examples, the embeddings against a straightforward reference
(one text-encoder call per 77-token chunk, weights applied by hand), on the dynamic text encoder and on
the exported static and ONNX ones, and through text-to-image and interpolation."""

import numpy as np
import paddle
import pytest

from riffusion import seed_images
from riffusion.pipeline import PromptInput, RiffusionPipeline
from riffusion.prompts import CHUNK_TOKENS, parse

APP_SAMPLE = "(caribbean:1.5) (jazz:0.3)"  # one of riffusion-app's own sample prompts
LONG = " ".join(f"{word} guitar" for word in ["funky", "slow", "jazzy", "sad", "happy", "loud"] * 14)  # 168 tokens


@pytest.fixture(scope="module")
def pipeline(paddle_library):
    return RiffusionPipeline.from_pretrained(paddle_library)


@pytest.mark.parametrize("prompt, expected", [
    (APP_SAMPLE, [("caribbean", 1.5), (" ", 1.0), ("jazz", 0.3)]),
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("jazz:1.5) drums", [("jazz:1.5) drums", 1.0)]),  # no bracket open: plain text
    ("(jazz:.) (x:1.2.3)", [("jazz:.", 1.1), (" ", 1.0), ("x:1.2.3", 1.1)]),  # not numbers: text (the hobby raises)
    ("", [("", 1.0)]),
])
def test_parse_follows_the_hobbys_syntax(prompt, expected):
    got = parse(prompt)
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected], rel=1e-12)


def reference(pipeline, pieces: list[tuple[str, float]], chunks: int) -> np.ndarray:
    """The embedding computed the long way: ids piece by piece, one encoder call per 77-token chunk,
    weights multiplied in, the mean restored."""
    tokenizer, encoder = pipeline.pipe.tokenizer, pipeline.pipe.text_encoder
    ids, weights = [], []
    for text, weight in pieces:
        piece = tokenizer(text).input_ids[1:-1]
        ids += piece
        weights += [weight] * len(piece)
    ids, weights = ids[:3 * CHUNK_TOKENS], weights[:3 * CHUNK_TOKENS]
    parts, position_weights = [], []
    for chunk in range(chunks):
        content = ids[chunk * CHUNK_TOKENS:(chunk + 1) * CHUNK_TOKENS]
        row = [tokenizer.bos_token_id] + content + [tokenizer.eos_token_id]
        row += [tokenizer.pad_token_id] * (77 - len(row))
        parts.append(encoder(paddle.to_tensor([row], dtype="int64"))[0].numpy()[0])
        chunk_weights = weights[chunk * CHUNK_TOKENS:(chunk + 1) * CHUNK_TOKENS]
        position_weights += [1.0] + chunk_weights + [1.0] * (76 - len(chunk_weights))
    embedding = np.concatenate(parts).astype(np.float64)
    weighted = embedding * np.array(position_weights)[:, None]
    return weighted * (embedding.mean() / weighted.mean())


def test_plain_prompts_embed_as_before(pipeline):
    """No weights, at most 75 tokens: exactly the plain 77-token embedding (the tokenizer's own padding)."""
    tokenizer = pipeline.pipe.tokenizer
    ids = tokenizer("jazz", padding="max_length", max_length=77, truncation=True, return_tensors="pd").input_ids
    assert np.array_equal(pipeline.embed(["jazz"])[0].numpy(), pipeline.pipe.text_encoder(ids)[0].numpy())


def test_the_apps_weighted_sample_against_the_reference(pipeline):
    got = pipeline.embed([APP_SAMPLE])[0].numpy()[0]
    expected = reference(pipeline, [("caribbean", 1.5), (" ", 1.0), ("jazz", 0.3)], chunks=1)
    error = np.abs(got - expected).max()
    print(f"weighted app sample: max abs error {error:.2e} against the reference")
    assert got.shape == (77, 32) and error < 1e-5
    assert np.abs(got - pipeline.embed(["caribbean jazz"])[0].numpy()[0]).max() > 1e-2  # the weights act


def test_long_weighted_prompt_and_its_negative_against_the_reference(pipeline):
    """168 tokens -> 3 chunks (231 positions); the empty negative prompt is padded to 3 chunks too."""
    prompt = f"(bass:1.3) {LONG}"
    text, negative = (e.numpy()[0] for e in pipeline.embed([prompt, ""]))
    expected = reference(pipeline, parse(prompt), chunks=3)
    expected_negative = reference(pipeline, [("", 1.0)], chunks=3)
    errors = np.abs(text - expected).max(), np.abs(negative - expected_negative).max()
    print(f"long weighted prompt: max abs error {errors[0]:.2e}, its negative {errors[1]:.2e}")
    assert text.shape == negative.shape == (231, 32) and max(errors) < 1e-5


def test_prompts_past_three_chunks_are_cut(pipeline):
    long = pipeline.embed([LONG + " " + LONG])[0].numpy()[0]
    assert long.shape == (231, 32)
    assert np.abs(long - reference(pipeline, parse(LONG + " " + LONG), chunks=3)).max() < 1e-5


@pytest.mark.parametrize("runtime", ["static", "onnx"])
def test_exported_text_encoders_embed_weighted_long_prompts_like_the_dynamic_one(pipeline, paddle_library,
                                                                                 exported, runtime):
    """Within the exported text encoder's tolerance (1e-4, export.specs)."""
    from export.runtime import TextEncoderRuntime

    folder, _ = exported
    other = RiffusionPipeline.from_pretrained(paddle_library, exported=folder, runtime=runtime)
    assert isinstance(other.pipe.text_encoder, TextEncoderRuntime)
    prompts = [f"(bass:1.3) {LONG}", APP_SAMPLE, "", "[quiet] noise"]
    errors = [np.abs(a.numpy() - b.numpy()).max() for a, b in zip(pipeline.embed(prompts), other.embed(prompts))]
    print(f"{runtime} text encoder against dynamic: max abs error {max(errors):.2e}")
    assert max(errors) < 1e-4
    seed = seed_images.load("og_beat").resize((64, 64))
    latents = other.interpolate_latents(PromptInput(prompts[0], seed=1), PromptInput(APP_SAMPLE), 0.5, seed,
                                        num_inference_steps=2).numpy()  # the exported UNet takes 231 positions
    assert latents.shape == (1, 4, 8, 8) and np.isfinite(latents).all()


def test_text_to_image_and_interpolation_take_weighted_and_long_prompts(pipeline):
    """The weights change the image; a long start prompt interpolates with a short end prompt (the
    hobby's torch code cannot lerp 231 positions with 77); alpha 0 is the start prompt alone."""
    from PIL import Image

    def image(prompt):
        return np.asarray(pipeline.text_to_image(prompt, seed=3, num_inference_steps=3, width=64, height=64))

    weighted = image(APP_SAMPLE)
    assert np.array_equal(weighted, image(APP_SAMPLE)) and not np.array_equal(weighted, image("caribbean jazz"))
    seed = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    start, end = PromptInput(f"(bass:1.3) {LONG}", seed=1), PromptInput(APP_SAMPLE, seed=2)
    mixed = pipeline.interpolate_latents(start, end, 0.5, seed, num_inference_steps=3).numpy()
    only_start = pipeline.interpolate_latents(start, PromptInput("x", seed=2), 0.0, seed, num_inference_steps=3).numpy()
    at_start = pipeline.interpolate_latents(start, end, 0.0, seed, num_inference_steps=3).numpy()
    assert np.isfinite(mixed).all() and not np.allclose(mixed, at_start, atol=1e-3)
    assert np.allclose(at_start, only_start, atol=1e-5)
