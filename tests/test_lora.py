"""LoRA interchange (python -m convert.lora) on the tiny model: diffusers / peft, older diffusers and kohya
files to Paddle with parity against diffusers + peft at scales 0.5 and 1.0, Paddle -> torch -> Paddle bitwise,
a fused library against the unfused LoRA, and bad inputs refused with nothing written; the same LoRA checks
in the parity command CI runs (python -m convert.parity --lora)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

RANK = 4


def _convert(*args):
    return subprocess.run([sys.executable, "-m", "convert.lora", *map(str, args)], capture_output=True, text=True)


def _error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def peft_lora(torch_repo, tmp_path_factory):
    """A diffusers-format LoRA saved by diffusers from peft adapters (non-zero lora_B) on the UNet's attention
    projections and the text encoder's."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(str(torch_repo), subfolder="unet")
    text = CLIPTextModel.from_pretrained(str(torch_repo), subfolder="text_encoder")
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    text.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    with torch.no_grad():
        for name, parameter in [*unet.named_parameters(), *text.named_parameters()]:
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("peft_lora")
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=get_peft_model_state_dict(unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(text))
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def kohya_lora(peft_lora, tmp_path_factory):
    """The same adapters in kohya names with alpha = 2 x rank (up halved, so the same effect), plus a LoCon
    3x3 convolution adapter."""
    tensors = {}
    for key, value in load_file(str(peft_lora)).items():
        component, _, name = key.partition(".")
        layer, kind = name.rsplit(".lora_", 1)
        module = ("lora_unet_" if component == "unet" else "lora_te_") + layer.replace(".", "_")
        if kind == "A.weight":
            tensors[f"{module}.lora_down.weight"] = value
            tensors[f"{module}.alpha"] = np.array(2.0 * RANK, dtype=np.float32)
        else:
            tensors[f"{module}.lora_up.weight"] = value / 2
    rng = np.random.default_rng(1)
    tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"] = rng.normal(0, 0.1, (RANK, 32, 3, 3)).astype(np.float32)
    tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"] = rng.normal(0, 0.1, (32, RANK, 1, 1)).astype(np.float32)
    tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"] = np.array(float(RANK), dtype=np.float32)
    path = tmp_path_factory.mktemp("kohya") / "style.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def paddle_lora(peft_lora, paddle_library, torch_repo, tmp_path_factory):
    """peft -> Paddle with the parity check; (folder, report)."""
    out = tmp_path_factory.mktemp("converted") / "paddle"
    result = _convert("--src", peft_lora, "--out", out, "--base", paddle_library, "--parity", torch_repo)
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    return out, json.loads((out / "lora_report.json").read_text())


LORA_CHECKS = {f"{check}@{scale}" for check in ("lora_unet", "lora_unet_unfused", "lora_text_encoder", "lora_fused_unfused")
               for scale in ("0.5", "1")} | {"lora_round_trip[diffusers]", "lora_round_trip[kohya]"}


def test_peft_lora_matches_diffusers_in_paddle(peft_lora, paddle_lora):
    """UNet (fused and unfused) and text encoder with the converted LoRA match diffusers + peft with the source
    at scales 0.5 and 1.0 (max abs <= 1e-4; measured <= 1.7e-5), and the report accounts for every tensor."""
    out, report = paddle_lora
    checks = report["parity"]["checks"]
    assert {check["name"] for check in checks} == LORA_CHECKS and report["parity"]["passed"]
    assert all(check["max_abs"] <= 1e-4 and check["passed"] for check in checks)
    assert all(check["max_abs"] == 0 for check in checks if check["name"].startswith("lora_round_trip"))
    source = load_file(str(peft_lora))
    assert set(report["tensors"]) == set(source) and report["adapters"] == len(source) // 2
    converted = load_file(str(out / "paddle_lora_weights.safetensors"))
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    np.testing.assert_array_equal(converted[f"{key}.lora.down.weight"], source[f"{key}.lora_A.weight"].T)


def test_kohya_lora_with_alpha_and_locon(kohya_lora, paddle_library, torch_repo, tmp_path):
    """A kohya file (alpha folded into up, a LoCon convolution) matches diffusers reading the same file."""
    out = tmp_path / "from_kohya"
    result = _convert("--src", kohya_lora, "--out", out, "--base", paddle_library, "--parity", torch_repo)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "lora_report.json").read_text())
    checks = report["parity"]["checks"]
    assert {check["name"] for check in checks} == LORA_CHECKS and all(check["passed"] for check in checks)
    assert all(check["max_abs"] <= 1e-4 for check in checks)
    converted = load_file(str(out / "paddle_lora_weights.safetensors"))
    assert converted["unet.down_blocks.0.resnets.0.conv1.lora.down.weight"].shape == (RANK, 32, 3, 3)
    assert "lora_unet_down_blocks_0_resnets_0_conv1.alpha" in report["tensors"]


