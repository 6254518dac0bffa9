"""The Hub release: assembled with every artefact and proof, its card filled with the measured numbers,
checked by convert.verify (tampering caught), and published only when it verifies (no network here)."""

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import yaml

from convert.cli import main as convert_main
from convert.errors import ConversionError
from convert.release.manifest import release_files
from convert.release.publish import main as publish_main
from convert.release import build_release
from convert.release.verify import main as verify_main
from convert.release.verify import source_check

REPO_ID = "riffusion-paddle/riffusion-tiny-paddle"  # the release fixture's (conftest.py)


@pytest.fixture
def manifest(release):
    return json.loads((release / "manifest.json").read_text())


@pytest.fixture
def release_copy(release, tmp_path):
    return shutil.copytree(release, tmp_path / "copy")


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_release_holds_every_artefact(release, manifest):
    single = "riffusion-tiny.safetensors"
    for name in ("model_index.json", "unet/diffusion_paddle_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_paddle_model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json",
                 "safety_checker/model.safetensors", single, "riffusion-tiny.yaml", "export/unet/inference.json",
                 "export/unet/inference.pdiparams", "export/unet/model.onnx", "seed_images/og_beat.png",
                 "seed_images/mask_top_third_75.png", "README.md", "manifest.json"):
        assert (release / name).is_file(), name
    artefacts = manifest["artefacts"]
    assert artefacts["single_file"] == {"file": single, "config": "riffusion-tiny.yaml"}
    assert artefacts["export"]["components"] == ["unet"] and artefacts["export"]["onnx"] is True
    assert artefacts["seed_images"]["seeds"] == ["agile", "marim", "motorway", "og_beat", "vibes"]
    assert len(artefacts["seed_images"]["masks"]) == 6
    assert not list(release.parent.glob(".*")), "staging or work folders left beside the release"


def test_manifest_lists_every_file_with_its_hash(release, manifest):
    assert sorted(manifest["files"]) == release_files(release)
    assert "manifest.json" not in manifest["files"]
    for name, entry in manifest["files"].items():
        path = release / name
        assert entry == {"sha256": sha256(path), "bytes": path.stat().st_size}, name


def test_manifest_names_the_source_and_versions(torch_repo, release, manifest):
    source = manifest["source"]
    assert source["kind"] == "folder" and source["name"] == torch_repo.name
    assert str(torch_repo.parent) not in json.dumps(manifest)  # no path of this machine is published
    for report in ("conversion_report.json", "export/export_report.json"):
        text = (release / report).read_text()
        assert str(torch_repo.parent) not in text and str(release.parent) not in text, report
    unet = "unet/diffusion_pytorch_model.bin"
    assert source["weights"][unet]["sha256"] == sha256(torch_repo / unet)
    assert set(source["weights"]) == {unet, "vae/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin",
                                      "safety_checker/pytorch_model.bin"}
    for package in ("python", "riffusion-paddle", "paddlepaddle", "ppdiffusers", "torch", "diffusers", "paddle2onnx",
                    "onnxruntime", "safetensors"):
        assert manifest["versions"].get(package), package
    assert manifest["repo_id"] == REPO_ID


def test_manifest_records_every_parity_figure(manifest):
    parity = manifest["parity"]
    library = {check["name"]: check for check in parity["library"]["checks"]}
    for name in ("tokenizer", "text_encoder", "unet", "unet[static]", "unet[onnx]", "vae_encode", "vae_decode",
                 "safety_checker", "pipeline"):
        assert name in library and library[name]["passed"], name
    assert library["unet[onnx]"]["max_abs"] < 1e-4
    assert "pipeline[onnx]" not in library  # only the UNet was exported: no exported end-to-end run
    assert parity["single_file"]["passed"] and parity["single_file"]["differ"] == 0
    assert parity["single_file"]["tensors"] > 900  # unet + vae + text encoder of the tiny model
    runtimes = {(check["component"], check["runtime"]): check for check in parity["export"]}
    assert set(runtimes) == {("unet", "static"), ("unet", "onnx")}
    assert all(check["passed"] and check["max_abs"] < 1e-4 for check in runtimes.values())


