"""The parity command passes on a faithful conversion and fails, with the numbers, on a wrong one."""

import json
import shutil

import numpy as np
from safetensors import safe_open

from convert.parity import main
from convert.writer import StreamingSafetensorsWriter


def rewrite(path, edit):
    """Rewrite a converted safetensors file with `edit(name, array) -> array` applied."""
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()
        tensors = {name: edit(name, handle.get_tensor(name)) for name in handle.keys()}
    writer = StreamingSafetensorsWriter(path, [(n, t.dtype, t.shape) for n, t in tensors.items()], metadata)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()


def test_parity_passes_and_writes_json(torch_repo, paddle_library, tmp_path, capsys):
    report = tmp_path / "parity.json"
    assert main(["--torch", str(torch_repo), "--paddle", str(paddle_library), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    names = {check["name"] for check in result["checks"]}
    assert names == {"tokenizer", "text_encoder", "unet", "vae_encode", "vae_decode", "image_processor",
                     "safety_checker", "pipeline"}
    assert result["passed"]
    for check in result["checks"]:
        assert check["max_abs"] <= check["tolerance"], check
    assert "all checks passed" in capsys.readouterr().out


def test_untransposed_linear_weight_is_caught(torch_repo, paddle_library, tmp_path, capsys):
    broken = shutil.copytree(paddle_library, tmp_path / "broken")
    square = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"  # [32, 32]: shape alone can't tell
    rewrite(broken / "unet" / "diffusion_paddle_model.safetensors",
            lambda name, array: array.T.copy() if name == square else array)
    report = tmp_path / "parity.json"
    assert main(["--torch", str(torch_repo), "--paddle", str(broken), "--json", str(report)]) == 1
    failed = {c["name"] for c in json.loads(report.read_text())["checks"] if not c["passed"]}
    assert failed == {"unet", "pipeline"}
    assert "FAIL" in capsys.readouterr().out


def test_swapped_text_encoder_bias_is_caught(torch_repo, paddle_library, tmp_path):
    broken = shutil.copytree(paddle_library, tmp_path / "broken")
    rewrite(broken / "text_encoder" / "model.safetensors",
            lambda name, array: array[::-1].copy() if name.endswith("layers.1.mlp.fc2.bias") else array)
    report = tmp_path / "parity.json"
    assert main(["--torch", str(torch_repo), "--paddle", str(broken), "--json", str(report)]) == 1
    failed = {c["name"] for c in json.loads(report.read_text())["checks"] if not c["passed"]}
    assert "text_encoder" in failed and "pipeline" in failed


def test_not_a_converted_library(torch_repo, tmp_path, capsys):
    assert main(["--torch", str(torch_repo), "--paddle", str(tmp_path)]) == 1
    assert "not a converted library" in capsys.readouterr().err
