"""Without a network, a Hub id ends convert and convert.publish in one line naming the host and the reason,
with the way out: HF_HUB_OFFLINE=1 when the model is in the local cache."""

import os
import shutil
import subprocess
import sys

REVISION = "0123456789abcdef0123456789abcdef01234567"
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


def run(module, args, hf_home):
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=CLOSED, HF_TOKEN="hf_test")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, env=env)


def test_convert_without_network_names_the_host_and_the_cache(torch_repo, tmp_path):
    hf_home = tmp_path / "hf"
    args = ["--src", "riffusion/riffusion-model-v1", "--out", tmp_path / "out", "--no-check"]
    missing = run("convert", args, hf_home)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"error: riffusion/riffusion-model-v1: cannot reach the Hub at {CLOSED} ([Errno 111] Connection refused); "
        f"and it is not in the local Hugging Face cache"]
    repo = hf_home / "hub" / "models--riffusion--riffusion-model-v1"
    shutil.copytree(torch_repo, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    cached = run("convert", args, hf_home)
    assert cached.returncode == 1 and len(cached.stderr.strip().splitlines()) == 1
    assert cached.stderr.strip().endswith("it is in the local Hugging Face cache: run again with HF_HUB_OFFLINE=1 "
                                          "to convert from there")
    assert not (tmp_path / "out").exists()


def test_publish_without_network_is_one_line(release, tmp_path):
    result = run("convert.publish", ["--folder", release, "--repo-id", "someone/riffusion-tiny-paddle"], tmp_path / "hf")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: someone/riffusion-tiny-paddle: cannot reach the Hub at {CLOSED} ([Errno 111] Connection refused); "
        f"nothing uploaded")
    assert "Traceback" not in result.stderr
