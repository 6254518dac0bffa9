"""Bad input: one clear line naming the file (and tensor), exit 1, nothing at --out."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from convert.cli import main

UNET_BIN = "unet/diffusion_pytorch_model.bin"


def convert_fails(src, tmp_path, capsys) -> str:
    out = tmp_path / "out"
    assert main(["--src", str(src), "--out", str(out), "--quiet"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error, error
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "staging folder left behind"
    return error


def edit_state(path, edit):
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def test_missing_component_folder(repo_copy, tmp_path, capsys):
    import shutil

    shutil.rmtree(repo_copy / "vae")
    assert f"{repo_copy / 'vae'}: component folder missing" in convert_fails(repo_copy, tmp_path, capsys)


def test_missing_weight_file(repo_copy, tmp_path, capsys):
    (repo_copy / UNET_BIN).unlink()
    error = convert_fails(repo_copy, tmp_path, capsys)
    assert f"{repo_copy / 'unet'}: no weight file" in error


def test_truncated_weight_file(repo_copy, tmp_path, capsys):
    path = repo_copy / UNET_BIN
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    error = convert_fails(repo_copy, tmp_path, capsys)
    assert f"{path}: not a readable torch file (truncated or corrupted?)" in error


def test_truncated_safetensors_file(tmp_path, capsys):
    from convert.builtin import build

    src = build(tmp_path / "st", size="tiny", weights="safetensors")
    path = src / "text_encoder" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    assert f"{path}: not a readable safetensors file" in convert_fails(src, tmp_path, capsys)


def test_corrupted_weight_file(repo_copy, tmp_path, capsys):
    path = repo_copy / "vae" / "diffusion_pytorch_model.bin"
    data = bytearray(path.read_bytes())
    data[:4096] = os.urandom(4096)  # the zip's first entry header and data.pkl
    data[-2048:] = os.urandom(2048)  # and its central directory
    path.write_bytes(bytes(data))
    assert f"{path}: not a readable torch file" in convert_fails(repo_copy, tmp_path, capsys)


def test_tensor_shape_disagrees_with_config(repo_copy, tmp_path, capsys):
    name = "conv_in.weight"
    edit_state(repo_copy / UNET_BIN, lambda s: s.__setitem__(name, torch.zeros(16, 4, 3, 3)))
    error = convert_fails(repo_copy, tmp_path, capsys)
    assert f"{repo_copy / UNET_BIN}: tensor 'conv_in.weight': shape [16, 4, 3, 3] disagrees with unet/config.json" in error
    assert "[32, 4, 3, 3]" in error


def test_unknown_key(repo_copy, tmp_path, capsys):
    edit_state(repo_copy / UNET_BIN, lambda s: s.__setitem__("lora_up.weight", torch.zeros(4, 4)))
    error = convert_fails(repo_copy, tmp_path, capsys)
    assert f"{repo_copy / UNET_BIN}: tensor 'lora_up.weight': unknown tensor" in error


def test_missing_tensor(repo_copy, tmp_path, capsys):
    edit_state(repo_copy / UNET_BIN, lambda s: s.pop("conv_out.bias"))
    error = convert_fails(repo_copy, tmp_path, capsys)
    assert "1 tensor(s) missing from the weights, first 'conv_out.bias'" in error


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_never_executed(repo_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = repo_copy / "text_encoder" / "pytorch_model.bin"
    torch.save({"text_model.embeddings.token_embedding.weight": RunsCode(marker)}, path, pickle_module=pickle)
    error = convert_fails(repo_copy, tmp_path, capsys)
    assert f"{path}: refused to unpickle, the file holds more than tensors" in error
    assert not marker.exists()


def test_unknown_pipeline_type(repo_copy, tmp_path, capsys):
    index = json.loads((repo_copy / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (repo_copy / "model_index.json").write_text(json.dumps(index))
    assert "unknown model type 'StableDiffusionXLPipeline'" in convert_fails(repo_copy, tmp_path, capsys)


def test_unknown_component_class(repo_copy, tmp_path, capsys):
    index = json.loads((repo_copy / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet3DConditionModel"]
    (repo_copy / "model_index.json").write_text(json.dumps(index))
    assert "unknown model type diffusers.UNet3DConditionModel for part 'unet'" in convert_fails(repo_copy, tmp_path, capsys)


def test_broken_config_json(repo_copy, tmp_path, capsys):
    (repo_copy / "unet" / "config.json").write_text("{not json")
    assert f"{repo_copy / 'unet' / 'config.json'}: not valid JSON" in convert_fails(repo_copy, tmp_path, capsys)


def test_source_that_does_not_exist(tmp_path, capsys):
    assert "no such folder, and not a Hub repo id" in convert_fails(tmp_path / "nowhere", tmp_path, capsys)


def test_command_line_exit_status(repo_copy, tmp_path):
    (repo_copy / UNET_BIN).unlink()
    result = subprocess.run([sys.executable, "-m", "convert", "--src", str(repo_copy), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {repo_copy / 'unet'}: no weight file")
    assert not (tmp_path / "out").exists()


def test_legacy_non_zip_pickle_gets_a_clear_error(repo_copy, tmp_path, capsys):
    path = repo_copy / UNET_BIN
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    assert f"{path}: legacy (pre-zip) torch pickle" in convert_fails(repo_copy, tmp_path, capsys)


@pytest.mark.parametrize("out", ["same", "dotdot", "symlink", "parent"])
def test_output_overlapping_the_source_is_refused_even_with_overwrite(repo_copy, tmp_path, capsys, out):
    (tmp_path / "link").symlink_to(repo_copy)
    target = {"same": repo_copy, "dotdot": tmp_path / "x" / ".." / repo_copy.name,
              "symlink": tmp_path / "link", "parent": tmp_path}[out]
    before = sorted(p.name for p in repo_copy.rglob("*"))
    assert main(["--src", str(repo_copy), "--out", str(target), "--overwrite", "--quiet"]) == 1
    assert "overlaps the source" in capsys.readouterr().err
    assert sorted(p.name for p in repo_copy.rglob("*")) == before
