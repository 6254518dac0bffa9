"""Riffusion on ppdiffusers: text to spectrogram image, and interpolation between two prompts/seeds.

Interpolation follows riffusion-hobby's pipeline (riffusion/riffusion_pipeline.py there): the text embeddings, guidance
and denoising strength are lerped at `alpha`, the two seeds' noises slerped, and the result denoised
img2img from a seed image, optionally keeping the part a mask image marks black. Prompts may carry
weights, "(caribbean:1.5) (jazz:0.3)", and run up to 3 x 75 tokens (riffusion.prompts).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import paddle
from PIL import Image
from tqdm import tqdm

from riffusion.model_options import SCHEDULERS


@dataclass(frozen=True)
class PromptInput:
    prompt: str
    seed: int = 0
    negative_prompt: str | None = None
    denoising: float = 0.75
    guidance: float = 7.0


def lerp(a, b, alpha: float):
    return a + (b - a) * alpha


def slerp(alpha: float, v0: np.ndarray, v1: np.ndarray, dot_threshold: float = 0.9995) -> np.ndarray:
    """Spherical interpolation of two noise tensors; nearly parallel ones are lerped."""
    a, b = v0.astype(np.float64), v1.astype(np.float64)
    dot = float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    if abs(dot) > dot_threshold:
        return lerp(a, b, alpha).astype(v0.dtype)
    theta = np.arccos(dot)
    mixed = (np.sin(theta * (1 - alpha)) * a + np.sin(theta * alpha) * b) / np.sin(theta)
    return mixed.astype(v0.dtype)


@dataclass(frozen=True)
class PreparedInterpolation:
    """One interpolation request ready to denoise: its rows of a (possibly batched) UNet call."""

    text: paddle.Tensor  # [1, tokens, dim], lerped
    uncond: paddle.Tensor
    guidance: float
    init_latents: paddle.Tensor  # [1, C, h, w]: the seed image's latents, kept where the mask says so
    noise: paddle.Tensor
    latents: paddle.Tensor  # init_latents noised to the first step
    mask: paddle.Tensor | None
    num_inference_steps: int
    t_start: int  # the first step of the schedule that runs (from the denoising strength)

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share every UNet call (`RiffusionPipeline.denoise`)."""
        return self.num_inference_steps, self.t_start, tuple(self.latents.shape), self.mask is None


def make_scheduler(library_scheduler, name: str | None):
    """The scheduler called `name` (see SCHEDULERS), configured from the library's own scheduler's config."""
    import ppdiffusers

    name = name or "library"
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r} (choose from {', '.join(SCHEDULERS)})")
    if SCHEDULERS[name] is None:
        return library_scheduler
    class_name, overrides = SCHEDULERS[name]
    return getattr(ppdiffusers, class_name).from_config(library_scheduler.config, **overrides)


def _holds(exported, *components: str) -> bool:
    """Whether an export folder holds programs of every one of `components`."""
    from pathlib import Path

    return exported is not None and all((Path(exported) / name).is_dir() for name in components)


