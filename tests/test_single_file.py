"""The compiled single-file checkpoint (LDM layout): written from a torch repo or a Paddle library,
read back by convert, diffusers and ppdiffusers, bitwise."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from convert.cli import main as convert_main
from convert.ldm import NameMap, unet_blocks, vae_blocks
from convert.single_file import main as single_file_main

PADDLE_FILES = {"unet": "diffusion_paddle_model.safetensors", "vae": "diffusion_paddle_model.safetensors",
                "text_encoder": "model.safetensors"}


@pytest.fixture(scope="module")
def single_file(torch_repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "riffusion-tiny.safetensors"
    assert single_file_main(["--src", str(torch_repo), "--out", str(out), "--quiet"]) == 0
    return out


def assert_same_library(a, b):
    for part, name in PADDLE_FILES.items():
        with safe_open(str(a / part / name), "np") as left, safe_open(str(b / part / name), "np") as right:
            assert sorted(left.keys()) == sorted(right.keys()), part
            for key in left.keys():
                assert left.get_tensor(key).tobytes() == right.get_tensor(key).tobytes(), (part, key)


def test_every_tensor_lands_bitwise_under_its_ldm_name(torch_repo, single_file):
    written = load_file(single_file)
    unet = torch.load(torch_repo / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    names = NameMap(unet_blocks(json.loads((torch_repo / "unet" / "config.json").read_text())))
    for name, tensor in unet.items():
        assert torch.equal(written.pop(names.to_ldm(name)), tensor), name
    vae = torch.load(torch_repo / "vae" / "diffusion_pytorch_model.bin", weights_only=True)
    assert torch.equal(written.pop("first_stage_model.decoder.mid.attn_1.q.weight"),
                       vae.pop("decoder.mid_block.attentions.0.query.weight")[:, :, None, None])
    assert torch.equal(written.pop("first_stage_model.encoder.down.0.block.1.conv2.weight"),
                       vae.pop("encoder.down_blocks.0.resnets.1.conv2.weight"))
    text = torch.load(torch_repo / "text_encoder" / "pytorch_model.bin", weights_only=True)
    text.pop("text_model.embeddings.position_ids")
    for name, tensor in text.items():
        assert torch.equal(written.pop("cond_stage_model.transformer." + name), tensor), name
    assert all(name.startswith("first_stage_model.") for name in written)
    assert len(written) == len(vae)  # the rest of the VAE, one for one
    assert single_file.with_suffix(".yaml").is_file()


def test_paddle_library_gives_the_same_file_byte_for_byte(paddle_library, single_file, tmp_path):
    out = tmp_path / "from-paddle.safetensors"
    assert single_file_main(["--src", str(paddle_library), "--out", str(out), "--quiet"]) == 0
    assert out.read_bytes() == single_file.read_bytes()


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_converts_back_to_the_same_library(torch_repo, paddle_library, single_file, tmp_path, suffix):
    source = single_file
    if suffix == ".ckpt":
        source = tmp_path / "riffusion.ckpt"
        assert single_file_main(["--src", str(torch_repo), "--out", str(source), "--quiet", "--global-step", "7"]) == 0
        assert torch.load(source, weights_only=True)["global_step"] == 7
    out = tmp_path / "back"
    # bitwise equal to the library: the parity run is proven by the test below
    assert convert_main(["--src", str(source), "--out", str(out), "--config", str(torch_repo), "--quiet", "--no-check"]) == 0
    assert_same_library(out, paddle_library)
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False


def test_diffusers_from_single_file_loads_the_source_weights(torch_repo, single_file):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(single_file), config=str(torch_repo), local_files_only=True,
                                                    safety_checker=None)
    unet = torch.load(torch_repo / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    loaded = pipe.unet.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in unet.items())
    vae = torch.load(torch_repo / "vae" / "diffusion_pytorch_model.bin", weights_only=True)
    assert torch.equal(pipe.vae.state_dict()["encoder.mid_block.attentions.0.to_v.weight"],
                       vae["encoder.mid_block.attentions.0.value.weight"])
    text = torch.load(torch_repo / "text_encoder" / "pytorch_model.bin", weights_only=True)
    loaded = pipe.text_encoder.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in text.items() if name in loaded)


def test_ppdiffusers_from_single_file_loads_the_converted_weights(paddle_library, single_file):
    from ppdiffusers import StableDiffusionPipeline
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(paddle_library / "text_encoder")))
    pipe = StableDiffusionPipeline.from_single_file(
        str(single_file), original_config_file=str(single_file.with_suffix(".yaml")), text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(paddle_library / "tokenizer")), local_files_only=True)
    for part, model in (("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder)):
        loaded = model.state_dict()
        with safe_open(str(paddle_library / part / PADDLE_FILES[part]), "np") as expected:
            for key in expected.keys():
                assert np.array_equal(loaded[key].numpy(), expected.get_tensor(key)), (part, key)


def write_variant(single_file, path, edit):
    state = load_file(single_file)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})
    return path


def test_ema_weights_schedule_buffers_and_old_text_keys(torch_repo, paddle_library, single_file, tmp_path):
    def edit(state):
        for name in [n for n in state if n.startswith("model.diffusion_model.")]:
            state["model_ema." + name[len("model."):].replace(".", "")] = state[name] + 1
        state["model_ema.num_updates"] = torch.tensor(10)
        state["betas"] = torch.linspace(0.00085, 0.012, 1000)
        state["alphas_cumprod"] = torch.ones(1000)
        for name in [n for n in state if n.startswith("cond_stage_model.transformer.text_model.")]:
            state[name.replace("transformer.text_model.", "transformer.")] = state.pop(name)

    variant = write_variant(single_file, tmp_path / "ema.safetensors", edit)
    plain, ema = tmp_path / "plain", tmp_path / "ema"
    assert convert_main(["--src", str(variant), "--out", str(plain), "--config", str(torch_repo), "--quiet"]) == 0
    assert_same_library(plain, paddle_library)
    report = json.loads((plain / "conversion_report.json").read_text())
    assert {"betas", "alphas_cumprod", "model_ema.num_updates"} <= set(report["single_file"]["dropped"])
    assert convert_main(["--src", str(variant), "--out", str(ema), "--config", str(torch_repo), "--ema", "--quiet"]) == 0
    with safe_open(str(ema / "unet" / PADDLE_FILES["unet"]), "np") as e, \
            safe_open(str(paddle_library / "unet" / PADDLE_FILES["unet"]), "np") as p:
        assert np.array_equal(e.get_tensor("conv_in.weight"), p.get_tensor("conv_in.weight") + 1)


def single_file_fails(args, tmp_path, capsys, out_name="out"):
    assert convert_main(args + ["--out", str(tmp_path / out_name), "--quiet"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error
    assert not (tmp_path / out_name).exists()
    return error


def test_builtin_configs_are_checked_against_the_tensor_shapes(single_file, tmp_path, capsys):
    alone = tmp_path / single_file.name  # without the .yaml convert.single_file writes beside it
    alone.write_bytes(single_file.read_bytes())
    error = single_file_fails(["--src", str(alone)], tmp_path, capsys)
    assert ("tensor 'model.diffusion_model.input_blocks.0.0.bias': shape [32] disagrees with unet/config.json, "
            "which gives conv_in.bias shape [320]") in error
    assert error.endswith("the built-in SD v1 configs do not fit this checkpoint: pass --config with the diffusers "
                          "folder or Hub id it was made from")  # the way out, named


@pytest.mark.parametrize("key, what", [("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "Stable Diffusion 2.x"),
                                       ("conditioner.embedders.1.model.ln_final.weight", "SDXL"),
                                       ("model.diffusion_model.label_emb.0.0.weight", "unknown tensor"),
                                       ("cond_stage_model.transformer.text_model.extra.weight", "unknown tensor"),
                                       ("some_other_model.weight", "unknown key")])
def test_other_architectures_and_unknown_keys(single_file, torch_repo, tmp_path, capsys, key, what):
    variant = write_variant(single_file, tmp_path / "x.safetensors", lambda s: s.__setitem__(key, torch.zeros(3, 3)))
    assert what in single_file_fails(["--src", str(variant), "--config", str(torch_repo)], tmp_path, capsys)


def test_truncated_single_file(single_file, torch_repo, tmp_path, capsys):
    variant = tmp_path / "cut.safetensors"
    variant.write_bytes(single_file.read_bytes()[:-4096])
    error = single_file_fails(["--src", str(variant), "--config", str(torch_repo)], tmp_path, capsys)
    assert f"{variant}: not a readable safetensors file" in error


def test_single_file_command_errors(torch_repo, single_file, tmp_path, capsys):
    assert single_file_main(["--src", str(torch_repo), "--out", str(tmp_path / "x.bin")]) == 1
    assert "must end in .safetensors or .ckpt" in capsys.readouterr().err
    assert single_file_main(["--src", str(torch_repo), "--out", str(single_file)]) == 1
    assert "exists (pass --overwrite" in capsys.readouterr().err
    broken = tmp_path / "broken"
    os.makedirs(broken / "unet")
    (broken / "model_index.json").write_text("{}")
    assert single_file_main(["--src", str(broken), "--out", str(tmp_path / "y.safetensors")]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_the_original_config_beside_a_single_file_is_read(tmp_path, monkeypatch):
    """convert.single_file writes FILE.yaml beside FILE; `convert --src FILE` reads it (no --config) and gives the
    library that converting the diffusers repo gives. This tiny model's text encoder is 64 wide with one head
    (CLIP's head size, which the YAML leaves to the reader); the UNet and VAE sizes come from the YAML."""
    import convert.builtin as builtin

    sizes = {**builtin.SIZES["tiny"], "text": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                                                    intermediate_size=128)}
    sizes["unet"] = {**sizes["unet"], "cross_attention_dim": 64}
    monkeypatch.setitem(builtin.SIZES, "tiny-clip64", sizes)
    repo = builtin.build(tmp_path / "repo", "tiny-clip64")
    direct, back, single = tmp_path / "direct", tmp_path / "back", tmp_path / "model.safetensors"
    assert convert_main(["--src", str(repo), "--out", str(direct), "--no-check", "--quiet"]) == 0
    assert single_file_main(["--src", str(repo), "--out", str(single), "--quiet"]) == 0
    assert single.with_suffix(".yaml").is_file()
    assert convert_main(["--src", str(single), "--out", str(back), "--quiet"]) == 0
    assert_same_library(back, direct)
    for part, keys in (("unet", ("block_out_channels", "cross_attention_dim", "attention_head_dim", "sample_size",
                                 "down_block_types", "up_block_types", "layers_per_block")),
                       ("vae", ("block_out_channels", "latent_channels", "layers_per_block")),
                       ("text_encoder", ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"))):
        expected, found = (json.loads((folder / part / "config.json").read_text()) for folder in (direct, back))
        assert {key: found[key] for key in keys} == {key: expected[key] for key in keys}, part
    assert json.loads((back / "conversion_report.json").read_text())["config_folder"] == "model.yaml beside it"


def test_a_single_file_source_gets_a_parity_run_against_diffusers_reading_it(torch_repo, single_file, tmp_path, capsys):
    """The torch side is diffusers' own from_single_file of the same file (code independent of ours)."""
    out = tmp_path / "checked"
    assert convert_main(["--src", str(single_file), "--out", str(out), "--config", str(torch_repo), "--quiet"]) == 0
    parity = json.loads((out / "conversion_report.json").read_text())["parity"]
    assert parity["passed"] and parity["torch_reference"] == "diffusers StableDiffusionPipeline.from_single_file"
    names = {check["name"] for check in parity["checks"]}
    assert {"unet", "vae_decode", "text_encoder", "pipeline"} <= names, names
    assert all(check["max_abs"] <= check["tolerance"] for check in parity["checks"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
