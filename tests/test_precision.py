"""Reduced precision on the tiny model: bf16 (Paddle Inference oneDNN) and int8 (onnxruntime UNet) meet
their per-component and end-to-end bars and say so in the export report; bf16 is refused on a CPU that
reports no bfloat16 instructions; a variant below its PSNR bar is not kept; the runtime runs the fastest
variant the export timed and the CPU supports; the scheduler can be chosen."""

import json
import math
import shutil

import numpy as np
import pytest

from export import precision as precisions
from export.errors import ExportError

FIDELITY_STEPS = 4


@pytest.fixture(scope="module")
def reduced(paddle_library, tmp_path_factory):
    """The tiny library's UNet exported in every precision this CPU runs: (folder, report)."""
    from export.exporter import export_library

    wanted = ("fp32", "int8") + (("bf16",) if precisions.supported("bf16") else ())
    out = tmp_path_factory.mktemp("reduced") / "export"
    report = export_library(paddle_library, out, components=("unet",), precision=wanted, quiet=True,
                            fidelity_steps=FIDELITY_STEPS)
    return out, report


def test_each_precision_meets_its_bars_and_the_report_says_so(reduced):
    out, report = reduced
    variants = report["variants"]
    expected = {"static-fp32", "onnx-fp32", "onnx-int8"} | ({"static-bf16"} if precisions.supported("bf16") else set())
    assert set(variants) == expected
    assert report["fidelity"]["steps"] == FIDELITY_STEPS
    errors = report["components"]["unet"]["precisions"]
    for name, entry in variants.items():
        assert entry["timing"]["estimated_request_s"] > 0
        assert entry["timing"]["per_call_s"]["unet"] > 0
        if entry["precision"] == "fp32":
            continue
        # per component: max abs and relative error against fp32, within the precision's bar
        assert 0 < errors[name]["max_rel"] <= precisions.RELATIVE_TOLERANCE[entry["precision"]]
        assert errors[name]["max_abs"] > 0
        # end to end: image PSNR at or above the bar, audio spectral convergence measured
        assert entry["shipped"], entry
        assert entry["psnr_db"] >= precisions.MIN_PSNR_DB[entry["precision"]]
        assert 0 <= entry["spectral_convergence"] < 1
    assert (out / "unet" / precisions.INT8_MODEL).is_file()
    assert precisions.INT8_MODEL in report["components"]["unet"]["files"]
    written = json.loads((out / "export_report.json").read_text())
    assert written["variants"] == json.loads(json.dumps(variants))


def test_reduced_precision_runtimes_stay_within_their_bar(reduced, paddle_library):
    """The shipped programs, loaded as users load them, against the fp32 static program on new inputs."""
    from export.runtime import load_unet

    out, _ = reduced
    rng = np.random.default_rng(7)
    sample = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    context = rng.standard_normal((2, 77, 32), dtype=np.float32)
    timestep = np.array([500], dtype=np.float32)
    reference = load_unet(out, "static").session.run({"sample": sample, "timestep": timestep,
                                                      "encoder_hidden_states": context})[0]
    pairs = [("onnx", "int8")] + ([("static", "bf16")] if precisions.supported("bf16") else [])
    for backend, precision in pairs:
        unet = load_unet(out, backend, precision=precision)
        output = unet(sample, timestep, context).sample.numpy()
        _, relative = precisions.relative_error(reference, output)
        assert 0 < relative <= precisions.RELATIVE_TOLERANCE[precision], (backend, precision, relative)


