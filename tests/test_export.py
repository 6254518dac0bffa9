"""export/: static (Paddle Inference, oneDNN) and ONNX (onnxruntime) exports of the tiny library match the
dynamic ppdiffusers models and the torch originals at sizes and batches other than the ones they were
validated at; pipelines built on them draw the same image; bad input fails cleanly."""

import json
import shutil

import numpy as np
import pytest

from export.cli import main
from export.specs import SPECS

BACKENDS = ("static", "onnx")
# (batch, latent height, latent width): odd sizes whose upsampling needs the skip connection's size,
# and batches other than the export's validation ones. (At 6x4 latents and below the deepest levels of the
# tiny UNet normalise a handful of values and Paddle's own CPU group_norm drifts 3e-4 from torch.)
UNET_SIZES = [(3, 9, 13), (1, 10, 14)]


@pytest.fixture(scope="module")
def runtimes(exported):
    from export.runtime import load_component

    out, _ = exported
    return {(name, backend): load_component(out, name, backend) for name in SPECS for backend in BACKENDS}


@pytest.fixture(scope="module")
def dynamic(paddle_library):
    import paddle
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextModel

    models = {
        "unet": UNet2DConditionModel.from_pretrained(str(paddle_library / "unet")),
        "text_encoder": CLIPTextModel.from_pretrained(str(paddle_library / "text_encoder"), paddle_dtype=paddle.float32),
        "vae": AutoencoderKL.from_pretrained(str(paddle_library / "vae")),
    }
    for model in models.values():
        model.eval()
    return models


@pytest.fixture(scope="module")
def torch_models(torch_repo):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return {
        "unet": UNet2DConditionModel.from_pretrained(torch_repo / "unet").eval(),
        "text_encoder": CLIPTextModel.from_pretrained(torch_repo / "text_encoder").eval(),
        "vae": AutoencoderKL.from_pretrained(torch_repo / "vae").eval(),
    }


def max_abs(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b)))


