"""Interpolations of many users in shared UNet calls.

Requests that denoise alike (same step count, start step, latent size and mask use:
`PreparedInterpolation.batch_key`) run as one batch of 2 x B rows per step; each keeps its own
seeds, prompts, guidance and mask, so its image is the one it gets alone. The others run in their
own groups. A failure stays with the requests it belongs to: a request that cannot be prepared
fails alone, a failed group fails its members only.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from riffusion.pipeline import PromptInput, RiffusionPipeline


@dataclass(frozen=True)
class Interpolation:
    start: PromptInput
    end: PromptInput
    alpha: float
    init_image: Image.Image
    mask_image: Image.Image | None = None
    num_inference_steps: int = 50


def interpolate_many(pipeline: RiffusionPipeline, jobs: list[Interpolation]) -> list[Image.Image | Exception]:
    """One image per job, in order, or the exception that job met."""
    results: list[Image.Image | Exception | None] = [None] * len(jobs)
    groups: dict[tuple, list[tuple[int, object]]] = {}
    for index, job in enumerate(jobs):
        try:
            prepared = pipeline.prepare_interpolation(job.start, job.end, job.alpha, job.init_image, job.mask_image,
                                                      job.num_inference_steps)
        except Exception as error:
            results[index] = error
            continue
        groups.setdefault(prepared.batch_key, []).append((index, prepared))
    for members in groups.values():
        try:
            latents = pipeline.denoise([prepared for _, prepared in members])
        except Exception as error:
            for index, _ in members:
                results[index] = error
            continue
        for row, (index, _) in enumerate(members):
            try:
                results[index] = pipeline.decode(latents[row:row + 1])
            except Exception as error:
                results[index] = error
    return results


def infer_many(pipeline: RiffusionPipeline, requests: list, seed_folder) -> list[tuple | Exception]:
    """riffusion-app requests (`app_api.InferenceRequest`) batched: (image, audio, sample rate) per
    request, in order, or the exception that request met. Run it on the thread that owns the pipeline."""
    from riffusion import app_api
    from riffusion.audio import image_to_audio

    jobs, failed = [], {}
    for index, request in enumerate(requests):
        try:
            init_image, mask = app_api.request_images(request, seed_folder)
        except Exception as error:
            failed[index] = error
            continue
        jobs.append((index, Interpolation(request.start, request.end, request.alpha, init_image, mask,
                                          request.num_inference_steps)))
    images = dict(zip((index for index, _ in jobs), interpolate_many(pipeline, [job for _, job in jobs])))
    results = []
    for index in range(len(requests)):
        outcome = failed.get(index, images.get(index))
        if isinstance(outcome, Image.Image):
            try:
                outcome = (outcome, *image_to_audio(outcome))
            except Exception as error:
                outcome = error
        results.append(outcome)
    return results
