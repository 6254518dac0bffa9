"""One small config per exported component: where its weights live, its inputs with their dynamic
axes, its outputs, the tolerance its export is validated to, and example inputs to validate with.

Dimensions are ints (fixed), names of dynamic axes ("batch", "height", ...), or "$key" for a value
read from the component's config.json. Imports numpy only, so runtimes can check inputs cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple  # int | dynamic axis name | "$config_key"
    dtype: str

    def shape(self, config: dict) -> list:
        """Concrete where fixed or read from the config, -1 where dynamic (Paddle InputSpec style)."""
        return [_resolve(dim, config) if not _dynamic(dim) else -1 for dim in self.dims]

    def dynamic_axes(self) -> dict[int, str]:
        return {axis: dim for axis, dim in enumerate(self.dims) if _dynamic(dim)}

    def check(self, value: np.ndarray, config: dict, component: str) -> None:
        """ValueError naming the input when `value` cannot be fed to this input."""
        expected = self.shape(config)
        shown = [dim if _dynamic(dim) else _resolve(dim, config) for dim in self.dims]  # ['batch', 4, ...]
        if value.ndim != len(expected) or any(e != -1 and e != got for e, got in zip(expected, value.shape)):
            raise ValueError(f"{component} input {self.name!r}: expected shape {shown}, got {list(value.shape)}")
        if any(got == 0 for got in value.shape):
            raise ValueError(f"{component} input {self.name!r}: empty shape {list(value.shape)}")


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # the export's name: OUT/<name>/
    folder: str  # the library folder it is loaded from
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]
    tolerance: float  # absolute, float32; optimum's exporter uses unet 1e-4, vae 3e-4, text 1e-3

    def example(self, config: dict, batch: int, height: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Inputs for validation at an image size of height x width pixels (the UNet and VAE decoder get
        the latents of that image; the text encoder ignores the size: 77 tokens at batch > 1, else 12)."""
        return EXAMPLES[self.name](config, batch, height, width, np.random.default_rng(seed))

    def check_inputs(self, values: dict[str, np.ndarray], config: dict) -> None:
        for spec in self.inputs:
            spec.check(values[spec.name], config, self.name)


def _dynamic(dim) -> bool:
    return isinstance(dim, str) and not dim.startswith("$")


def _resolve(dim, config: dict):
    if isinstance(dim, str) and dim.startswith("$"):
        key = dim[1:]
        value = config.get(key)
        if value is None and key == "latent_channels":
            value = 4
        if not isinstance(value, int):
            raise ValueError(f"config.json: {key} is {value!r}, expected an integer")
        return value
    return dim


UNET = ComponentSpec(
    name="unet",
    folder="unet",
    inputs=(
        TensorSpec("sample", ("batch", "$in_channels", "height", "width"), "float32"),
        # one timestep for the whole batch ([1]) or one per sample ([batch]); float so that schedulers
        # with fractional timesteps pass them unrounded
        TensorSpec("timestep", ("steps",), "float32"),
        TensorSpec("encoder_hidden_states", ("batch", "sequence", "$cross_attention_dim"), "float32"),
    ),
    outputs=("out_sample",),
    tolerance=1e-4,
)

TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    folder="text_encoder",
    inputs=(TensorSpec("input_ids", ("batch", "sequence"), "int64"),),
    outputs=("last_hidden_state", "pooler_output"),
    tolerance=1e-4,  # optimum allows 1e-3; the static text encoder is far closer than that
)

VAE_ENCODER = ComponentSpec(
    name="vae_encoder",
    folder="vae",
    inputs=(TensorSpec("sample", ("batch", "$in_channels", "height", "width"), "float32"),),
    outputs=("latent_parameters",),  # the posterior's mean and log-variance, concatenated on channels
    tolerance=3e-4,
)

VAE_DECODER = ComponentSpec(
    name="vae_decoder",
    folder="vae",
    inputs=(TensorSpec("latent_sample", ("batch", "$latent_channels", "latent_height", "latent_width"), "float32"),),
    outputs=("sample",),
    tolerance=3e-4,
)

SPECS = {spec.name: spec for spec in (UNET, TEXT_ENCODER, VAE_ENCODER, VAE_DECODER)}
COMPONENTS = tuple(SPECS)

# Validation sizes in image pixels (batch, height, width): square at batch 2 as a pipeline with
# classifier-free guidance runs it, and non-square at batch 1, so one export is checked at two
# batches and two shapes. Text: 77 tokens at batch 2, 12 at batch 1.
VALIDATION_SIZES = ((2, 128, 128), (1, 96, 160))
LATENT_FACTOR = 8  # SD VAEs: 3 downsamplings


def _unet_example(config, batch, height, width, rng):
    channels, context = config["in_channels"], config["cross_attention_dim"]
    return {
        "sample": rng.standard_normal((batch, channels, height // LATENT_FACTOR, width // LATENT_FACTOR)).astype(np.float32),
        "timestep": np.array([rng.integers(0, 1000)], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, context)).astype(np.float32),
    }


def _text_example(config, batch, height, width, rng):
    """CLIP-tokenizer-like ids: start token, words, end token, padded with the end token."""
    vocab = int(config.get("vocab_size", 49408))
    positions = int(config.get("max_position_embeddings", 77))
    length = 77 if batch > 1 else min(12, positions)
    length = min(length, positions)
    bos, eos = vocab - 2, vocab - 1
    ids = np.full((batch, length), eos, dtype=np.int64)
    for row in range(batch):
        words = int(rng.integers(1, length - 1))
        ids[row, 0] = bos
        ids[row, 1:1 + words] = rng.integers(0, vocab - 2, words)
    return {"input_ids": ids}


def _vae_encoder_example(config, batch, height, width, rng):
    channels = config.get("in_channels", 3)
    return {"sample": rng.uniform(-1, 1, (batch, channels, height, width)).astype(np.float32)}


def _vae_decoder_example(config, batch, height, width, rng):
    channels = config.get("latent_channels", 4)
    scaling = config.get("scaling_factor", 0.18215)
    latents = rng.standard_normal((batch, channels, height // LATENT_FACTOR, width // LATENT_FACTOR)) / scaling
    return {"latent_sample": latents.astype(np.float32)}


EXAMPLES = {
    "unet": _unet_example,
    "text_encoder": _text_example,
    "vae_encoder": _vae_encoder_example,
    "vae_decoder": _vae_decoder_example,
}
