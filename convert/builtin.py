"""Random-weight torch repos with exactly riffusion/riffusion-model-v1's layout and quirks.

The real weights cannot be downloaded here, so tests, the demo and benchmarks convert these: the
December-2022 diffusers layout, zip-pickle `.bin` weights (or `.safetensors`), the legacy VAE
attention names, the CLIP `position_ids` buffers, 2022-era configs, the PNDM scheduler, a CLIP
tokenizer with the real BPE vocabulary, the feature extractor and the safety checker.
`tiny` builds in seconds; `full` has the real SD1.5 / CLIP ViT-L/14 sizes (about 5.5 GB).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import sys
from pathlib import Path

import torch

from convert.errors import ConversionError
from convert.source import WEIGHT_FILES
from riffusion.console import HelpFormatter, add_version, command

SIZES = {
    "tiny": {
        "unet": dict(block_out_channels=[32, 64, 64, 64], cross_attention_dim=32, sample_size=8),
        "vae": dict(block_out_channels=[32, 32, 64, 64], sample_size=64),
        "text": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        "vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        "projection_dim": 32,
    },
    "full": {
        "unet": dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, sample_size=64),
        "vae": dict(block_out_channels=[128, 256, 512, 512], sample_size=512),
        "text": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        "vision": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        "projection_dim": 768,
    },
}

DIFFUSERS_VERSION = "0.9.0"  # what riffusion-model-v1's configs were saved with
TRANSFORMERS_VERSION = "4.25.1"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def unet_config(size: str) -> dict:
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
        "attention_head_dim": 8, "center_input_sample": False,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
        "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "upcast_attention": False,
        "use_linear_projection": False, **SIZES[size]["unet"],
    }


def vae_config(size: str) -> dict:
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
        "up_block_types": ["UpDecoderBlock2D"] * 4, **SIZES[size]["vae"],
    }


def text_config(size: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=SIZES[size]["projection_dim"], **SIZES[size]["text"])


def safety_config(size: str):
    from transformers import CLIPConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(image_size=224, patch_size=14, hidden_act="quick_gelu", **SIZES[size]["vision"])
    return CLIPConfig(text_config=text_config(size).to_dict(), vision_config=vision.to_dict(),
                      projection_dim=SIZES[size]["projection_dim"])


def build(out: Path, size: str = "tiny", weights: str = "bin", seed: int = 0) -> Path:
    """Write a random-weight riffusion-model-v1 lookalike into `out` (created) and return it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPTextModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    torch.manual_seed(seed)

    unet = UNet2DConditionModel.from_config(unet_config(size))
    _save(out / "unet", "diffusers", weights, _perturbed(unet))
    del unet

    vae = AutoencoderKL.from_config(vae_config(size))
    _save(out / "vae", "diffusers", weights, _legacy_vae_names(_perturbed(vae)))
    del vae

    text = CLIPTextModel(text_config(size))
    state = _perturbed(text)
    state["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    _save(out / "text_encoder", "transformers", weights, state)
    del text, state

    checker = StableDiffusionSafetyChecker(safety_config(size))
    state = _perturbed(checker)
    patches = (224 // 14) ** 2 + 1
    state["vision_model.vision_model.embeddings.position_ids"] = torch.arange(patches).unsqueeze(0)
    _save(out / "safety_checker", "transformers", weights, state)
    _write_json(out / "safety_checker" / "config.json", _transformers_json(checker.config, "StableDiffusionSafetyChecker"))
    del checker, state

    write_configs(out, size)
    return out


def write_configs(out: Path, size: str, safety_checker: bool = True) -> None:
    """Everything of the repo but the weights: configs, tokenizer, scheduler, model_index.json."""
    for name, config in (("unet", unet_config(size)), ("vae", vae_config(size)),
                         ("text_encoder", _transformers_json(text_config(size), "CLIPTextModel"))):
        _write_json(out / name / "config.json", config)
    _write_tokenizer(out / "tokenizer")
    _write_json(out / "scheduler" / "scheduler_config.json", {
        "_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None,
    })
    _write_json(out / "feature_extractor" / "preprocessor_config.json", {
        "crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
        "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD, "resample": 3, "size": 224,
    })
    _write_json(out / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": ["transformers", "CLIPFeatureExtractor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"] if safety_checker else [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })


@torch.no_grad()
def _perturbed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Default inits leave biases at 0 and norm scales at 1, where a misplaced tensor would not show
    in parity: give every parameter a little noise."""
    state = model.state_dict()
    for tensor in state.values():
        if tensor.is_floating_point():
            tensor.add_(torch.randn_like(tensor) * 0.02)
    return state


def _legacy_vae_names(state: dict) -> dict:
    legacy = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    renamed = {}
    for name, tensor in state.items():
        for new, old in legacy.items():
            if ".attentions." in name and new in name:
                name = name.replace(new, old)
        renamed[name] = tensor
    return renamed


def _transformers_json(config, architecture: str) -> dict:
    data = config.to_dict()
    data.update(architectures=[architecture], torch_dtype="float32", transformers_version=TRANSFORMERS_VERSION)
    data.pop("_commit_hash", None)
    return data


def _save(folder: Path, family: str, weights: str, state: dict) -> None:
    folder.mkdir()
    state = {name: tensor.contiguous() for name, tensor in state.items()}
    if weights == "safetensors":
        from safetensors.torch import save_file

        save_file(state, folder / WEIGHT_FILES[family][0], metadata={"format": "pt"})
    else:
        torch.save(state, folder / WEIGHT_FILES[family][2])


def _write_tokenizer(folder: Path) -> None:
    """CLIP's BPE: 256 byte tokens, their 256 `</w>` forms, 48894 merges, 2 specials (49408)."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise ConversionError("the built-in CLIP tokenizer needs the BPE merges of the open-clip-torch wheel: "
                              "pip install --no-deps open-clip-torch (or pass --config)")
    bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [token + "</w>" for token in byte_tokens]
    tokens += ["".join(merge.split()) for merge in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    _write_json(folder / "vocab.json", {token: index for index, token in enumerate(tokens)})
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    _write_json(folder / "special_tokens_map.json", {
        "bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
        "pad_token": "<|endoftext|>", "unk_token": added("<|endoftext|>"),
    })
    _write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False, "bos_token": added("<|startoftext|>"), "do_lower_case": True,
        "eos_token": added("<|endoftext|>"), "errors": "replace", "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14", "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
        "unk_token": added("<|endoftext|>"),
    })


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert.builtin", formatter_class=HelpFormatter,
        description="Write a random-weight torch diffusers repo with riffusion/riffusion-model-v1's layout and quirks "
                    "(configs, .bin or .safetensors weights, the real CLIP BPE vocabulary), for trying and testing "
                    "the converter without downloading the model: python -m convert --src OUT ...")
    add_version(parser)
    parser.add_argument("--out", required=True, type=Path, help="folder to create (must not exist)")
    parser.add_argument("--size", choices=SIZES, default="tiny",
                        help="tiny: a few MB, builds in seconds; full: the real SD1.5 sizes (about 5.5 GB)")
    parser.add_argument("--weights", choices=("bin", "safetensors"), default="bin",
                        help="weight file format (the original repo holds .bin zip pickles)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    args = parser.parse_args(argv)
    if args.out.exists():
        raise ConversionError(f"{args.out} already exists")
    build(args.out, args.size, args.weights, args.seed)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
