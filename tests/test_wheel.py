"""The built wheel, installed outside the checkout, carries everything the commands read at run time
(seed images, the model card template, the license) and runs: image-to-audio, the model card of a
release, interpolation from a library seed image on that release.

The wheel is installed with --no-deps into a fresh virtual environment whose only path to its
dependencies is a .pth line naming this interpreter's site-packages (reinstalling Paddle and torch
would take minutes); that line adds no checkout, no editable finder and no PYTHONPATH, and the
commands run from an empty folder, so every import of convert/export/riffusion comes from the wheel.
"""

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import soundfile

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "convert", "export", "riffusion")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build from a copy of the sources, so that the build leaves nothing in the checkout."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(work / "dist")], check=True, capture_output=True)
    (path,) = (work / "dist").glob("riffusion_paddle-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh venv with the wheel installed (no deps); the dependencies come from this interpreter's site-packages."""
    folder = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True, capture_output=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    dependencies = [path for path in site.getsitepackages() if Path(path).is_dir()]
    assert not any(Path(path).resolve() == ROOT for path in dependencies)
    (Path(purelib) / "dependencies.pth").write_text("\n".join(dependencies) + "\n")
    return python


def run(python, *args, cwd):
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(python), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)


def test_the_wheel_carries_the_package_data(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(name for name in names if name.endswith(".dist-info/METADATA"))).decode()
    seeds = {name for name in names if name.startswith("riffusion/seed_images/") and name.endswith(".png")}
    assert len(seeds) == 11, sorted(seeds)
    assert "convert/release/MODEL_CARD.md" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata


def test_installed_wheel_runs_outside_the_checkout(venv, release, tmp_path):
    where = run(venv, "-c", "import convert, export, riffusion; print(convert.__file__, export.__file__, riffusion.__file__)",
                cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    venv_root = venv.parent.parent
    assert all(Path(path).is_relative_to(venv_root) for path in where.stdout.split()), where.stdout

    seed = run(venv, "-c", "from riffusion.seed_images import FOLDER; print(FOLDER / 'og_beat.png')", cwd=tmp_path)
    seed_png = Path(seed.stdout.strip())
    assert seed_png.is_file() and seed_png.is_relative_to(venv_root)
    result = run(venv, "-m", "riffusion", "image-to-audio", seed_png, "beat.wav", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert abs(soundfile.info(tmp_path / "beat.wav").duration - 5.12) < 0.02

    render = "import json, sys; from convert.release.card import render_card; print(render_card(json.load(open(sys.argv[1]))), end='')"
    result = run(venv, "-c", render, release / "manifest.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == (release / "README.md").read_text()  # the installed template, the same card

    result = run(venv, "-m", "riffusion", "interpolate", "jazz", "rock", "mix.wav", "--checkpoint", release, "--runtime", "static",
                 "--steps", 2, "--alpha", 0.3, "--seed-image", "og_beat", "--mask", "mask_top_third_75", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert abs(soundfile.info(tmp_path / "mix.wav").duration - 5.12) < 0.02