def test_old_diffusers_layout_reads_the_same(peft_lora, paddle_lora, paddle_library, tmp_path):
    """`unet.<attn>.processor.to_q_lora.down.weight` (diffusers <= 0.20) and the prefix-less form give the same
    Paddle tensors as the peft file."""
    old = {}
    for key, value in load_file(str(peft_lora)).items():
        if not key.startswith("unet."):
            continue
        layer, kind = key[len("unet."):].rsplit(".lora_", 1)
        attention, projection = layer.rsplit(".", 1) if not layer.endswith("to_out.0") else (layer[:-len(".to_out.0")], "to_out")
        old[f"{attention}.processor.{projection}_lora.{'down' if kind == 'A.weight' else 'up'}.weight"] = value
    save_file(old, str(tmp_path / "pytorch_lora_weights.safetensors"))
    result = _convert("--src", tmp_path / "pytorch_lora_weights.safetensors", "--out", tmp_path / "out", "--base", paddle_library)
    assert result.returncode == 0, result.stderr
    expected = {key: value for key, value in load_file(str(paddle_lora[0] / "paddle_lora_weights.safetensors")).items()
                if key.startswith("unet.")}
    got = load_file(str(tmp_path / "out" / "paddle_lora_weights.safetensors"))
    assert set(got) == set(expected) and all(np.array_equal(got[key], expected[key]) for key in expected)


@pytest.mark.parametrize("to", ["diffusers", "kohya"])
def test_paddle_torch_paddle_round_trip_is_bitwise(paddle_lora, paddle_library, tmp_path, to):
    """Paddle -> diffusers / kohya -> Paddle gives back every tensor bit for bit."""
    start = paddle_lora[0]
    assert _convert("--src", start, "--out", tmp_path / "torch", "--to", to, "--base", paddle_library).returncode == 0
    assert _convert("--src", tmp_path / "torch", "--out", tmp_path / "back", "--base", paddle_library).returncode == 0
    before = load_file(str(start / "paddle_lora_weights.safetensors"))
    after = load_file(str(tmp_path / "back" / "paddle_lora_weights.safetensors"))
    assert set(before) == set(after) and all(np.array_equal(before[key], after[key]) for key in before)


