"""Paddle inference with and without riffusion.cpu_tuning (MKL's fast path on AMD CPUs, glibc reusing freed
memory, torch kept out of the process) on a reduced full-width UNet: Paddle dynamic and Paddle Inference
fp32 / bf16 (oneDNN), one UNet forward per step.

    python scripts/bench_cpu_tuning.py [--latent 32] [--batch 2] [--rounds 3] [--steps 3] [--work DIR]

The UNet keeps SD 1.5's widths and attention sizes on its first three levels (320/640/1280 channels, 8
heads, cross-attention to [batch, 77, 768]) with one resnet per block and random weights (316M parameters,
1.3 GB), so every side stays under --max-rss-gb (3 GB) where the full UNet (3.4 GB of weights) does not.
It is built and exported once (into --work, reused when there). Every side runs in a child process of its
own and the sides take turns (dynamic default, dynamic tuned, static-fp32 default, ...), round after round,
so load from other work on the machine hits them alike. Every child runs with USE_TORCH=0 (torch loaded
by ppdiffusers takes the dynamic side over 3 GB); "default" children have no MKL_* in their environment
and glibc's own malloc thresholds, "tuned" ones call tune_cpu_runtime before Paddle loads, "mkl" and
"malloc" apply one half of it. Prints each side's median seconds per forward, the tuned/default ratio of
the medians and of each round's pair, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import run_watched  # noqa: E402

RUNTIMES = ("dynamic", "static-fp32", "static-bf16")
TUNINGS = ("default", "tuned", "mkl", "malloc")
REDUCED = dict(block_out_channels=[320, 640, 1280], layers_per_block=1,
               down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
               attention_head_dim=8, cross_attention_dim=768, in_channels=4, out_channels=4, sample_size=64)
CONTEXT = 768


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latent", type=int, default=32, help="latent side (64: 512x512 images)")
    p.add_argument("--batch", type=int, default=2, help="2: one guided step")
    p.add_argument("--steps", type=int, default=3, help="timed forwards per child after one warm-up forward")
    p.add_argument("--rounds", type=int, default=3, help="children per side, run in turns")
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma-separated, from {','.join(RUNTIMES)}")
    p.add_argument("--tunings", default="default,tuned", help=f"comma-separated, from {','.join(TUNINGS)}")
    p.add_argument("--max-rss-gb", type=float, default=3.0, help="stop a child whose RSS passes this")
    p.add_argument("--work", type=Path, help="where the reduced UNet and its export live (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        return worker(args)
    runtimes = [name for name in args.runtimes.split(",") if name]
    tunings = [name for name in args.tunings.split(",") if name]
    unknown = [name for name in runtimes if name not in RUNTIMES] + [name for name in tunings if name not in TUNINGS]
    if unknown:
        print(f"error: unknown runtime or tuning {unknown[0]!r}", file=sys.stderr)
        return 2
    if "static-bf16" in runtimes:
        from export import precision

        if not precision.supported("bf16"):
            runtimes.remove("static-bf16")
            print("static-bf16 left out: this CPU reports no AVX512-BF16 or AMX", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-cpu-tuning-") as scratch:
        work = (args.work or Path(scratch)).absolute()
        error = prepare(work, args.max_rss_gb)
        if error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        results = {(runtime, tuning): {"times": [], "rounds": [], "peak_rss_gb": 0.0, "errors": []}
                   for runtime in runtimes for tuning in tunings}
        for _ in range(args.rounds):
            for runtime in runtimes:
                for tuning in tunings:
                    result = child(["--worker", f"{runtime}:{tuning}", "--work", str(work), "--latent", str(args.latent),
                                    "--batch", str(args.batch), "--steps", str(args.steps)], args.max_rss_gb)
                    entry = results[runtime, tuning]
                    if "error" in result:
                        entry["errors"].append(result["error"])
                        entry["rounds"].append(None)
                    else:
                        entry["times"] += result["times"]
                        entry["rounds"].append(statistics.median(result["times"]))
                        entry["peak_rss_gb"] = max(entry["peak_rss_gb"], result["peak_rss_gb"])
                        entry["torch_loaded"] = result["torch_loaded"]
                    print(f"  {runtime} {tuning}: {result}", file=sys.stderr, flush=True)
    print_table(results, runtimes, tunings, args)
    if args.json:
        args.json.write_text(json.dumps({f"{runtime}:{tuning}": entry for (runtime, tuning), entry in results.items()},
                                        indent=2) + "\n")
    return 0


def print_table(results: dict, runtimes: list[str], tunings: list[str], args) -> None:
    load = os.getloadavg()[0]
    print(f"UNet forward, SD 1.5 widths on 3 levels (316M parameters), batch {args.batch}, latent {args.latent}x"
          f"{args.latent}, fp32 inputs; median of {args.rounds} rounds x {args.steps} forwards; load average now "
          f"{load:.1f}")
    print(f"{'runtime':12} {'tuning':8} {'s/forward':>10} {'x default':>10} {'per round x default':>28} {'peak RSS GB':>12}")
    for runtime in runtimes:
        base = results.get((runtime, "default"), {})
        for tuning in tunings:
            entry = results[runtime, tuning]
            if not entry["times"]:
                print(f"{runtime:12} {tuning:8} {'; '.join(entry['errors'])}")
                continue
            median = statistics.median(entry["times"])
            ratio, rounds = "-", "-"
            if tuning != "default" and base.get("times"):
                ratio = f"{median / statistics.median(base['times']):.2f}"
                rounds = " ".join(f"{mine / theirs:.2f}" if mine and theirs else "-"
                                  for mine, theirs in zip(entry["rounds"], base["rounds"]))
            print(f"{runtime:12} {tuning:8} {median:10.2f} {ratio:>10} {rounds:>28} {entry['peak_rss_gb']:12.2f}")


def child(arguments: list[str], max_rss_gb: float) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MKL_")}
    env["USE_TORCH"] = "0"  # every side: with torch loaded by ppdiffusers the dynamic side passes 3 GB
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["GLOG_minloglevel"] = "2"
    return run_watched([sys.executable, str(Path(__file__).resolve())] + arguments, max_rss_gb,
                       stderr=subprocess.DEVNULL, env=env)


def prepare(work: Path, max_rss_gb: float) -> str | None:
    """Build and export the reduced UNet into `work` unless it is there; an error line or None."""
    if (work / "export" / "unet" / "inference.json").is_file():
        return None
    for step in ("build", "export"):
        print(f"{step} the reduced UNet ...", file=sys.stderr, flush=True)
        result = child(["--worker", step, "--work", str(work)], max_rss_gb)
        if "error" in result:
            return f"{step}: {result['error']}"
    return None


# --- children -------------------------------------------------------------------------------------


def worker(args) -> int:
    work = args.work
    if args.worker in ("build", "export"):
        _tune("tuned")  # torch kept out: less memory
    if args.worker == "build":
        return build(work)
    if args.worker == "export":
        return export(work)
    runtime, tuning = args.worker.split(":")
    _tune(tuning)
    import numpy as np

    from export.runtime import use_all_cores

    use_all_cores()
    rng = np.random.default_rng(0)
    inputs = {"sample": rng.standard_normal((args.batch, 4, args.latent, args.latent), dtype=np.float32),
              "timestep": np.array([500], dtype=np.float32),
              "encoder_hidden_states": rng.standard_normal((args.batch, 77, CONTEXT), dtype=np.float32)}
    forward = _dynamic(work, inputs) if runtime == "dynamic" else _static(work, inputs, runtime.split("-")[1])
    times = []
    for _ in range(1 + args.steps):
        began = time.perf_counter()
        forward()
        times.append(time.perf_counter() - began)
    print(json.dumps({"times": times[1:], "first_s": times[0], "peak_rss_gb": _peak_rss_gb(),
                      "torch_loaded": "torch" in sys.modules,
                      "env": {name: os.environ.get(name) for name in ("MKL_DEBUG_CPU_TYPE", "USE_TORCH")}}))
    return 0


def _tune(tuning: str) -> None:
    from riffusion import cpu_tuning

    if tuning == "tuned":
        cpu_tuning.tune_cpu_runtime()
    elif tuning == "mkl":
        os.environ.update({name: value for name, value in cpu_tuning.settings().items() if name.startswith("MKL_")})
    elif tuning == "malloc":
        cpu_tuning.reuse_freed_memory()


def build(work: Path) -> int:
    import paddle
    from ppdiffusers import UNet2DConditionModel

    paddle.seed(0)
    unet = UNet2DConditionModel(**REDUCED)
    unet.save_pretrained(str(work / "library" / "unet"))
    (work / "library" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["ppdiffusers", "UNet2DConditionModel"]}))
    print(json.dumps({"parameters": sum(int(p.size) for p in unet.parameters())}))
    return 0


def export(work: Path) -> int:
    """The static program as `python -m export` traces it, without its validation runs (which take the
    peak over 3 GB at this size; the export is validated on the tiny model by the tests)."""
    import paddle
    from paddle.static import InputSpec
    from ppdiffusers import UNet2DConditionModel

    from export.patches import UNetForExport, export_patches
    from export.runtime import CONFIG_NAME
    from export.specs import SPECS

    model = UNet2DConditionModel.from_pretrained(str(work / "library" / "unet"), low_cpu_mem_usage=True)
    model.eval()
    config = dict(model.config)
    folder = work / "export" / "unet"
    folder.mkdir(parents=True)
    with paddle.no_grad(), export_patches(model):
        wrapper = UNetForExport(model)
        wrapper.eval()
        specs = [InputSpec(item.shape(config), item.dtype, item.name) for item in SPECS["unet"].inputs]
        paddle.jit.save(paddle.jit.to_static(wrapper, input_spec=specs, full_graph=True), str(folder / "inference"))
    (folder / CONFIG_NAME).write_text(json.dumps(config, default=str))
    print(json.dumps({"exported": str(folder)}))
    return 0


def _dynamic(work: Path, inputs: dict):
    import paddle
    from ppdiffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(str(work / "library" / "unet"), low_cpu_mem_usage=True)
    model.eval()
    sample, context = paddle.to_tensor(inputs["sample"]), paddle.to_tensor(inputs["encoder_hidden_states"])
    timestep = paddle.to_tensor(inputs["timestep"])

    def forward():
        with paddle.no_grad():
            return model(sample, timestep, encoder_hidden_states=context).sample.numpy()

    return forward


def _static(work: Path, inputs: dict, precision: str):
    from export.runtime import load_unet

    unet = load_unet(work / "export", "static", precision=precision)
    return lambda: unet.session.run(inputs)[0]


def _peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