def test_bf16_is_refused_where_the_cpu_reports_no_bfloat16(paddle_library, tmp_path, monkeypatch, capsys):
    from export.cli import main
    from export.runtime import PaddleInferenceSession

    monkeypatch.setattr(precisions, "cpu_flags", lambda: {"avx512f", "avx512_vnni"})
    out = tmp_path / "export"
    assert main(["--model", str(paddle_library), "--out", str(out), "--precision", "bf16", "--quiet"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert "bf16 needs a CPU with AVX512-BF16 or AMX" in error and "avx512_bf16" in error
    assert not out.exists()
    with pytest.raises(ExportError, match="AVX512-BF16"):
        PaddleInferenceSession(tmp_path, precision="bf16")


def test_int8_below_its_psnr_bar_is_not_kept(paddle_library, tmp_path, monkeypatch):
    from export.exporter import export_library
    from export.runtime import choose_variant

    monkeypatch.setitem(precisions.MIN_PSNR_DB, "int8", 1000.0)
    out = tmp_path / "export"
    report = export_library(paddle_library, out, components=("unet",), precision=("int8",), quiet=True,
                            fidelity_steps=2)
    entry = report["variants"]["onnx-int8"]
    assert not entry["shipped"] and "below 1000 dB" in entry["reason"]
    assert math.isfinite(entry["psnr_db"])
    assert not (out / "unet" / precisions.INT8_MODEL).exists()
    assert precisions.INT8_MODEL not in report["components"]["unet"]["files"]
    with pytest.raises(ExportError, match="holds no int8 programs: image PSNR"):
        choose_variant(out, precision="int8")


def fake_export(folder, timings, shipped=None):
    """An export folder holding UNet program files and a report with the given estimated request times."""
    (folder / "unet").mkdir(parents=True)
    for name in ("inference.json", "model.onnx"):
        (folder / "unet" / name).write_text("")
    variants = {}
    for name, seconds in timings.items():
        runtime, precision = name.split("-")
        kept = (shipped or {}).get(name, True)
        variants[name] = {"runtime": runtime, "precision": precision, "shipped": kept,
                          "timing": {"estimated_request_s": seconds}}
        if not kept:
            variants[name]["reason"] = "image PSNR 12.0 dB against fp32 is below 30 dB"
    (folder / "export_report.json").write_text(json.dumps({"variants": variants}))
    return folder


def test_the_runtime_runs_the_fastest_variant_it_can(tmp_path, monkeypatch):
    from export.runtime import choose_variant

    monkeypatch.setattr(precisions, "cpu_flags", lambda: {"avx512_bf16"})
    times = {"static-fp32": 9.0, "static-bf16": 6.0, "onnx-fp32": 8.0, "onnx-int8": 7.0}
    out = fake_export(tmp_path / "a", times)
    assert choose_variant(out) == ("static", "bf16")
    assert choose_variant(out, runtime="onnx") == ("onnx", "int8")
    assert choose_variant(out, precision="fp32") == ("onnx", "fp32")
    assert choose_variant(out, runtime="static", precision="fp32") == ("static", "fp32")
    # the same export on a CPU without bfloat16: the next fastest
    monkeypatch.setattr(precisions, "cpu_flags", lambda: {"avx512f"})
    assert choose_variant(out) == ("onnx", "int8")
    with pytest.raises(ExportError, match="AVX512-BF16"):
        choose_variant(out, precision="bf16")
    # a variant that was not kept is never run
    out = fake_export(tmp_path / "b", times, shipped={"onnx-int8": False})
    assert choose_variant(out) == ("onnx", "fp32")
    with pytest.raises(ExportError, match="below 30 dB"):
        choose_variant(out, precision="int8")
    with pytest.raises(ExportError, match="runtime static has no int8"):
        choose_variant(out, runtime="static", precision="int8")
    # an export without timings: Paddle Inference fp32
    out = fake_export(tmp_path / "c", {})
    assert choose_variant(out) == ("static", "fp32")
    shutil.rmtree(out / "unet")
    (out / "unet").mkdir()
    (out / "unet" / "model.onnx").write_text("")
    assert choose_variant(out) == ("onnx", "fp32")


def test_scheduler_choice(paddle_library, exported):
    """--scheduler dpmsolver++ swaps in DPM-Solver++ (configured from the library's scheduler), which
    draws a different image from the same seeds; the default keeps the library's PNDM."""
    from PIL import Image

    from riffusion.cli import parser
    from riffusion.pipeline import PromptInput, RiffusionPipeline

    out, _ = exported
    seed_image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    start, end = PromptInput("jazz", seed=1), PromptInput("rock", seed=2)
    images = {}
    for name, cls in (("library", "PNDMScheduler"), ("dpmsolver++", "DPMSolverMultistepScheduler")):
        pipe = RiffusionPipeline.from_pretrained(str(paddle_library), exported=str(out), scheduler=name)
        assert type(pipe.pipe.scheduler).__name__ == cls
        images[name] = np.asarray(pipe.interpolate(start, end, 0.5, seed_image, num_inference_steps=6), dtype=np.float64)
        assert images[name].shape == (64, 64, 3) and images[name].std() > 0
    assert pipe.pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.pipe.scheduler.config.beta_schedule == "scaled_linear"  # from the library's config
    assert np.abs(images["library"] - images["dpmsolver++"]).max() > 0
    with pytest.raises(ValueError, match="unknown scheduler 'euler'"):
        RiffusionPipeline.from_pretrained(str(paddle_library), scheduler="euler")
    args = parser().parse_args(["text-to-audio", "x", "o.wav", "--checkpoint", "c", "--scheduler", "dpmsolver++",
                                "--precision", "bf16"])
    assert (args.scheduler, args.precision) == ("dpmsolver++", "bf16")


def test_parity_holds_each_exported_precision_to_its_bar(torch_repo, paddle_library, reduced):
    """convert.parity --exported compares the bf16 and int8 programs with torch too, each with its own bar."""
    from convert.parity import run_parity

    out, _ = reduced
    checks, _ = run_parity(str(torch_repo), paddle_library, steps=2, exported=out)
    by_name = {check.name: check for check in checks}
    names = ["unet[static]", "unet[onnx]", "unet[onnx-int8]"] + (["unet[static-bf16]"] if precisions.supported("bf16") else [])
    for name in names:
        check = by_name[name]
        assert check.passed, check
        variant = name[len("unet["):-1]
        if "-" in variant:
            bar = precisions.RELATIVE_TOLERANCE[variant.split("-")[1]]
            assert check.max_rel <= bar and check.tolerance > 1e-4 and "relative" in check.detail
            assert check.max_abs > by_name["unet[static]"].max_abs  # reduced precision does cost something
        else:
            assert check.tolerance == 1e-4


def test_release_manifest_and_card_carry_the_variants(reduced):
    """The release manifest's export entry and the model card's table say what each precision costs."""
    from convert.release.assemble import variants
    from convert.release.card import precisions_table

    _, report = reduced
    summary = variants(report)
    int8 = summary["onnx-int8"]
    assert int8["psnr_db"] == report["variants"]["onnx-int8"]["psnr_db"] and int8["shipped"]
    assert int8["components"]["unet"]["max_rel"] == report["components"]["unet"]["precisions"]["onnx-int8"]["max_rel"]
    assert summary["static-fp32"]["estimated_request_s"] == report["variants"]["static-fp32"]["timing"]["estimated_request_s"]
    table = precisions_table(summary)
    assert f"| `onnx-int8` | {int8['estimated_request_s']:.1f} s | {int8['components']['unet']['max_rel']:.1e} | " \
           f"{int8['psnr_db']:.1f} dB | {int8['spectral_convergence']:.4f} | yes |" in table
    assert "| `static-fp32` |" in table and "reference" in table
    assert precisions_table({}) == ""


def test_a_variant_run_that_dies_is_a_clear_export_error():
    """The fidelity request and the int8 quantization run in child processes (so one variant's memory is
    freed before the next); a child killed mid-way (as the OOM killer does) is an ExportError naming it."""
    import os

    from export.exporter import _in_child

    assert _in_child("a sum", sum, [1, 2, 3]) == 6
    with pytest.raises(ExportError, match="the fidelity request on static-bf16 stopped without an answer"):
        _in_child("the fidelity request on static-bf16", os._exit, 9)


def test_an_int8_quantization_that_dies_leaves_the_other_variants(paddle_library, tmp_path, monkeypatch):
    """onnxruntime's calibration of the full-size UNet needed over 15 GB here and was killed; the export
    then keeps its fp32 variants and records why int8 is missing instead of throwing the export away."""
    from export import exporter

    real = exporter._in_child

    def out_of_memory(what, function, *args):
        if "quantization" in what:
            raise ExportError(f"{what} stopped without an answer (killed, likely for lack of memory)")
        return real(what, function, *args)

    monkeypatch.setattr(exporter, "_in_child", out_of_memory)
    out = tmp_path / "export"
    report = exporter.export_library(paddle_library, out, components=("unet",), precision=("int8",), quiet=True,
                                     fidelity_steps=2)
    entry = report["variants"]["onnx-int8"]
    assert not entry["shipped"] and "lack of memory" in entry["reason"]
    assert report["variants"]["onnx-fp32"]["shipped"] and "timing" in report["variants"]["onnx-fp32"]
    assert not list((out / "unet").glob("*int8*"))
    assert json.loads((out / "export_report.json").read_text())["variants"]["onnx-int8"]["shipped"] is False


def test_int8_keeps_in_fp32_what_has_no_int8_kernel_or_a_wide_range(reduced):
    """The int8 UNet quantizes the weighted MatMuls and 3x3 convolutions only: the attention's
    activation-by-activation MatMuls (no int8 kernel), 1x1 convolutions and the first and last
    convolutions stay fp32, and the written int8 program holds quantized nodes of each kept kind."""
    import onnx

    out, report = reduced
    model = out / "unet" / "model.onnx"
    graph = onnx.load(str(model)).graph
    weights = {initializer.name: list(initializer.dims) for initializer in graph.initializer}
    kept = set(precisions.kept_in_fp32(model))
    convolutions = [node for node in graph.node if node.op_type == "Conv"]
    assert {convolutions[0].name, convolutions[-1].name} <= kept
    for node in graph.node:
        if node.op_type in ("MatMul", "Conv") and node.name not in (convolutions[0].name, convolutions[-1].name):
            weight = weights.get(node.input[1])
            quantized = weight is not None and not (node.op_type == "Conv" and weight[2:] == [1, 1])
            assert (node.name not in kept) == quantized, node.name
    assert report["variants"]["onnx-int8"]["quantization"]["nodes_kept_fp32"] == len(kept)
    int8 = onnx.load(str(out / "unet" / precisions.INT8_MODEL)).graph
    dequantized = {node.output[0] for node in int8.node if node.op_type == "DequantizeLinear"}
    fed = {node.op_type for node in int8.node if node.op_type in ("MatMul", "Conv") and node.input[0] in dequantized}
    assert fed == {"MatMul", "Conv"}


def test_lean_calibration_finds_the_ranges_onnxruntime_finds(reduced, tmp_path):
    """precision.calibrate (the calibrator that fits the full-size UNet in 6 GB instead of 22+) gives the
    same activation ranges as onnxruntime's own MinMax calibrator on the same inputs."""
    from onnxruntime.quantization.calibrate import create_calibrator

    out, _ = reduced
    model = out / "unet" / "model.onnx"
    feeds = unet_feeds(model, 3)
    lean = precisions.calibrate(model, feeds, tmp_path / "lean.onnx", external=False)
    stock = create_calibrator(model, list(precisions.INT8_OP_TYPES), str(tmp_path / "stock.onnx"),
                              extra_options={"moving_average": True})

    class Feeds:
        def __init__(self):
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    stock.collect_data(Feeds())
    expected = stock.compute_data()
    assert set(lean.data) == set(expected.data) and len(expected.data) > 100
    for name, value in expected.data.items():
        np.testing.assert_allclose(lean.data[name].range_value, value.range_value, rtol=1e-5, atol=1e-6)


def unet_feeds(model, count: int) -> list[dict]:
    """`count` random inputs of the exported UNet at batch 2, 8x8 latents."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    width = {item.name: item.type.tensor_type.shape.dim[-1].dim_value for item in graph.input}
    rng = np.random.default_rng(0)
    return [{"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
             "timestep": np.array([900.0 - 200 * index], dtype=np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, width["encoder_hidden_states"]), dtype=np.float32)}
            for index in range(count)]


def test_bench_app_times_every_stage_of_every_backend(torch_repo, paddle_library, exported, reduced, tmp_path,
                                                      monkeypatch):
    """scripts/bench_app.py's per-backend worker times each stage of a request (text encoding, VAE encode,
    UNet, VAE decode, audio, MP3) above zero in torch, Paddle dynamic, Paddle Inference fp32/bf16 and
    onnxruntime fp32/int8, with the precision it was asked for. The Paddle pipeline keeps the prompt encodings
    of its untimed warm-up request, which left text encoding at 0.00 s in every Paddle row."""
    import importlib.util
    from pathlib import Path

    from riffusion.cpu_tuning import SWITCH

    monkeypatch.setenv(SWITCH, "0")  # the workers run in this process: leave its environment as it is
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_app.py"
    spec = importlib.util.spec_from_file_location("bench_app", script)
    bench_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_app)

    everything, _ = exported  # every component exported, fp32
    unet_only, _ = reduced  # the UNet in every precision this CPU runs
    runs = [("torch", everything, "fp32"), ("dynamic", everything, "fp32"), ("static-fp32", everything, "fp32"),
            ("onnx-fp32", everything, "fp32"), ("onnx-int8", unet_only, "int8")]
    if precisions.supported("bf16"):
        runs.append(("static-bf16", unet_only, "bf16"))
    calls = {}
    for backend, export, precision in runs:
        output = tmp_path / f"{backend}.json"
        assert bench_app.main(["--worker", backend, "--output", str(output), "--model", str(paddle_library),
                               "--torch", str(torch_repo), "--export", str(export), "--steps", "2"]) == 0
        result = json.loads(output.read_text())
        assert set(result["stages_s"]) == set(bench_app.STAGES)
        for stage, seconds in result["stages_s"].items():
            assert seconds > 0, (backend, stage, result)
        assert result["unet_step_s"] > 0
        calls[backend] = result["unet_calls"]
        if backend != "torch":
            assert (result["runtime"], result["precision"]) == (backend.split("-")[0], precision)
    assert set(calls.values()) == {calls["torch"]} and calls["torch"] >= 1, calls  # one schedule everywhere