def test_card_renders_with_real_numbers(release, manifest):
    card = (release / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "creativeml-openrail-m" and front["library_name"] == "ppdiffusers"
    assert "base_model" not in front and front["pipeline_tag"]  # a local folder: no Hub model to name
    assert {"paddlepaddle", "riffusion", "text-to-audio", "onnx"} <= set(front["tags"])
    assert not re.search(r"\$\{?[a-z_]+", card), "a placeholder was left unfilled"
    library = {check["name"]: check for check in manifest["parity"]["library"]["checks"]}
    for name in ("unet", "unet[static]", "unet[onnx]", "pipeline"):
        assert f"| `{name}` |" in card and f"{library[name]['max_abs']:.2e}" in card, name
    assert f'from_pretrained("{REPO_ID}", from_hf_hub=True)' in card
    assert "riffusion-tiny.safetensors" in card and "export/unet/model.onnx" in card
    assert "| `unet` | `sample` float32 [batch, 4, height, width], `timestep` float32 [steps], " in card
    assert "| `out_sample` | `fetch_name_0` |" in card
    assert "each piece checked number by number" in card and "synthesized by riffusion-paddle" in card
    assert "CreativeML OpenRAIL-M" in card and "Forsgren" in card
    assert f"`{manifest['versions']['ppdiffusers']}`" in card


@pytest.mark.parametrize("spelling", [[], ["--folder"]])
def test_verify_accepts_the_release(release, capsys, spelling):
    """FOLDER, or --folder FOLDER (the alias publish also takes)."""
    assert verify_main([*spelling, str(release)]) == 0
    out = capsys.readouterr().out
    assert "0 missing, 0 extra, 0 changed" in out and "verify: OK" in out


def test_verify_ignores_hub_bookkeeping(release_copy):
    (release_copy / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (release_copy / ".cache" / "huggingface").mkdir(parents=True)
    (release_copy / ".cache" / "huggingface" / "upload.lock").write_text("")
    assert verify_main([str(release_copy), "--quiet"]) == 0


@pytest.mark.parametrize("damage, expected", [
    ("flip", "changed: unet/diffusion_paddle_model.safetensors: sha256"),
    ("truncate", "changed: export/unet/model.onnx: "),
    ("delete", "missing: seed_images/og_beat.png"),
    ("add", "extra: unet/extra.bin"),
])
def test_verify_catches_tampering(release_copy, damage, expected, capsys):
    if damage == "flip":
        path = release_copy / "unet" / "diffusion_paddle_model.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path = release_copy / "export" / "unet" / "model.onnx"
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "delete":
        (release_copy / "seed_images" / "og_beat.png").unlink()
    else:
        (release_copy / "unet" / "extra.bin").write_bytes(b"\0")
    assert verify_main([str(release_copy)]) == 1
    out = capsys.readouterr().out
    assert expected in out and "verify: FAILED" in out


def test_verify_catches_a_manifest_recording_a_failed_check(release_copy, capsys):
    path = release_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["parity"]["export"][0]["passed"] = False
    path.write_text(json.dumps(manifest))
    assert verify_main([str(release_copy)]) == 1
    assert "recorded parity: FAILED unet[static]" in capsys.readouterr().out


@pytest.mark.parametrize("manifest_text, expected", [
    (None, "manifest.json: missing, not a release folder"),
    ("{not json", "manifest.json: not valid JSON"),
    ('{"files": []}', "no valid 'files' table"),
])
def test_verify_rejects_a_bad_manifest(release_copy, manifest_text, expected, capsys):
    path = release_copy / "manifest.json"
    if manifest_text is None:
        path.unlink()
    else:
        path.write_text(manifest_text)
    assert verify_main([str(release_copy)]) == 1
    assert expected in capsys.readouterr().err


def test_verify_reruns_parity_against_torch(release, torch_repo, capsys):
    assert verify_main([str(release), "--torch", str(torch_repo)]) == 0
    out = capsys.readouterr().out
    assert "torch source: 4 weight files, 0 missing, 0 differ" in out
    assert re.search(r"unet\[onnx\] +\d\.\d\de-\d\d", out) and "verify: OK" in out


def test_verify_tells_a_different_torch_source(release, manifest, repo_copy):
    path = repo_copy / "vae" / "diffusion_pytorch_model.bin"
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    result = source_check(str(repo_copy), manifest, quiet=True)
    assert not result["passed"] and result["differ"] == ["vae/diffusion_pytorch_model.bin"]


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records the calls, sends nothing."""
    calls = []

    def __init__(self, token=None):
        FakeHub.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        FakeHub.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        FakeHub.calls.append(("create_branch", repo_id, kwargs))

    def upload_large_folder(self, **kwargs):
        FakeHub.calls.append(("upload_large_folder", kwargs))


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    import huggingface_hub

    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return FakeHub.calls


@pytest.mark.parametrize("spelling", [[], ["--folder"]])
def test_publish_dry_run_verifies_and_sends_nothing(release, fake_hub, capsys, spelling):
    """FOLDER, as verify takes it, or --folder FOLDER (publish's first spelling, kept as an alias)."""
    assert publish_main([*spelling, str(release), "--repo-id", REPO_ID, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "dry run: nothing uploaded" in out
    assert "unet/diffusion_paddle_model.safetensors" in out and "manifest.json" in out
    assert fake_hub == []


def test_publish_uploads_the_manifest_files(release, manifest, fake_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert publish_main(["--folder", str(release), "--repo-id", REPO_ID, "--revision", "v1", "--private"]) == 0
    assert fake_hub[0] == ("init", "hf_test")
    assert fake_hub[1] == ("create_repo", REPO_ID, {"repo_type": "model", "private": True, "exist_ok": True})
    assert fake_hub[2] == ("create_branch", REPO_ID, {"branch": "v1", "repo_type": "model", "exist_ok": True})
    upload = fake_hub[3][1]
    assert upload["repo_id"] == REPO_ID and upload["revision"] == "v1" and upload["folder_path"] == release
    assert sorted(upload["allow_patterns"]) == sorted(list(manifest["files"]) + ["manifest.json"])
    assert f"published https://huggingface.co/{REPO_ID}/tree/v1" in capsys.readouterr().out


def test_publish_refuses_a_tampered_release(release_copy, fake_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    (release_copy / "README.md").write_text("edited by hand\n")
    assert publish_main(["--folder", str(release_copy), "--repo-id", REPO_ID]) == 1
    err = capsys.readouterr().err
    assert "fails verify (changed README.md" in err and "refusing to publish" in err
    assert fake_hub == []


@pytest.mark.parametrize("command", [verify_main, publish_main])
def test_verify_and_publish_need_one_release_folder(command, release, tmp_path, capsys):
    """Neither FOLDER nor --folder, or two different folders: a usage error (status 2) naming the problem."""
    for args, problem in (([], "the release folder is required: FOLDER (or --folder FOLDER)"),
                          ([str(release), "--folder", str(tmp_path)], f"two release folders given: {release} and --folder")):
        with pytest.raises(SystemExit) as ended:
            command([*args, "--repo-id", REPO_ID] if command is publish_main else args)
        assert ended.value.code == 2 and problem in capsys.readouterr().err


def test_publish_needs_a_token(release, fake_hub, capsys):
    assert publish_main(["--folder", str(release), "--repo-id", REPO_ID]) == 1
    assert "no Hugging Face token" in capsys.readouterr().err
    assert fake_hub == []


def test_publish_warns_when_the_card_names_another_repo(release, fake_hub, capsys):
    assert publish_main(["--folder", str(release), "--repo-id", "someone/else", "--dry-run"]) == 0
    assert f"the model card was written for '{REPO_ID}'" in capsys.readouterr().err


def test_release_refuses_bad_requests(torch_repo, release, tmp_path, capsys):
    assert convert_main(["--src", str(torch_repo), "--out", str(release), "--release", "--quiet"]) == 1
    assert "not empty (pass --overwrite to replace it)" in capsys.readouterr().err
    out = tmp_path / "no-unet"
    assert convert_main(["--src", str(torch_repo), "--out", str(out), "--release", "--quiet",
                         "--export-components", "vae_decoder"]) == 1
    assert "a release holds the exported unet" in capsys.readouterr().err
    assert not out.exists()


def test_failed_parity_leaves_nothing(torch_repo, tmp_path, monkeypatch):
    import convert.parity
    from convert.parity import Check

    def failing(*args, **kwargs):
        return [Check("unet", 0.5, 0.5, 1e-4, False, "forced")], {}

    monkeypatch.setattr(convert.parity, "run_parity", failing)
    out = tmp_path / "release"
    with pytest.raises(ConversionError, match=r"parity failed \(unet\): nothing written"):
        build_release(str(torch_repo), out, quiet=True, components=("unet",), onnx=False)
    assert list(tmp_path.iterdir()) == []


def test_riffusion_runs_a_release_on_its_exported_unet(release):
    from export.runtime import UNetRuntime
    from riffusion.pipeline import RiffusionPipeline

    pipe = RiffusionPipeline.from_pretrained(str(release))
    assert isinstance(pipe.pipe.unet, UNetRuntime) and type(pipe.pipe.unet.session).__name__ == "OnnxSession"
    assert not isinstance(pipe.pipe.vae, UNetRuntime)  # not exported in this release: Paddle dynamic
    image = pipe.text_to_image("lo-fi beat", num_inference_steps=2, width=64, height=64)
    assert np.asarray(image).shape == (64, 64, 3)
    dynamic = RiffusionPipeline.from_pretrained(str(release), runtime="dynamic")
    assert not isinstance(dynamic.pipe.unet, UNetRuntime)


def test_the_cards_loading_line_works_from_the_hub_cache(release, tmp_path):
    """What the card tells users to run, against the release laid out as a Hub download (offline)."""
    import os
    import subprocess
    import sys

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    shutil.copytree(release, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    code = (f"from ppdiffusers import StableDiffusionPipeline\n"
            f"pipe = StableDiffusionPipeline.from_pretrained({REPO_ID!r}, from_hf_hub=True)\n"
            f"print(float(pipe.unet.conv_in.weight.abs().sum()))\n")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    from safetensors.numpy import load_file

    expected = np.abs(load_file(release / "unet" / "diffusion_paddle_model.safetensors")["conv_in.weight"]).sum()
    assert abs(float(result.stdout.strip().splitlines()[-1]) - float(expected)) < 1e-3


# Hostile release folders: a few hand-made files and their manifest (no conversion needed).

@pytest.fixture
def small_release(tmp_path):
    """A folder verify accepts: two plain files and a manifest recording passing checks."""
    from convert.release.manifest import describe_files, write_manifest

    folder = tmp_path / "small"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "README.md").write_text("card")
    manifest = {"manifest_version": 1, "name": "small", "files": describe_files(folder, ["README.md", "unet/config.json"]),
                "parity": {"library": {"ran": False, "reason": "test"}, "single_file": {"passed": True}, "export": []}}
    write_manifest(folder, manifest)
    assert verify_main([str(folder), "--quiet"]) == 0
    return folder


def verify_error(folder, capsys) -> str:
    assert verify_main([str(folder), "--quiet"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error, error
    return error


def test_verify_does_not_follow_a_linked_manifest(small_release, tmp_path, capsys):
    """A manifest.json that is a link (here to a copy describing the same files) is refused, not followed."""
    outside = tmp_path / "elsewhere.json"
    (small_release / "manifest.json").rename(outside)
    (small_release / "manifest.json").symlink_to(outside)
    assert f"{small_release / 'manifest.json'}: a symbolic link" in verify_error(small_release, capsys)


def test_verify_refuses_a_manifest_that_is_a_folder(small_release, capsys):
    (small_release / "manifest.json").unlink()
    (small_release / "manifest.json").mkdir()
    assert f"{small_release / 'manifest.json'}: not a regular file" in verify_error(small_release, capsys)


@pytest.mark.parametrize("parity", [[], {"library": "ok", "single_file": {"passed": True}, "export": []},
                                    {"library": {"checks": [{"passed": True}]}, "single_file": {"passed": True}},
                                    {"library": {}, "single_file": {"passed": True}, "export": [1]}])
def test_verify_refuses_a_malformed_parity_section(small_release, capsys, parity):
    path = small_release / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["parity"] = parity
    path.write_text(json.dumps(manifest))
    assert "malformed 'parity' section" in verify_error(small_release, capsys)


def test_verify_refuses_a_deeply_nested_manifest(small_release, capsys):
    (small_release / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in verify_error(small_release, capsys)


def test_verify_and_publish_refuse_a_fifo_in_the_release(small_release, fake_hub, capsys):
    """A FIFO is neither read (it would block) nor uploaded: the folder is refused."""
    os.mkfifo(small_release / "unet" / "pipe.bin")
    assert f"{small_release / 'unet' / 'pipe.bin'}: not a regular file" in verify_error(small_release, capsys)
    assert publish_main(["--folder", str(small_release), "--repo-id", "org/name", "--dry-run"]) == 1
    assert not fake_hub


def _variant(manifest, onnx=True, checked=True, components=("unet",), hub=False):
    """The manifest of the same release as --no-onnx, --no-check, --export-components or a Hub source write it."""
    manifest = json.loads(json.dumps(manifest))
    export = manifest["artefacts"]["export"]
    export["onnx"], export["components"] = onnx, list(components)
    if not onnx:
        manifest["files"] = {name: entry for name, entry in manifest["files"].items() if not name.endswith(".onnx")}
        manifest["parity"]["export"] = [c for c in manifest["parity"]["export"] if c["runtime"] != "onnx"]
        export["variants"] = {name: v for name, v in export.get("variants", {}).items() if not name.startswith("onnx")}
    if not checked:
        manifest["parity"]["library"] = {"ran": False, "reason": "skipped (--no-check)"}
    if hub:
        manifest["source"] = {"kind": "hub", "repo_id": "someone/riffusion-fork", "revision": "a" * 40,
                              "weights": manifest["source"]["weights"]}
    return manifest


def test_card_says_only_what_the_release_holds_and_checked(manifest):
    from convert.release.card import render_card

    card = render_card(_variant(manifest, onnx=False, checked=False))
    front = yaml.safe_load(card.split("---")[1])
    assert "onnx" not in front["tags"] and "### onnxruntime" not in card and "onnx" not in card.split("## Versions")[0]
    assert "checked number by number" not in card and "not run for this release (skipped (--no-check))" in card
    assert "| library vs torch | - | not run: skipped (--no-check) |" in card
    assert "outputs (onnxruntime)" not in card and "| `unet` |" in card
    assert 'load_pipeline("riffusion-tiny-paddle", "riffusion-tiny-paddle/export", unet="static")' in card
    every = render_card(_variant(manifest, components=("unet", "text_encoder", "vae_encoder", "vae_decoder")))
    assert 'unet="static", text_encoder="static", vae="static")' in every
    halves = render_card(_variant(manifest, components=("unet", "vae_decoder")))
    assert 'unet="static")' in halves  # the pipeline's VAE needs both halves
    hub = yaml.safe_load(render_card(_variant(manifest, hub=True)).split("---")[1])
    assert hub["base_model"] == "someone/riffusion-fork"


def _card_code(release, language):
    return re.findall(rf"```{language}\n(.*?)```", (release / "README.md").read_text(), re.S)


def test_the_cards_snippets_run(release, tmp_path):
    """The Paddle Inference, onnxruntime and load_pipeline snippets as the card prints them (from inside the
    downloaded folder, or beside it), and its riffusion command line (with fewer steps, on a narrow image)."""
    import subprocess
    import sys

    ppdiffusers, static, pipeline, onnx, single_file = _card_code(release, "python")
    assert "paddle_infer" in static and "ort.InferenceSession" in onnx and "load_pipeline" in pipeline
    check = ("\nimport numpy as np\nnp.save('static.npy', noise)\nnoise = unet_onnx.run(None, inputs)[0]\n"
             "np.save('onnx.npy', noise)\n")
    code = static + onnx.replace("unet = ort", "unet_onnx = ort").replace("noise = unet.run", "noise = unet_onnx.run") + check
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=release)
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        static_noise, onnx_noise = np.load(release / "static.npy"), np.load(release / "onnx.npy")
    finally:
        for name in ("static.npy", "onnx.npy"):
            (release / name).unlink(missing_ok=True)
    assert static_noise.shape == (2, 4, 64, 64) and np.isfinite(static_noise).all()
    assert np.abs(static_noise - onnx_noise).max() < 1e-4

    code = pipeline + "\nprint(type(pipe.unet).__name__, type(pipe.vae).__name__)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=release.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["UNetRuntime", "AutoencoderKL"]

    (bash,) = _card_code(release, "bash")
    command = next(line for line in bash.splitlines() if "riffusion text-to-audio" in line)
    args = command.split("python ", 1)[1].replace('"funky synth solo"', "funky").split() + ["--steps", "2", "--width", "64"]
    args = [str(tmp_path / arg) if arg == "funk.mp3" else arg for arg in args]
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=release.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "funk.mp3").stat().st_size > 1000