class RiffusionPipeline:
    """Wraps a ppdiffusers StableDiffusionPipeline (its components may be static or ONNX runtimes)."""

    def __init__(self, pipe, progress: bool = False):
        self.pipe = pipe
        self.progress = progress
        self.pipe.set_progress_bar_config(disable=not progress)
        # The app steps alpha between the same prompts request after request: encode them once.
        self._encoded = functools.lru_cache(maxsize=32)(self._encode)

    @classmethod
    def from_pretrained(cls, checkpoint: str, progress: bool = False, exported: str | None = None,
                        runtime: str | None = None, precision: str | None = None,
                        scheduler: str | None = None, lora: str | None = None,
                        lora_scale: float = 1.0) -> "RiffusionPipeline":
        """`exported`: a folder made by `python -m export`; for a release folder (`convert --release`) its
        own `export/` is used when `exported` is not given. Its UNet, text encoder and VAE then run in
        `runtime` ("onnx": onnxruntime, "static": Paddle Inference) at `precision` ("fp32", "bf16": static
        on CPUs with AVX512-BF16/AMX, "int8": onnx UNet); parts the export lacks stay dynamic. Left out,
        both are those of the fastest variant the export timed when it was made (its report's `variants`)
        that this CPU runs. Without an export, or with runtime="dynamic", everything runs in Paddle
        dynamic mode. `scheduler`: see SCHEDULERS (default: the library's own). `lora`: a LoRA folder or
        file (riffusion.train, convert.lora), fused into the dynamic UNet and text encoder at `lora_scale`
        (0 gives the base model exactly)."""
        from export.runtime import load_pipeline

        exported, runtime, precision = cls.plan(checkpoint, exported, runtime, precision, lora)

        def backend(*components: str) -> str:
            return runtime if _holds(exported, *components) else "dynamic"

        # Spectrograms are not photographs: riffusion-hobby runs without the NSFW image filter too.
        options = {"precision": precision} if runtime != "dynamic" else {}
        pipe = load_pipeline(checkpoint, exported, unet=backend("unet"), text_encoder=backend("text_encoder"),
                             vae=backend("vae_encoder", "vae_decoder"), **options)
        if lora is not None:
            from riffusion import lora as adapters

            adapters.apply(pipe, lora, lora_scale)
        pipe.scheduler = make_scheduler(pipe.scheduler, scheduler)
        pipeline = cls(pipe, progress)
        pipeline.runtime, pipeline.precision = runtime, precision
        return pipeline

    @staticmethod
    def plan(checkpoint: str, exported: str | None = None, runtime: str | None = None, precision: str | None = None,
             lora: str | None = None) -> tuple[str | None, str, str]:
        """(export folder, runtime, precision) that from_pretrained loads, checked without loading any
        weights: InputError (ExportError) for a combination that cannot run."""
        from pathlib import Path

        from export.runtime import choose_variant
        from riffusion.errors import InputError
        from riffusion.layout import EXPORT_FOLDER

        if runtime is None and lora is not None:
            runtime = "dynamic"  # a LoRA is fused into the dynamic models only
        if exported is None and runtime != "dynamic" and (Path(checkpoint) / EXPORT_FOLDER / "unet").is_dir():
            exported = Path(checkpoint) / EXPORT_FOLDER
        if runtime == "dynamic" or exported is None:
            if precision not in (None, "fp32"):
                raise InputError(f"precision {precision} needs an export (--export): Paddle dynamic mode runs fp32")
            return None, "dynamic", "fp32"
        runtime, precision = choose_variant(exported, runtime, precision)
        if lora is not None and (_holds(exported, "unet") or _holds(exported, "text_encoder")):
            raise InputError("--lora needs the dynamic runtime (--runtime dynamic); for static or ONNX programs "
                             "fuse the LoRA into a library (python -m convert.lora --fuse) and export that")
        return exported, runtime, precision

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def text_to_image(self, prompt: str, *, negative_prompt: str | None = None, seed: int = 0,
                      num_inference_steps: int = 50, guidance: float = 7.0, width: int = 512,
                      height: int = 512) -> Image.Image:
        """prompt and negative_prompt: weighted and long prompts as riffusion.prompts reads them."""
        generator = paddle.Generator().manual_seed(seed)
        text, uncond = self.embed([prompt, negative_prompt or ""])
        return self.pipe(prompt_embeds=text, negative_prompt_embeds=uncond, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance, width=width, height=height, generator=generator).images[0]

    def interpolate(self, start: PromptInput, end: PromptInput, alpha: float, init_image: Image.Image,
                    mask_image: Image.Image | None = None, num_inference_steps: int = 50,
                    on_step: Callable[[int, int], None] | None = None) -> Image.Image:
        latents = self.interpolate_latents(start, end, alpha, init_image, mask_image, num_inference_steps, on_step)
        return self.decode(latents)

    @paddle.no_grad()
    def interpolate_latents(self, start: PromptInput, end: PromptInput, alpha: float, init_image: Image.Image,
                            mask_image: Image.Image | None = None, num_inference_steps: int = 50,
                            on_step: Callable[[int, int], None] | None = None) -> paddle.Tensor:
        """`on_step(done, total)` is called before each denoising step; an exception it raises stops the
        work there (the server's way to drop a request whose client has gone)."""
        prepared = self.prepare_interpolation(start, end, alpha, init_image, mask_image, num_inference_steps)
        return self.denoise([prepared], on_step)

    @paddle.no_grad()
    def prepare_interpolation(self, start: PromptInput, end: PromptInput, alpha: float, init_image: Image.Image,
                              mask_image: Image.Image | None = None,
                              num_inference_steps: int = 50) -> PreparedInterpolation:
        """Everything one request needs before its denoising loop, from its own seeds' generators."""
        from ppdiffusers.utils.paddle_utils import randn_tensor

        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        pipe, scheduler = self.pipe, self.pipe.scheduler
        text_start, text_end, uncond_start, uncond_end = self.embed(
            [start.prompt, end.prompt, start.negative_prompt or "", end.negative_prompt or ""])
        text, uncond = lerp(text_start, text_end, alpha), lerp(uncond_start, uncond_end, alpha)
        guidance = lerp(start.guidance, end.guidance, alpha)
        strength = lerp(start.denoising, end.denoising, alpha)

        image = self._image_tensor(init_image)
        scaling = pipe.vae.config.get("scaling_factor", 0.18215)
        posterior = pipe.vae.encode(image).latent_dist
        init_latents = posterior.sample(generator=paddle.Generator().manual_seed(start.seed)) * scaling
        shape = init_latents.shape
        noise_start = randn_tensor(shape, generator=paddle.Generator().manual_seed(start.seed), dtype=init_latents.dtype)
        noise_end = randn_tensor(shape, generator=paddle.Generator().manual_seed(end.seed), dtype=init_latents.dtype)
        noise = paddle.to_tensor(slerp(alpha, noise_start.numpy(), noise_end.numpy()))

        scheduler.set_timesteps(num_inference_steps)
        offset = scheduler.config.get("steps_offset", 0)
        init_timestep = min(int(num_inference_steps * strength) + offset, num_inference_steps)
        latents = scheduler.add_noise(init_latents, noise, scheduler.timesteps[-init_timestep].reshape([1]))
        mask = None if mask_image is None else self._mask_tensor(mask_image, shape)
        return PreparedInterpolation(text=text, uncond=uncond, guidance=guidance, init_latents=init_latents,
                                     noise=noise, latents=latents, mask=mask, num_inference_steps=num_inference_steps,
                                     t_start=max(num_inference_steps - init_timestep + offset, 0))

    @paddle.no_grad()
    def denoise(self, batch: list[PreparedInterpolation],
                on_step: Callable[[int, int], None] | None = None) -> paddle.Tensor:
        """The denoising loop for requests with one `batch_key`, all in one UNet call per step (2 x B rows
        with guidance); row i of the result is request i's latents. Every per-request number (guidance,
        noise, mask) stays per row, so a request's answer is the one it gets alone, up to how the UNet's
        kernels sum at another batch size."""
        keys = {item.batch_key for item in batch}
        if len(keys) != 1:
            raise ValueError(f"one batch needs one step count, start step, latent shape and mask use; got {sorted(keys)}")
        first, pipe, scheduler = batch[0], self.pipe, self.pipe.scheduler
        scheduler.set_timesteps(first.num_inference_steps)  # multistep schedulers restart their history
        latents = paddle.concat([item.latents for item in batch])
        context = paddle.concat([item.uncond for item in batch] + [item.text for item in batch])
        guidance = paddle.to_tensor([item.guidance for item in batch], dtype=latents.dtype).reshape([-1, 1, 1, 1])
        init_latents = paddle.concat([item.init_latents for item in batch])
        noise = paddle.concat([item.noise for item in batch])
        mask = None if first.mask is None else paddle.concat([item.mask for item in batch])

        step_kwargs = {"eta": 0.0} if "eta" in inspect.signature(scheduler.step).parameters else {}
        timesteps = scheduler.timesteps[first.t_start:]
        for done, t in enumerate(tqdm(timesteps, desc="denoise", disable=not self.progress)):
            if on_step is not None:
                on_step(done, len(timesteps))
            model_input = scheduler.scale_model_input(paddle.concat([latents, latents]), t)
            noise_uncond, noise_text = pipe.unet(model_input, t, encoder_hidden_states=context).sample.chunk(2)
            # guidance <= 1 is no classifier-free guidance, as in riffusion-hobby and diffusers
            noise_pred = paddle.where(guidance <= 1, noise_text, noise_uncond + guidance * (noise_text - noise_uncond))
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
            if mask is not None:
                kept = scheduler.add_noise(init_latents, noise, t.reshape([1]))
                latents = kept * mask + latents * (1 - mask)
        return latents

    @paddle.no_grad()
    def decode(self, latents: paddle.Tensor) -> Image.Image:
        scaling = self.pipe.vae.config.get("scaling_factor", 0.18215)
        image = self.pipe.vae.decode(latents / scaling).sample
        array = (image / 2 + 0.5).clip(0, 1).transpose([0, 2, 3, 1]).numpy()[0]
        return Image.fromarray((array * 255).round().astype(np.uint8))

    def embed(self, prompts: list[str]) -> list[paddle.Tensor]:
        """Embeddings [1, chunks * 77, hidden] of prompts used together, all of one length (riffusion.prompts)."""
        return [paddle.to_tensor(embedding[None]) for embedding in self._encoded(tuple(prompts))]

    def clear_prompt_cache(self) -> None:
        """Forget the prompt encodings kept from earlier requests: the next request encodes its prompts."""
        self._encoded.cache_clear()

    def _encode(self, prompts: tuple[str, ...]) -> np.ndarray:
        from riffusion.prompts import encode

        encoded = encode(self.pipe.tokenizer, self.pipe.text_encoder, list(prompts))
        encoded.flags.writeable = False
        return encoded

    def _image_tensor(self, image: Image.Image) -> paddle.Tensor:
        """RGB, cropped down to a multiple of 32 as riffusion-hobby does, scaled to [-1, 1]."""
        image = image.convert("RGB")
        width, height = (side - side % 32 for side in image.size)
        if (width, height) != image.size:
            image = image.resize((width, height), resample=Image.LANCZOS)
        array = np.asarray(image, dtype=np.float32) / 255.0
        return paddle.to_tensor(array.transpose(2, 0, 1)[None] * 2.0 - 1.0)

    def _mask_tensor(self, mask: Image.Image, latent_shape) -> paddle.Tensor:
        """1 where the init image is kept (black in the mask), 0 where it is repainted (white)."""
        height, width = latent_shape[2], latent_shape[3]
        grey = np.asarray(mask.convert("L").resize((width, height), resample=Image.NEAREST), dtype=np.float32) / 255.0
        keep = 1.0 - np.broadcast_to(grey, (latent_shape[1], height, width))[None]
        return paddle.to_tensor(np.ascontiguousarray(keep))