def test_fused_library_matches_the_unfused_lora(paddle_lora, paddle_library, tmp_path):
    """--fuse --base writes a library whose UNet and text encoder equal the base with the LoRA applied unfused
    (ppdiffusers' load_attn_procs, scale 0.5) within 1e-5; the other parts are copied byte for byte."""
    import paddle

    from export.runtime import load_pipeline
    from riffusion import lora

    out = tmp_path / "fused"
    result = _convert("--src", paddle_lora[0], "--out", out, "--base", paddle_library, "--fuse", "--scale", "0.5")
    assert result.returncode == 0, result.stderr
    fused, unfused = load_pipeline(out), load_pipeline(paddle_library)
    tensors = lora.read(paddle_lora[0])
    unfused.unet.load_attn_procs({key[5:]: paddle.to_tensor(value) for key, value in tensors.items()
                                  if key.startswith("unet.")}, from_diffusers=False)
    rng = np.random.default_rng(0)
    sample = paddle.to_tensor(rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
    context = paddle.to_tensor(rng.standard_normal((1, 77, 32)).astype(np.float32))
    with paddle.no_grad():
        a = fused.unet(sample, paddle.to_tensor([500]), encoder_hidden_states=context).sample.numpy()
        b = unfused.unet(sample, paddle.to_tensor([500]), encoder_hidden_states=context,
                         cross_attention_kwargs={"scale": 0.5}).sample.numpy()
    print(f"fused vs unfused UNet: max abs {np.abs(a - b).max():.2e}")
    np.testing.assert_allclose(a, b, atol=1e-5)
    applied = load_pipeline(paddle_library)
    lora.apply_tensors(applied, tensors, 0.5)
    ids = paddle.to_tensor([[49406, 320, 49407] + [49407] * 74])
    np.testing.assert_allclose(fused.text_encoder(ids)[0].numpy(), applied.text_encoder(ids)[0].numpy(), atol=1e-5)
    name = "vae/diffusion_paddle_model.safetensors"
    assert (out / name).read_bytes() == (paddle_library / name).read_bytes()


def _bad(tmp_path, name, tensors):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("case, message", [
    ("unknown", "unknown LoRA key layout"),
    ("rank", "do not fit"),
    ("sd2", "a LoRA for SD 2.x"),
    ("sdxl", "SDXL LoRA tensor"),
    ("missing_up", "needs both a down and an up tensor"),
    ("nan", "NaN"),
    ("pickle", "refused to unpickle"),
])
def test_bad_lora_inputs(paddle_library, tmp_path, case, message):
    """Unknown layouts, ranks or widths that do not fit the base, SD 2.x / SDXL files, NaN and pickles that
    would run code: one line naming the tensor, exit 1, nothing at --out."""
    f = np.float32
    attn2 = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    if case == "unknown":
        src = _bad(tmp_path, "a.safetensors", {"model.weight": np.zeros((2, 2), f)})
    elif case == "rank":
        src = _bad(tmp_path, "a.safetensors", {f"{attn2}.lora_A.weight": np.zeros((4, 32), f),
                                               f"{attn2}.lora_B.weight": np.zeros((32, 8), f)})
    elif case == "sd2":
        src = _bad(tmp_path, "a.safetensors", {f"{attn2}.lora_A.weight": np.zeros((4, 1024), f),
                                               f"{attn2}.lora_B.weight": np.zeros((32, 4), f)})
    elif case == "sdxl":
        src = _bad(tmp_path, "a.safetensors", {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((4, 768), f)})
    elif case == "missing_up":
        src = _bad(tmp_path, "a.safetensors", {f"{attn2}.lora_A.weight": np.zeros((4, 32), f)})
    elif case == "nan":
        src = _bad(tmp_path, "a.safetensors", {f"{attn2}.lora_A.weight": np.full((4, 32), np.nan, f),
                                               f"{attn2}.lora_B.weight": np.zeros((32, 4), f)})
    else:
        import pickle

        class Exploit:
            def __reduce__(self):
                return (print, ("this ran",))

        import torch

        src = tmp_path / "pytorch_lora_weights.bin"
        torch.save({"unet.x.lora_A.weight": torch.zeros(2), "exploit": Exploit()}, src, pickle_module=pickle)
    result = _convert("--src", src, "--out", tmp_path / "out", "--base", paddle_library)
    assert message in _error_line(result)
    assert "this ran" not in result.stdout and not (tmp_path / "out").exists()


def test_parity_command_checks_a_paddle_lora(paddle_lora, paddle_library, torch_repo, tmp_path):
    """python -m convert.parity --lora (a Paddle LoRA, as riffusion.train writes it; diffusers gets it in its own
    layout) adds the LoRA rows to the library's parity table, each printed with max abs / rel error: UNet merged
    and unmerged and text encoder against diffusers + peft at scales 0.5 and 1.0 within 1e-4, merged against
    unmerged, and the bitwise Paddle -> diffusers / kohya -> Paddle round trip; exit 0, the JSON holds them."""
    result = subprocess.run([sys.executable, "-m", "convert.parity", "--src", str(torch_repo), "--library",
                             str(paddle_library), "--lora", str(paddle_lora[0]), "--steps", "1", "--json",
                             str(tmp_path / "parity.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    assert "parity [7/7]: lora paddle_lora_weights.safetensors" in result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()}
    assert LORA_CHECKS <= set(rows) and "unet" in rows and result.stdout.endswith("parity: all checks passed\n")
    for name in LORA_CHECKS:
        max_abs, max_rel, tolerance, verdict = rows[name][1:5]
        assert verdict == "ok" and float(max_abs) <= (0 if "round_trip" in name else 1e-4) and float(max_rel) >= 0
    saved = json.loads((tmp_path / "parity.json").read_text())
    assert saved["passed"] and saved["settings"]["lora"].endswith("paddle_lora_weights.safetensors")
    assert LORA_CHECKS <= {check["name"] for check in saved["checks"]}


def test_lora_parity_fails_on_a_wrongly_applied_lora(paddle_lora, paddle_library, torch_repo, monkeypatch):
    """The checks catch a LoRA merged at the wrong strength (1.1x the scale): the merged rows fail with their
    numbers, the unmerged ones, which do not use the merge, still pass."""
    from convert.lora_parity import lora_checks, read_lora
    from riffusion import lora

    applied = lora.apply_tensors
    monkeypatch.setattr(lora, "apply_tensors", lambda pipe, tensors, scale, *rest: applied(pipe, tensors, scale * 1.1))
    checks = {check.name: check for check in lora_checks(read_lora(paddle_lora[0], paddle_library), torch_repo,
                                                          paddle_library, scales=(1.0,))}
    print({name: check.max_abs for name, check in checks.items()})
    assert not checks["lora_unet@1"].passed and checks["lora_unet@1"].max_abs > 1e-3
    assert not checks["lora_text_encoder@1"].passed and not checks["lora_fused_unfused@1"].passed
    assert checks["lora_unet_unfused@1"].passed and checks["lora_round_trip[kohya]"].passed


@pytest.mark.parametrize("case, message", [
    ("missing", "no_such_lora.safetensors: no such file or folder"),
    ("sd2", "a LoRA for SD 2.x: cross-attention width 1024, the base has 32"),
])
def test_parity_command_refuses_a_bad_lora_in_one_line(paddle_library, torch_repo, tmp_path, case, message):
    """A missing LoRA or one made for another base (the other refusals are convert.lora's, tested above): one line,
    exit 1, before any check runs, and no --json written."""
    attn2 = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    src = tmp_path / "no_such_lora.safetensors"
    if case == "sd2":
        src = _bad(tmp_path, "a.safetensors", {f"{attn2}.lora_A.weight": np.zeros((4, 1024), np.float32),
                                               f"{attn2}.lora_B.weight": np.zeros((32, 4), np.float32)})
    result = subprocess.run([sys.executable, "-m", "convert.parity", "--src", str(torch_repo), "--library",
                             str(paddle_library), "--lora", str(src), "--json", str(tmp_path / "parity.json")],
                            capture_output=True, text=True)
    assert message in _error_line(result) and "parity [" not in result.stderr
    assert not (tmp_path / "parity.json").exists()
