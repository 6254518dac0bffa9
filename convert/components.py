"""What a Stable Diffusion pipeline is made of, and the rule carrying each part to ppdiffusers.

The tables are data. For a part with weights, every source tensor either matches a `drops` pattern
(left behind on purpose, reported) or is renamed by `renames` (first match wins; no match keeps the
name) onto a tensor the Paddle model has. The layout rule is not listed here: it follows the Paddle
layer that receives the tensor (nn.Linear stores [in, out], torch stores [out, in]), see target.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    paddle_library: str
    paddle_class: str
    weights_family: str | None = None  # None: no weights, the folder is copied as is
    paddle_weights: str | None = None
    # The safetensors `format` tag the Paddle loader wants: ppdiffusers models read "pd" as Paddle
    # layout ("pt" or no tag would be transposed again); paddlenlp 2.8 models refuse "pd" and read "np".
    weights_format: str = "pd"
    renames: tuple[tuple[str, str], ...] = ()
    drops: tuple[str, ...] = ()
    config_file: str = "config.json"
    # a part without weights: the files copied besides its config (nothing else in its folder is)
    files: tuple[str, ...] = ()
    optional_files: tuple[str, ...] = ()


# Diffusers before 0.14 saved the VAE mid-block attention as query/key/value/proj_attn.
LEGACY_VAE_ATTENTION = (
    (r"^(.*\.attentions\.\d+)\.query\.(weight|bias)$", r"\1.to_q.\2"),
    (r"^(.*\.attentions\.\d+)\.key\.(weight|bias)$", r"\1.to_k.\2"),
    (r"^(.*\.attentions\.\d+)\.value\.(weight|bias)$", r"\1.to_v.\2"),
    (r"^(.*\.attentions\.\d+)\.proj_attn\.(weight|bias)$", r"\1.to_out.0.\2"),
)
# transformers < 4.31 saved the position_ids buffer; Paddle's CLIP computes it.
POSITION_IDS = (r"(^|\.)embeddings\.position_ids$",)

UNET = Part("ppdiffusers", "UNet2DConditionModel", "diffusers", "diffusion_paddle_model.safetensors")
VAE = Part("ppdiffusers", "AutoencoderKL", "diffusers", "diffusion_paddle_model.safetensors", renames=LEGACY_VAE_ATTENTION)
CLIP_TEXT = Part("ppdiffusers.transformers", "CLIPTextModel", "transformers", "model.safetensors", "np", drops=POSITION_IDS)
SAFETY_CHECKER = Part("stable_diffusion", "StableDiffusionSafetyChecker", "transformers", "model.safetensors", "np", drops=POSITION_IDS)
CLIP_TOKENIZER = Part("ppdiffusers.transformers", "CLIPTokenizer", config_file="tokenizer_config.json",
                      files=("vocab.json", "merges.txt"), optional_files=("special_tokens_map.json", "added_tokens.json"))
CLIP_IMAGE_PROCESSOR = Part("ppdiffusers.transformers", "CLIPImageProcessor", config_file="preprocessor_config.json")

# model_index.json entry [library, class] -> the Paddle part. Schedulers are handled by name.
PARTS = {
    ("diffusers", "UNet2DConditionModel"): UNET,
    ("diffusers", "AutoencoderKL"): VAE,
    ("transformers", "CLIPTextModel"): CLIP_TEXT,
    ("stable_diffusion", "StableDiffusionSafetyChecker"): SAFETY_CHECKER,
    ("diffusers", "StableDiffusionSafetyChecker"): SAFETY_CHECKER,
    ("transformers", "CLIPTokenizer"): CLIP_TOKENIZER,
    ("transformers", "CLIPFeatureExtractor"): CLIP_IMAGE_PROCESSOR,
    ("transformers", "CLIPImageProcessor"): CLIP_IMAGE_PROCESSOR,
    # a converted library's own entries: it can be the --config of a single-file source
    ("ppdiffusers", "UNet2DConditionModel"): UNET,
    ("ppdiffusers", "AutoencoderKL"): VAE,
    ("ppdiffusers.transformers", "CLIPTextModel"): CLIP_TEXT,
    ("ppdiffusers.transformers", "CLIPTokenizer"): CLIP_TOKENIZER,
    ("ppdiffusers.transformers", "CLIPImageProcessor"): CLIP_IMAGE_PROCESSOR,
}

# The pipelines we convert, with the parts each must have and those it may leave out ([null, null]).
PIPELINES = {
    "StableDiffusionPipeline": {
        "required": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
        "optional": ("safety_checker", "feature_extractor", "image_encoder"),
    },
}

SCHEDULER_CONFIG = "scheduler_config.json"
