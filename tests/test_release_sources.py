"""A release made from a Hub repo that ships riffusion-app's seed images carries those files byte for byte
(and says so in its card and manifest), names the repo as its base model, and records no local path."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import yaml
from PIL import Image

REVISION = "0123456789abcdef0123456789abcdef01234567"
REPO = "someone/riffusion-fork"


def test_release_from_the_hub_keeps_the_sources_seed_images(torch_repo, tmp_path):
    hf_home = tmp_path / "hf"
    snapshot = hf_home / "hub" / ("models--" + REPO.replace("/", "--")) / "snapshots" / REVISION
    shutil.copytree(torch_repo, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(REVISION)
    seeds = snapshot / "seed_images"
    seeds.mkdir()
    rng = np.random.default_rng(0)
    for name in ("og_beat", "church_bells", "mask_top_third_75"):  # not our synthesized set: told apart
        Image.fromarray(rng.integers(0, 255, (512, 512), dtype=np.uint8)).save(seeds / f"{name}.png")
    out = tmp_path / "release"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(hf_home))
    result = subprocess.run([sys.executable, "-m", "convert", "--src", REPO, "--out", str(out), "--release",
                             "--no-check", "--no-onnx", "--export-components", "unet", "--quiet"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in (out / "seed_images").iterdir()) == sorted(path.name for path in seeds.iterdir())
    for path in seeds.iterdir():
        assert (out / "seed_images" / path.name).read_bytes() == path.read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    library = manifest["artefacts"]["seed_images"]
    assert library["origin"] == "source" and library["seeds"] == ["church_bells", "og_beat"]
    assert "seed_images/church_bells.png" in manifest["files"]
    assert str(tmp_path) not in json.dumps(manifest)
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["base_model"] == REPO
    assert "riffusion-app's seed images and masks as the source repository ships them (2 seed images and 1 masks)" in card
