"""The converted library: layout, tags, complete accounting, loads and generates in ppdiffusers,
and the source is left untouched."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from convert.cli import main
from convert.library import convert_library


def test_layout_and_weight_tags(paddle_library):
    expected = {
        "unet/diffusion_paddle_model.safetensors": "pd",
        "vae/diffusion_paddle_model.safetensors": "pd",
        "text_encoder/model.safetensors": "np",
        "safety_checker/model.safetensors": "np",
    }
    for path, tag in expected.items():
        with safe_open(str(paddle_library / path), framework="np") as handle:
            assert handle.metadata() == {"format": tag}, path
    for path in ["tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
                 "feature_extractor/preprocessor_config.json", "conversion_report.json"]:
        assert (paddle_library / path).is_file(), path
    index = json.loads((paddle_library / "model_index.json").read_text())
    assert index["unet"] == ["ppdiffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["ppdiffusers.transformers", "CLIPTextModel"]
    assert index["feature_extractor"] == ["ppdiffusers.transformers", "CLIPImageProcessor"]
    assert "_diffusers_version" not in index


def test_every_source_tensor_is_accounted_for(torch_repo, paddle_library):
    report = json.loads((paddle_library / "conversion_report.json").read_text())
    for name, part in report["parts"].items():
        assert part["mapped"] + len(part["dropped"]) == part["tensors_in"], name
        source_file = part["files"][0]["path"]
        source = torch.load(source_file, weights_only=True)
        assert len(source) == part["tensors_in"]
        assert len(part["files"][0]["sha256"]) == 64
    assert report["parts"]["text_encoder"]["dropped"] == ["text_model.embeddings.position_ids"]
    # legacy query/key/value/proj_attn, weight and bias, in the encoder and decoder mid blocks
    assert report["parts"]["vae"]["renamed"] == 16
    assert report["parity"]["passed"]


def test_linear_weights_are_transposed_and_the_rest_kept(torch_repo, paddle_library):
    source = torch.load(torch_repo / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    with safe_open(str(paddle_library / "unet" / "diffusion_paddle_model.safetensors"), framework="np") as out:
        to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
        np.testing.assert_array_equal(out.get_tensor(to_q), source[to_q].numpy().T)
        proj_in = "down_blocks.0.attentions.0.proj_in.weight"  # a 1x1 conv: same values, same layout
        np.testing.assert_array_equal(out.get_tensor(proj_in), source[proj_in].numpy())
    vae = torch.load(torch_repo / "vae" / "diffusion_pytorch_model.bin", weights_only=True)
    with safe_open(str(paddle_library / "vae" / "diffusion_paddle_model.safetensors"), framework="np") as out:
        np.testing.assert_array_equal(
            out.get_tensor("decoder.mid_block.attentions.0.to_out.0.weight"),
            vae["decoder.mid_block.attentions.0.proj_attn.weight"].numpy().T,
        )


def test_ppdiffusers_loads_it_without_flags_and_generates(paddle_library):
    import paddle
    from ppdiffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(paddle_library))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("lo-fi beat", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=paddle.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0


def test_source_folder_is_left_untouched(torch_repo, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in torch_repo.rglob("*")}
    convert_library(str(torch_repo), tmp_path / "out", quiet=True)
    after = {p: p.stat().st_mtime_ns for p in torch_repo.rglob("*")}
    assert before == after


def test_safetensors_source_gives_the_same_library(torch_repo, paddle_library, tmp_path):
    from convert.builtin import build

    src = build(tmp_path / "st", size="tiny", weights="safetensors")
    out = tmp_path / "out"
    convert_library(str(src), out, quiet=True)
    for path in ["unet/diffusion_paddle_model.safetensors", "text_encoder/model.safetensors"]:
        with safe_open(str(out / path), "np") as a, safe_open(str(paddle_library / path), "np") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                np.testing.assert_array_equal(a.get_tensor(key), b.get_tensor(key))


def test_float16_output_passes_parity_against_rounded_torch_weights(torch_repo, tmp_path, capsys):
    out = tmp_path / "fp16"
    assert main(["--src", str(torch_repo), "--out", str(out), "--dtype", "float16", "--quiet"]) == 0
    with safe_open(str(out / "unet" / "diffusion_paddle_model.safetensors"), "pt") as handle:
        assert handle.get_tensor("conv_in.weight").dtype == torch.float16
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["parity"]["passed"] and report["parity"]["settings"]["half_weights"]
    assert "unet" in capsys.readouterr().out  # the parity table was printed


def test_refuses_non_empty_output_unless_overwrite(torch_repo, paddle_library, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--src", str(torch_repo), "--out", str(out), "--no-check", "--quiet"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["--src", str(torch_repo), "--out", str(out), "--no-check", "--quiet", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no staging folder left beside it