def test_export_writes_every_component_and_validates_it(exported):
    out, report = exported
    for name, spec in SPECS.items():
        files = {path.name for path in (out / name).iterdir()}
        assert {"inference.json", "inference.pdiparams", "model.onnx", "config.json"} <= files
        checks = report["components"][name]["validation"]
        assert {check["runtime"] for check in checks} == set(BACKENDS)
        assert len(checks) == 4 and all(check["passed"] and check["max_abs"] <= spec.tolerance for check in checks)
    saved = json.loads((out / "export_report.json").read_text())
    assert saved["components"].keys() == set(SPECS)
    assert not list(out.parent.glob(".*partial*"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,height,width", UNET_SIZES)
def test_unet_matches_dynamic_and_torch_at_other_sizes(runtimes, dynamic, torch_models, backend, batch, height, width):
    import paddle
    import torch

    rng = np.random.default_rng(batch * 100 + height)
    sample = rng.standard_normal((batch, 4, height, width)).astype(np.float32)
    context = rng.standard_normal((batch, 77, 32)).astype(np.float32)
    timestep = 741
    unet = runtimes["unet", backend]
    got = unet(paddle.to_tensor(sample), paddle.to_tensor(timestep), encoder_hidden_states=paddle.to_tensor(context)).sample
    with paddle.no_grad():
        reference = dynamic["unet"](paddle.to_tensor(sample), timestep, encoder_hidden_states=paddle.to_tensor(context)).sample
    with torch.no_grad():
        original = torch_models["unet"](torch.from_numpy(sample), timestep, torch.from_numpy(context)).sample
    assert got.shape == [batch, 4, height, width]
    assert max_abs(got.numpy(), reference.numpy()) <= SPECS["unet"].tolerance
    assert max_abs(got.numpy(), original.numpy()) <= SPECS["unet"].tolerance


def test_unet_takes_one_timestep_per_sample(runtimes, dynamic):
    import paddle

    rng = np.random.default_rng(5)
    sample = paddle.to_tensor(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    context = paddle.to_tensor(rng.standard_normal((2, 77, 32)).astype(np.float32))
    timesteps = paddle.to_tensor([981, 21], dtype="int64")
    with paddle.no_grad():
        reference = dynamic["unet"](sample, timesteps, encoder_hidden_states=context).sample.numpy()
    for backend in BACKENDS:
        got = runtimes["unet", backend](sample, timesteps, context, return_dict=False)[0].numpy()
        assert max_abs(got, reference) <= SPECS["unet"].tolerance


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,length", [(3, 77), (1, 20)])
def test_text_encoder_matches_dynamic_and_torch(runtimes, dynamic, torch_models, paddle_library, backend, batch, length):
    import paddle
    import torch
    from ppdiffusers.transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(paddle_library / "tokenizer"))
    prompts = ["funky synth solo", "", "jazzy rapping from paris " * 10][:batch]
    ids = np.array(tokenizer(prompts, padding="max_length", max_length=length, truncation=True)["input_ids"], dtype=np.int64)
    got = runtimes["text_encoder", backend](paddle.to_tensor(ids))
    with paddle.no_grad():
        reference = dynamic["text_encoder"](paddle.to_tensor(ids), return_dict=True)
    with torch.no_grad():
        original = torch_models["text_encoder"](torch.from_numpy(ids))
    tolerance = SPECS["text_encoder"].tolerance
    assert max_abs(got[0].numpy(), reference.last_hidden_state.numpy()) <= tolerance
    assert max_abs(got.pooler_output.numpy(), reference.pooler_output.numpy()) <= tolerance
    assert max_abs(got.last_hidden_state.numpy(), original.last_hidden_state.numpy()) <= tolerance
    assert max_abs(got.pooler_output.numpy(), original.pooler_output.numpy()) <= tolerance


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,height,width", [(3, 40, 72), (1, 64, 24)])
def test_vae_matches_dynamic_and_torch(runtimes, dynamic, torch_models, backend, batch, height, width):
    import paddle
    import torch

    from export.runtime import VaeRuntime

    rng = np.random.default_rng(height)
    image = rng.uniform(-1, 1, (batch, 3, height, width)).astype(np.float32)
    latents = rng.standard_normal((batch, 4, height // 8, width // 8)).astype(np.float32) / 0.18215
    vae = VaeRuntime(runtimes["vae_encoder", backend], runtimes["vae_decoder", backend], dict(dynamic["vae"].config))
    posterior = vae.encode(paddle.to_tensor(image)).latent_dist
    decoded = vae.decode(paddle.to_tensor(latents)).sample
    with paddle.no_grad():
        reference_posterior = dynamic["vae"].encode(paddle.to_tensor(image)).latent_dist
        reference_decoded = dynamic["vae"].decode(paddle.to_tensor(latents)).sample
    with torch.no_grad():
        original_posterior = torch_models["vae"].encode(torch.from_numpy(image)).latent_dist
        original_decoded = torch_models["vae"].decode(torch.from_numpy(latents)).sample
    assert max_abs(posterior.parameters.numpy(), reference_posterior.parameters.numpy()) <= SPECS["vae_encoder"].tolerance
    assert max_abs(posterior.mean.numpy(), original_posterior.mean.numpy()) <= SPECS["vae_encoder"].tolerance
    assert max_abs(decoded.numpy(), reference_decoded.numpy()) <= SPECS["vae_decoder"].tolerance
    assert max_abs(decoded.numpy(), original_decoded.numpy()) <= SPECS["vae_decoder"].tolerance


def test_pipelines_on_static_and_onnx_components_draw_the_same_image(paddle_library, exported):
    import paddle

    from export.runtime import UNetRuntime, VaeRuntime, load_pipeline

    out, _ = exported
    images = {}
    for backend in ("dynamic",) + BACKENDS:
        pipe = load_pipeline(paddle_library, out, unet=backend, text_encoder=backend, vae=backend)
        if backend != "dynamic":
            assert isinstance(pipe.unet, UNetRuntime) and isinstance(pipe.vae, VaeRuntime)
        images[backend] = pipe("church bells", negative_prompt="noise", num_inference_steps=3, guidance_scale=7.0,
                               height=64, width=96, generator=paddle.Generator().manual_seed(7), output_type="np").images
    assert images["dynamic"].shape == (1, 64, 96, 3) and images["dynamic"].std() > 0
    for backend in BACKENDS:
        assert max_abs(images[backend], images["dynamic"]) <= 1e-3
    mixed = load_pipeline(paddle_library, out, unet="onnx", text_encoder="static", vae="dynamic")
    image = mixed("church bells", negative_prompt="noise", num_inference_steps=3, guidance_scale=7.0, height=64, width=96,
                  generator=paddle.Generator().manual_seed(7), output_type="np").images
    assert max_abs(image, images["dynamic"]) <= 1e-3


def test_riffusion_pipeline_runs_on_exported_components(paddle_library, exported):
    import paddle
    from PIL import Image

    from export.runtime import load_pipeline
    from riffusion.pipeline import PromptInput, RiffusionPipeline

    out, _ = exported
    seed_image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    # guidance 1: with 7 the tiny random UNet turns 1e-4 differences into 1e-2 over a few img2img steps,
    # whichever two implementations (torch, Paddle dynamic, static, ONNX) are compared
    start, end = PromptInput("jazz", seed=1, guidance=1.0), PromptInput("rock", seed=2, guidance=1.0)
    latents = {}
    for backend in ("dynamic",) + BACKENDS:
        pipe = RiffusionPipeline(load_pipeline(paddle_library, out, unet=backend, text_encoder=backend, vae=backend))
        latents[backend] = pipe.interpolate_latents(start, end, 0.5, seed_image, num_inference_steps=4).numpy()
    for backend in BACKENDS:
        assert max_abs(latents[backend], latents["dynamic"]) <= 1e-3
    assert pipe.decode(paddle.to_tensor(latents["onnx"])).size == (64, 64)


def test_static_unet_is_right_without_our_inplace_workaround(exported, dynamic):
    """Paddle 3.3's PIR inplace pass lets oneDNN's sin/cos/silu overwrite inputs others still read; the
    runtime turns it off, and the exported program (timestep embedding) is right with it on too."""
    import paddle
    import paddle.inference as paddle_infer

    out, _ = exported
    rng = np.random.default_rng(3)
    inputs = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32), "timestep": np.array([500.0], np.float32),
              "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}
    with paddle.no_grad():
        reference = dynamic["unet"](*(paddle.to_tensor(inputs[name]) for name in inputs)).sample.numpy()
    paddle.set_flags({"FLAGS_pir_apply_inplace_pass": True})
    try:
        config = paddle_infer.Config(str(out / "unet" / "inference.json"), str(out / "unet" / "inference.pdiparams"))
        config.disable_gpu()
        config.enable_onednn()
        predictor = paddle_infer.create_predictor(config)
        for name in predictor.get_input_names():
            handle = predictor.get_input_handle(name)
            handle.reshape(list(inputs[name].shape))
            handle.copy_from_cpu(inputs[name])
        predictor.run()
        got = predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()
    finally:
        paddle.set_flags({"FLAGS_pir_apply_inplace_pass": False})
    assert max_abs(got, reference) <= SPECS["unet"].tolerance


def _optimized_program(folder, optim_dir, monkeypatch):
    """A PaddleInferenceSession on `folder` and the program Paddle Inference made of it (its passes applied)."""
    import paddle.inference as paddle_infer

    from export.runtime import PaddleInferenceSession

    create = paddle_infer.create_predictor

    def create_saving(config):
        config.enable_save_optim_model(True)
        config.set_optim_cache_dir(str(optim_dir))
        return create(config)

    with monkeypatch.context() as patch:
        patch.setattr(paddle_infer, "create_predictor", create_saving)
        session = PaddleInferenceSession(folder)
    return session, (optim_dir / "_optimized.json").read_text()


def test_static_self_attention_runs_in_the_fused_kernel(exported, dynamic, tmp_path, monkeypatch):
    """Every self-attention of the UNet and the VAE is one `self_dp_attention`, not a materialised score matrix."""
    from paddle.base import core

    if not core.supports_avx512f():
        pytest.skip("the fused attention kernel needs AVX-512")
    out, _ = exported
    counts = {"unet": sum(name.endswith("attn1") for name, _ in dynamic["unet"].named_sublayers()), "vae_decoder": 1}
    for name, count in counts.items():
        _, program = _optimized_program(out / name, tmp_path / name, monkeypatch)
        assert program.count("self_dp_attention") == count


def test_static_unet_without_avx512_runs_unfused_and_right(exported, dynamic, tmp_path, monkeypatch):
    import paddle
    from paddle.base import core

    monkeypatch.setattr(core, "supports_avx512f", lambda: False)
    out, _ = exported
    session, program = _optimized_program(out / "unet", tmp_path, monkeypatch)
    assert "self_dp_attention" not in program
    rng = np.random.default_rng(4)
    inputs = {"sample": rng.standard_normal((2, 4, 9, 13)).astype(np.float32), "timestep": np.array([500.0], np.float32),
              "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}
    with paddle.no_grad():
        reference = dynamic["unet"](*(paddle.to_tensor(inputs[name]) for name in inputs)).sample.numpy()
    assert max_abs(session.run(inputs)[0], reference) <= SPECS["unet"].tolerance


def test_runtime_refuses_inputs_that_do_not_fit(runtimes):
    import paddle

    unet = runtimes["unet", "static"]
    with pytest.raises(ValueError, match=r"unet input 'sample': expected shape \['batch', 4, 'height', 'width'\], got \[1, 3, 8, 8\]"):
        unet(paddle.zeros([1, 3, 8, 8]), 1, paddle.zeros([1, 77, 32]))
    with pytest.raises(ValueError, match="not class_labels"):
        unet(paddle.zeros([1, 4, 8, 8]), 1, paddle.zeros([1, 77, 32]), class_labels=paddle.zeros([1]))
    with pytest.raises(ValueError, match="at most 77 tokens, got 78"):
        runtimes["text_encoder", "onnx"](paddle.zeros([1, 78], dtype="int64"))


def test_external_data_path_for_models_over_the_protobuf_limit(paddle_library, tmp_path, monkeypatch):
    """The full-size fp32 UNet (3.4 GB) takes this path; here a tiny VAE decoder is pushed onto it."""
    from export import onnx_export
    from export.exporter import export_library
    from export.runtime import load_component

    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 0)
    out = tmp_path / "export"
    report = export_library(paddle_library, out, components=("vae_decoder",), onnx=True, quiet=True)
    assert (out / "vae_decoder" / "model.onnx.data").stat().st_size > (out / "vae_decoder" / "model.onnx").stat().st_size
    assert "model.onnx.data" in report["components"]["vae_decoder"]["files"]
    assert all(check["passed"] for check in report["components"]["vae_decoder"]["validation"])
    decoder = load_component(out, "vae_decoder", "onnx")
    assert decoder.run(latent_sample=np.zeros((1, 4, 3, 5), np.float32))[0].shape == (1, 3, 24, 40)


# --- bad input: one line, exit status 1, nothing written ----------------------------------------


def run_cli(capsys, *args) -> tuple[int, str]:
    status = main([str(arg) for arg in args])
    return status, capsys.readouterr().err.strip()


def test_a_torch_repo_is_not_a_converted_library(torch_repo, tmp_path, capsys):
    status, err = run_cli(capsys, "--model", torch_repo, "--out", tmp_path / "out", "--quiet")
    assert status == 1 and err.startswith("error: ") and "not a converted library" in err and "python -m convert" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_a_folder_without_model_index(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    status, err = run_cli(capsys, "--model", tmp_path / "empty", "--out", tmp_path / "out", "--quiet")
    assert status == 1 and "no model_index.json" in err and not (tmp_path / "out").exists()


def test_a_missing_component(paddle_library, tmp_path, capsys):
    library = shutil.copytree(paddle_library, tmp_path / "library")
    shutil.rmtree(library / "vae")
    status, err = run_cli(capsys, "--model", library, "--out", tmp_path / "out", "--components", "vae_decoder", "--quiet")
    assert status == 1 and "vae" in err and "missing" in err and not (tmp_path / "out").exists()
    index = json.loads((library / "model_index.json").read_text())
    index["unet"] = [None, None]
    (library / "model_index.json").write_text(json.dumps(index))
    status, err = run_cli(capsys, "--model", library, "--out", tmp_path / "out", "--components", "unet", "--quiet")
    assert status == 1 and err == f"error: {library / 'model_index.json'}: the library has no unet"


def test_unknown_component_and_unsupported_size(paddle_library, tmp_path, capsys):
    status, err = run_cli(capsys, "--model", paddle_library, "--out", tmp_path / "out", "--components", "unet,safety_checker")
    assert status == 1 and "unknown component 'safety_checker'" in err
    status, err = run_cli(capsys, "--model", paddle_library, "--out", tmp_path / "out", "--height", "100")
    assert status == 1 and "--height 100: unsupported image size, must be a positive multiple of 8" in err
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_is_kept(paddle_library, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    status, err = run_cli(capsys, "--model", paddle_library, "--out", out, "--components", "vae_decoder", "--quiet")
    assert status == 1 and "not empty" in err and (out / "keep.txt").read_text() == "mine"
