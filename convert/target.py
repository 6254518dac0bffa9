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


def expected_tensors(part: Part, config: dict, where: str) -> dict[str, Expected]:
    import paddle
    from paddlenlp.transformers.model_utils import no_init_weights

    try:
        with paddle.LazyGuard(), no_init_weights():  # paddlenlp would fill lazy tensors otherwise
            model = _build(part, config)
    except (TypeError, ValueError, KeyError, AssertionError) as error:
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
