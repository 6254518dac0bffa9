"""Batching across users: requests that share UNet calls get what they get alone (UNet parity tolerance
1e-4 on the latents), each with its own seeds, prompts, guidance and mask; requests that cannot share
a call run in their own group; one bad request fails alone."""

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from riffusion.batching import Interpolation, interpolate_many
from riffusion.pipeline import PromptInput, RiffusionPipeline

STEPS = 4
TOLERANCE = 1e-4  # the UNet's export parity tolerance (optimum's), absolute


@pytest.fixture(scope="module")
def pipeline(paddle_library):
    return RiffusionPipeline.from_pretrained(paddle_library)


@pytest.fixture(scope="module")
def seed_image():
    return Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def mask():
    mask = Image.new("L", (64, 64), 255)
    mask.paste(0, (0, 0, 32, 64))
    return mask


def users(seed_image, mask=None):
    """Four users' requests that differ in everything a batch lets differ."""
    return [
        Interpolation(PromptInput("jazz", seed=1), PromptInput("rock", seed=2), 0.0, seed_image, mask, STEPS),
        Interpolation(PromptInput("church bells", seed=42, guidance=7), PromptInput("funk", seed=7, guidance=12.0),
                      0.35, seed_image, mask, STEPS),
        Interpolation(PromptInput("piano", seed=5, negative_prompt="drums"), PromptInput("piano", seed=6), 0.8,
                      seed_image, mask, STEPS),
        Interpolation(PromptInput("a", seed=2**32 - 1, guidance=1.5), PromptInput("b", seed=0, guidance=0.5), 1.0,
                      seed_image, mask, STEPS),
    ]


def prepare(pipeline, job):
    return pipeline.prepare_interpolation(job.start, job.end, job.alpha, job.init_image, job.mask_image,
                                          job.num_inference_steps)


class OneRequestAtATimeUNet:
    """The UNet called on each request's own two rows (unconditional, text), as that request alone calls
    it, its outputs put back in the batch's layout. With `compare`, it returns the real batched call's
    output and records, per call, its max abs and relative difference from the one-at-a-time output."""

    def __init__(self, unet, compare: bool):
        self.unet, self.compare, self.differences = unet, compare, []

    def __getattr__(self, name):
        return getattr(self.unet, name)

    def __call__(self, sample, timestep, encoder_hidden_states):
        import paddle

        rows = sample.shape[0] // 2
        pairs = [self.unet(paddle.concat([sample[i:i + 1], sample[rows + i:rows + i + 1]]), timestep,
                           encoder_hidden_states=paddle.concat([encoder_hidden_states[i:i + 1],
                                                                encoder_hidden_states[rows + i:rows + i + 1]])).sample
                 for i in range(rows)]
        one_at_a_time = paddle.concat([pair[0:1] for pair in pairs] + [pair[1:2] for pair in pairs])
        if not self.compare:
            return SimpleNamespace(sample=one_at_a_time)
        batched = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states)
        error = float((batched.sample - one_at_a_time).abs().max())
        self.differences.append((error, error / float(one_at_a_time.abs().max())))
        return batched


