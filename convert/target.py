"""What the Paddle model of a part expects: tensor names, shapes, and which are nn.Linear weights.

The model is built from the part's config under paddle.LazyGuard, which allocates no parameter
memory, so the real ppdiffusers classes (not a copy of their layout) say what must be written.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from convert.components import Part
from convert.errors import ConversionError


@dataclass(frozen=True)
class Expected:
    shape: tuple[int, ...]
    linear_weight: bool  # stored [in, out] in Paddle: a torch [out, in] tensor is transposed


# Config values that size a weight (at most the numbers all weight files hold) or count layers and blocks
# (at most the tensors they hold): a config is a file anyone can edit, and an absurd one would otherwise
# have the model built for minutes or fail deep inside Paddle.
SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings", "projection_dim",
             "cross_attention_dim", "in_channels", "out_channels", "latent_channels", "norm_num_groups",
             "num_attention_heads", "attention_head_dim", "block_out_channels")
DEPTH_KEYS = ("layers_per_block", "num_hidden_layers", "transformer_layers_per_block")


def check_scale(config: dict, tensors: int, numbers: int, where: str) -> None:
    """Refuse, before building anything, a config describing more than weights of `tensors` tensors holding
    `numbers` numbers in all can hold."""
    def values(value) -> list:
        return value if isinstance(value, list) else [value]

    def refuse(key, value, bound, what):
        raise ConversionError(f"{where}: {key} {value} is more than the weight files can hold ({bound} {what} in all)")

    for key, value in config.items():
        if isinstance(value, list) and len(value) > tensors:
            refuse(key, f"(a list of {len(value)})", tensors, "tensors")
    for key in SIZE_KEYS:
        for value in values(config.get(key)):
            if isinstance(value, int) and value > numbers:
                refuse(key, value, numbers, "numbers")
    levels = max(1, len(config.get("block_out_channels") or []))
    for scope in [config] + [value for value in config.values() if isinstance(value, dict)]:
        for key in DEPTH_KEYS:
            for value in values(scope.get(key)):
                if isinstance(value, int) and value * levels > tensors:
                    refuse(key, value if levels == 1 else f"{value} (x {levels} levels)", tensors, "tensors")


def expected_tensors(part: Part, config: dict, where: str) -> dict[str, Expected]:
    import paddle
    from paddlenlp.transformers.model_utils import no_init_weights

    try:
        with paddle.LazyGuard(), no_init_weights():  # paddlenlp would fill lazy tensors otherwise
            model = _build(part, config)
    except (TypeError, ValueError, KeyError, AssertionError, IndexError, OverflowError) as error:
        raise ConversionError(f"{where}: config does not describe a valid {part.paddle_class}: {error}") from None
    linear = {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, paddle.nn.Linear)}
    return {
        name: Expected(tuple(tensor.shape), name in linear) for name, tensor in model.state_dict().items()
    }


def _build(part: Part, config: dict):
    if part.paddle_library == "ppdiffusers":
        cls = getattr(importlib.import_module("ppdiffusers"), part.paddle_class)
        return cls.from_config(config)
    if part.paddle_class == "CLIPTextModel":
        from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig.from_dict(config))
    if part.paddle_class == "StableDiffusionSafetyChecker":
        from ppdiffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from ppdiffusers.transformers import CLIPConfig

        return StableDiffusionSafetyChecker(CLIPConfig.from_dict(config))
    raise ConversionError(f"no Paddle model builder for {part.paddle_class}")
