"""A Hub repo id resolves from the local Hugging Face cache with HF_HUB_OFFLINE=1 (no network)."""

import os
import shutil
import subprocess
import sys

REVISION = "0123456789abcdef0123456789abcdef01234567"


def run_convert(args, hf_home):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(hf_home))
    return subprocess.run([sys.executable, "-m", "convert", *args], capture_output=True, text=True, env=env)


def test_hub_id_converts_from_the_offline_cache(torch_repo, tmp_path):
    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "models--riffusion--riffusion-model-v1"
    shutil.copytree(torch_repo, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    out = tmp_path / "out"
    result = run_convert(["--src", "riffusion/riffusion-model-v1", "--out", str(out), "--no-check", "--quiet"], hf_home)
    assert result.returncode == 0, result.stderr
    assert (out / "unet" / "diffusion_paddle_model.safetensors").is_file()
    assert "riffusion/riffusion-model-v1" in (out / "conversion_report.json").read_text()


def test_hub_id_missing_from_the_offline_cache(tmp_path):
    result = run_convert(["--src", "riffusion/riffusion-model-v1", "--out", str(tmp_path / "out")], tmp_path / "hf")
    assert result.returncode == 1
    assert "riffusion/riffusion-model-v1: not in the local Hugging Face cache" in result.stderr
    assert not (tmp_path / "out").exists()


def test_hub_revision_pins_the_snapshot(torch_repo, tmp_path):
    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "models--riffusion--riffusion-model-v1"
    shutil.copytree(torch_repo, repo / "snapshots" / REVISION)
    out = tmp_path / "out"
    result = run_convert(["--src", "riffusion/riffusion-model-v1", "--revision", REVISION, "--out", str(out),
                          "--no-check", "--quiet"], hf_home)
    assert result.returncode == 0, result.stderr
    assert REVISION in (out / "conversion_report.json").read_text()
    result = run_convert(["--src", "riffusion/riffusion-model-v1", "--revision", "f" * 40, "--out",
                          str(tmp_path / "other"), "--no-check", "--quiet"], hf_home)
    assert result.returncode == 1 and "not in the local Hugging Face cache" in result.stderr


def test_release_manifest_names_a_hub_source_by_commit(tmp_path):
    from convert.release import describe_source

    snapshot = tmp_path / "models--riffusion--riffusion-model-v1" / "snapshots" / REVISION
    weights = snapshot / "unet" / "diffusion_pytorch_model.bin"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"abc")
    report = {"parts": {"unet": {"files": [{"path": str(weights), "sha256": "ba78", "bytes": 3}]}}}
    source = describe_source("riffusion/riffusion-model-v1", None, snapshot, report)
    assert source == {"kind": "hub", "repo_id": "riffusion/riffusion-model-v1", "revision": REVISION,
                      "weights": {"unet/diffusion_pytorch_model.bin": {"sha256": "ba78", "bytes": 3}}}
