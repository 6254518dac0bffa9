"""Configs of a torch diffusers repo rewritten for ppdiffusers."""

from __future__ import annotations

from importlib.metadata import version

PPDIFFUSERS_VERSION = version("ppdiffusers")  # without importing it: that takes seconds and prints


def diffusers_config(config: dict) -> dict:
    """unet, vae and scheduler configs: same keys, ppdiffusers' version stamp."""
    config = {key: value for key, value in config.items() if key != "_diffusers_version"}
    config["_ppdiffusers_version"] = PPDIFFUSERS_VERSION
    return config


def transformers_config(config: dict, dtype: str) -> dict:
    """CLIP text / safety checker configs: paddlenlp reads the HF keys, but `dtype`, not `torch_dtype`."""
    dropped = {"transformers_version", "torch_dtype", "_name_or_path"}
    config = {key: value for key, value in config.items() if key not in dropped}
    config["dtype"] = dtype
    return config


def image_processor_config(config: dict) -> dict:
    config = {key: value for key, value in config.items() if key != "feature_extractor_type"}
    config["image_processor_type"] = "CLIPImageProcessor"
    return config


def special_tokens_map(config: dict) -> dict:
    """transformers < 4.26 tagged special tokens {"__type": "AddedToken", ...} in special_tokens_map.json
    too; paddlenlp reads the tag in tokenizer_config.json but fails on it in this file."""

    def untag(value):
        if isinstance(value, dict):
            return {key: untag(item) for key, item in value.items() if key != "__type"}
        return value

    return untag(config)