def test_batched_latents_equal_each_request_alone(pipeline, seed_image, mask):
    """Three facts make "batched == alone": (1) with a UNet that computes each request's rows as it does
    alone, the batched loop gives each request exactly its own latents (guidance, noise, mask and the
    scheduler all stay per row); (2) with the real UNet, a request's rows do not depend on who else is
    in the batch: bit for bit what it gets in a batch of the same size filled with itself; (3) what the
    batch size alone changes: Paddle's CPU GEMMs round differently at another row count (1 ulp in the
    UNet's first linear layer), which the tiny random UNet grows to a few 1e-4 of its output per call
    (its static export differs from it by 1.1e-4 on the same inputs) and, like any UNet noise, more
    over the denoising loop with guidance 7 (see test_pipeline's NoisyUNet)."""
    jobs = users(seed_image, mask)
    prepared = [prepare(pipeline, job) for job in jobs]
    alone = np.concatenate([pipeline.denoise([item]).numpy() for item in prepared])
    unet = pipeline.pipe.unet
    try:
        pipeline.pipe.unet = OneRequestAtATimeUNet(unet, compare=False)
        exact = pipeline.denoise(prepared).numpy()
        pipeline.pipe.unet = comparing = OneRequestAtATimeUNet(unet, compare=True)
        batched = pipeline.denoise(prepared).numpy()
    finally:
        pipeline.pipe.unet = unet
    steps_run = len(pipeline.pipe.scheduler.timesteps) - prepared[0].t_start
    worst, worst_relative = max(comparing.differences)
    print(f"4 masked requests: latents with each request's own UNet rows vs alone: max abs error "
          f"{np.abs(exact - alone).max():.1e}; real batched UNet call vs one request at a time over {steps_run} "
          f"steps: max abs error {worst:.1e} (relative {worst_relative:.1e}); end to end {np.abs(batched - alone).max():.1e}")
    assert exact.shape == (4, 4, 8, 8)
    assert np.array_equal(exact, alone)
    for row in (0, 2):
        item = prepared[row]
        assert np.array_equal(batched[row], pipeline.denoise([item] * len(prepared)).numpy()[row])
    assert len(comparing.differences) == steps_run > 1
    assert worst_relative <= 1e-3
    # four different answers: nothing of one request leaks into another
    assert min(np.abs(alone[i] - alone[j]).max() for i in range(4) for j in range(i)) > 1e-2


def test_interpolate_many_groups_by_what_can_share_a_call_and_keeps_order(pipeline, seed_image, mask):
    """Seven requests in four groups (mask or not, another denoising strength, another step count) come
    back in order, each the image it gets alone (bit for bit with each request's own UNet rows, so that
    only the grouping, order and decoding are under test here)."""
    jobs = users(seed_image)
    jobs.insert(1, Interpolation(PromptInput("x", seed=3), PromptInput("y", seed=4), 0.5, seed_image, mask, STEPS))
    jobs.insert(3, Interpolation(PromptInput("x", seed=3, denoising=0.5), PromptInput("y", seed=4, denoising=0.5),
                                 0.5, seed_image, None, STEPS))  # fewer steps run: another group
    jobs.append(Interpolation(PromptInput("x"), PromptInput("y"), 0.5, seed_image, None, STEPS + 1))
    assert len({prepare(pipeline, job).batch_key for job in jobs}) == 4
    unet = pipeline.pipe.unet
    try:
        pipeline.pipe.unet = OneRequestAtATimeUNet(unet, compare=False)
        images = interpolate_many(pipeline, jobs)
    finally:
        pipeline.pipe.unet = unet
    for job, image in zip(jobs, images):
        alone = pipeline.interpolate(job.start, job.end, job.alpha, job.init_image, job.mask_image,
                                     job.num_inference_steps)
        assert image.size == (64, 64)
        assert np.array_equal(np.asarray(image), np.asarray(alone))


def test_a_bad_request_fails_alone(pipeline, seed_image):
    good = users(seed_image)[:2]
    bad = Interpolation(PromptInput("x"), PromptInput("y"), 1.5, seed_image, None, STEPS)
    results = interpolate_many(pipeline, [good[0], bad, good[1]])
    assert isinstance(results[1], ValueError) and "alpha must be in [0, 1]" in str(results[1])
    assert all(isinstance(result, Image.Image) for result in (results[0], results[2]))


def test_denoise_refuses_requests_that_cannot_share_a_call(pipeline, seed_image):
    four, five = (prepare(pipeline, Interpolation(PromptInput("x"), PromptInput("y"), 0.5, seed_image, None, steps))
                  for steps in (4, 5))
    with pytest.raises(ValueError, match="one batch needs one step count"):
        pipeline.denoise([four, five])
