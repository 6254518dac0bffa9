"""Shared fixtures: a tiny random-weight riffusion-model-v1 lookalike and its conversion. No network."""

import os
import shutil
import signal

import pytest

from riffusion.cpu_tuning import mkl_settings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "hf_home"))
# Paddle in this process runs on the MKL path that every riffusion command sets up before Paddle loads, so what
# a test computes here (the stdlib server fixture, a pipeline it loads) is what a command or a Ray replica gives.
for name, value in mkl_settings().items():
    os.environ.setdefault(name, value)
# A shell starts background jobs (`make test &`, nohup) with Ctrl-C ignored, and the commands the tests start
# would inherit that: the tests that press Ctrl-C on a command need it delivered as a terminal delivers it.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def environment_restored():
    """Commands run in-process (main(argv)) tune the process as they would their own (USE_TORCH=0 keeps diffusers
    from importing afterwards): each test gets back the environment it started with."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory):
    """Programs that commands export on first use (export/cache.py) go here, not into the user's cache."""
    os.environ["RIFFUSION_PADDLE_CACHE"] = str(tmp_path_factory.mktemp("export-cache"))


@pytest.fixture(scope="session")
def torch_repo(tmp_path_factory):
    from convert.builtin import build

    return build(tmp_path_factory.mktemp("src") / "riffusion-tiny", size="tiny")


@pytest.fixture(scope="session")
def paddle_library(torch_repo, tmp_path_factory):
    from convert.library import convert_library
    from convert.parity import check_during_conversion

    out = tmp_path_factory.mktemp("out") / "riffusion-tiny-paddle"
    convert_library(str(torch_repo), out, quiet=True, check=check_during_conversion(str(torch_repo)))
    return out


@pytest.fixture(scope="session")
def exported(paddle_library, tmp_path_factory):
    """The tiny library exported to static programs and ONNX: (folder, export report)."""
    from export.exporter import export_library

    out = tmp_path_factory.mktemp("export") / "riffusion-tiny-export"
    report = export_library(paddle_library, out, onnx=True, quiet=True, fidelity_steps=4)
    return out, report


@pytest.fixture
def repo_copy(torch_repo, tmp_path):
    """A private copy of the tiny repo that a test may damage."""
    return shutil.copytree(torch_repo, tmp_path / "damaged")


RELEASE_REPO_ID = "riffusion-paddle/riffusion-tiny-paddle"


@pytest.fixture(scope="session")
def release(torch_repo, tmp_path_factory):
    """A release of the tiny model with the UNet exported (static and ONNX), parity run against torch."""
    from convert.cli import main as convert_main

    out = tmp_path_factory.mktemp("release") / "riffusion-tiny-paddle"
    assert convert_main(["--src", str(torch_repo), "--out", str(out), "--release", "--quiet", "--repo-id",
                         RELEASE_REPO_ID, "--export-components", "unet"]) == 0
    return out


@pytest.fixture(scope="session")
def narrow_seed_folder(tmp_path_factory):
    """The seed image library cut to 32 columns (0.32 s of audio): 16x cheaper for the tiny model."""
    from riffusion import seed_images

    folder = tmp_path_factory.mktemp("narrow_seeds")
    for name in seed_images.seed_ids() + seed_images.mask_ids():
        seed_images.load(name).crop((0, 0, 32, 512)).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_lora(paddle_library, tmp_path_factory):
    """A rank-2 LoRA on every UNet attention projection of the tiny library, with random (non-zero) up weights
    so that it changes what the model draws; ppdiffusers' file layout (riffusion.lora)."""
    import numpy as np
    from ppdiffusers import UNet2DConditionModel

    from riffusion import lora

    unet = UNet2DConditionModel.from_pretrained(str(paddle_library / "unet"))
    layers = lora.add_unet_lora(unet, rank=2, alpha=2)
    rng = np.random.default_rng(5)
    for layer in layers.values():
        layer.up.weight.set_value(rng.normal(0.0, 0.5, size=layer.up.weight.shape).astype(np.float32))
    folder = tmp_path_factory.mktemp("lora")
    lora.save(lora.state_dict(layers, {}), folder)
    return folder
