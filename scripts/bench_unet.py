"""One UNet step (default: batch 2, 64x64 latents, fp32, as a 512x512 pipeline with guidance runs it)
through torch eager, Paddle dynamic, Paddle Inference and onnxruntime, plus the export's time and
peak memory.

    python scripts/bench_unet.py --model LIBRARY [--torch TORCH_REPO] [--export EXPORT] [--device cpu|gpu]

LIBRARY is a converted ppdiffusers library, TORCH_REPO the torch diffusers repo it came from (for the
torch eager row and parity against torch; without it the ratios are to Paddle dynamic). Without
--export the UNet is exported first (static + ONNX) into a temporary folder and that run is timed.
Each backend runs in a child process of its own, so peak RSS is per backend and no two runtimes share
thread pools; the Paddle and onnxruntime ones run with riffusion.cpu_tuning as the riffusion commands do
(RIFFUSION_CPU_TUNING=0: without). Every backend sees the same inputs; the table gives each output's max
abs difference from torch and from Paddle dynamic. --device gpu: torch CUDA, Paddle GPU, Paddle Inference GPU
(--fp16 half precision, --tensorrt TensorRT subgraphs), onnxruntime CUDA (TensorRT provider with
--tensorrt); --fp16 also runs torch and Paddle dynamic in half precision.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "dynamic", "static", "onnx")
NAMES = {"torch": "torch eager", "dynamic": "Paddle dynamic", "static": "Paddle Inference", "onnx": "onnxruntime"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="converted ppdiffusers library")
    p.add_argument("--torch", type=Path, help="the torch diffusers repo the library was converted from")
    p.add_argument("--export", type=Path, help="an existing `python -m export` folder (default: export now, timed)")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=64, help="latent height and width (64 = 512x512 pixels)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps after the first (warm-up) one; the median counts")
    p.add_argument("--threads", type=int, help="CPU threads per backend (default: all cores)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--fp16", action="store_true", help="gpu: half precision")
    p.add_argument("--tensorrt", action="store_true", help="gpu: TensorRT in Paddle Inference and onnxruntime")
    p.add_argument("--paddle-default-threads", action="store_true",
                   help="run Paddle dynamic with the one CPU thread `import paddle` leaves it (default: all cores)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    return p


# --- parent: orchestrate children ----------------------------------------------------------------


def run_child(command: list[str], env: dict | None = None) -> tuple[int, float, float, str]:
    """(exit status, wall seconds, peak RSS in GB, output) of one child process."""
    started = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        log.seek(0)
        output = log.read()
    return process.returncode, seconds, usage.ru_maxrss / 1e6, output


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name in ("model", "torch", "export", "json", "inputs", "output"):  # the children run in the checkout's root
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).absolute())
    if args.worker:
        return worker(args)
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    if "torch" in backends and args.torch is None:
        backends.remove("torch")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    results: dict = {"device": args.device, "batch": args.batch, "latent": args.latent, "fp16": args.fp16,
                     "tensorrt": args.tensorrt, "threads": args.threads or _cores(), "backends": {}}
    with tempfile.TemporaryDirectory(prefix="bench-unet-") as scratch:
        scratch = Path(scratch)
        export = args.export
        if export is None and {"static", "onnx"} & set(backends):
            export = scratch / "export"
            command = [sys.executable, "-m", "export", "--model", str(args.model), "--out", str(export),
                       "--components", "unet", "--quiet"] + (["--onnx"] if "onnx" in backends else [])
            print("exporting the UNet ...", file=sys.stderr, flush=True)
            status, seconds, rss, output = run_child(command, env)
            if status != 0:
                print(output[-3000:], file=sys.stderr)
                return 1
            results["export"] = {"seconds": round(seconds, 1), "peak_rss_gb": round(rss, 2), "onnx": "onnx" in backends}

        rng = np.random.default_rng(0)
        context_dim = json.loads((args.model / "unet" / "config.json").read_text())["cross_attention_dim"]
        inputs = scratch / "inputs.npz"
        np.savez(inputs, sample=rng.standard_normal((args.batch, 4, args.latent, args.latent)).astype(np.float32),
                 timestep=np.array([981], dtype=np.int64),
                 encoder_hidden_states=rng.standard_normal((args.batch, 77, context_dim)).astype(np.float32))
        outputs = {}
        for backend in backends:
            print(f"{NAMES[backend]} ...", file=sys.stderr, flush=True)
            output = scratch / f"{backend}.npy"
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", backend, "--inputs", str(inputs),
                       "--output", str(output), "--model", str(args.model), "--batch", str(args.batch),
                       "--repeats", str(args.repeats), "--device", args.device]
            command += ["--torch", str(args.torch)] if args.torch else []
            command += ["--export", str(export)] if export else []
            command += ["--threads", str(args.threads)] if args.threads else []
            command += ["--fp16"] if args.fp16 else []
            command += ["--tensorrt"] if args.tensorrt else []
            command += ["--paddle-default-threads"] if args.paddle_default_threads else []
            status, seconds, rss, log = run_child(command, env)
            lines = [line for line in log.splitlines() if line.startswith("{")]
            if status != 0 or not lines:
                results["backends"][backend] = {"error": (log.strip().splitlines() or ["no output"])[-1]}
                print(log[-3000:], file=sys.stderr)
                continue
            entry = json.loads(lines[-1])
            entry["peak_rss_gb"] = round(rss, 2)
            results["backends"][backend] = entry
            outputs[backend] = np.load(output)

    reference = "torch" if "torch" in outputs else "dynamic"
    base = results["backends"].get(reference, {}).get("step_s")
    for backend, entry in results["backends"].items():
        if "error" in entry:
            continue
        entry["ratio"] = round(entry["step_s"] / base, 3) if base else None
        for other in ("torch", "dynamic"):
            if other in outputs and backend in outputs:
                diff = np.abs(outputs[backend].astype(np.float64) - outputs[other].astype(np.float64))
                entry[f"max_abs_vs_{other}"] = float(diff.max())
    print_table(results, reference)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def print_table(results: dict, reference: str) -> None:
    print(f"UNet step: batch {results['batch']}, {results['latent']}x{results['latent']} latents, "
          f"{'fp16' if results['fp16'] else 'fp32'}, {results['device']}, {results['threads']} threads")
    if "export" in results:
        export = results["export"]
        print(f"export (static{' + ONNX' if export['onnx'] else ''}, validated): {export['seconds']:.1f} s, "
              f"peak RSS {export['peak_rss_gb']:.2f} GB")
    print(f"{'backend':18} {'load s':>7} {'first s':>8} {'step s':>8} {'x ' + NAMES[reference]:>18} {'peak RSS GB':>12} "
          f"{'vs torch':>9} {'vs dynamic':>10}")
    for backend, entry in results["backends"].items():
        if "error" in entry:
            print(f"{NAMES[backend]:18} failed: {entry['error']}")
            continue
        ratio = f"{entry['ratio']:.2f}" if entry.get("ratio") is not None else "-"
        vs_torch = f"{entry['max_abs_vs_torch']:.1e}" if "max_abs_vs_torch" in entry else "-"
        vs_dynamic = f"{entry['max_abs_vs_dynamic']:.1e}" if "max_abs_vs_dynamic" in entry else "-"
        print(f"{NAMES[backend]:18} {entry['load_s']:7.1f} {entry['first_s']:8.2f} {entry['step_s']:8.2f} {ratio:>18} "
              f"{entry['peak_rss_gb']:12.2f} {vs_torch:>9} {vs_dynamic:>10}")


# --- child: one backend ---------------------------------------------------------------------------


def worker(args) -> int:
    data = dict(np.load(args.inputs))
    threads = args.threads or _cores()
    started = time.perf_counter()
    step, info = LOADERS[args.worker](args, data, threads)
    load_s = time.perf_counter() - started
    times = []
    for _ in range(1 + args.repeats):
        started = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - started)
    np.save(args.output, np.asarray(out, dtype=np.float32))
    print(json.dumps({"load_s": round(load_s, 2), "first_s": round(times[0], 3),
                      "step_s": round(statistics.median(times[1:]) if len(times) > 1 else times[0], 3),
                      "steps_s": [round(t, 3) for t in times], **info}))
    return 0


def _torch(args, data, threads):
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(threads)
    device = "cuda" if args.device == "gpu" else "cpu"
    dtype = torch.float16 if args.fp16 else torch.float32
    model = UNet2DConditionModel.from_pretrained(args.torch / "unet").eval().to(device, dtype)
    sample = torch.from_numpy(data["sample"]).to(device, dtype)
    timestep = torch.from_numpy(data["timestep"]).to(device)
    context = torch.from_numpy(data["encoder_hidden_states"]).to(device, dtype)

    def step():
        with torch.no_grad():
            out = model(sample, timestep, context).sample
        if device == "cuda":
            torch.cuda.synchronize()
        return out.float().cpu().numpy()

    return step, {"torch": torch.__version__, "attention": "sdpa"}


def _dynamic(args, data, threads):
    from riffusion.cpu_tuning import tune_cpu_runtime

    tune_cpu_runtime()  # as the riffusion commands run
    import paddle
    from ppdiffusers import UNet2DConditionModel

    from export.runtime import use_all_cores

    paddle.set_device("gpu" if args.device == "gpu" else "cpu")
    if not args.paddle_default_threads:
        use_all_cores(threads)
    dtype = paddle.float16 if args.fp16 else paddle.float32
    model = UNet2DConditionModel.from_pretrained(str(args.model / "unet"), paddle_dtype=dtype, low_cpu_mem_usage=True)
    model.eval()
    sample = paddle.to_tensor(data["sample"]).astype(dtype)
    timestep = paddle.to_tensor(data["timestep"])
    context = paddle.to_tensor(data["encoder_hidden_states"]).astype(dtype)

    def step():
        with paddle.no_grad():
            out = model(sample, timestep, encoder_hidden_states=context).sample
        return out.astype("float32").numpy()

    return step, {"paddle": paddle.__version__, "threads": "paddle default (1)" if args.paddle_default_threads else threads}


def _runtime(backend):
    def load(args, data, threads):
        from riffusion.cpu_tuning import tune_cpu_runtime

        tune_cpu_runtime()  # as the riffusion commands run
        from export.runtime import load_unet

        options = {"device": args.device, "threads": threads}
        if args.device == "gpu":
            options.update(fp16=args.fp16, tensorrt=args.tensorrt)
        unet = load_unet(args.export, backend, **options)
        inputs = {"sample": data["sample"], "timestep": data["timestep"].astype(np.float32),
                  "encoder_hidden_states": data["encoder_hidden_states"]}

        def step():
            return unet.session.run(inputs)[0]

        return step, {"session": type(unet.session).__name__}

    return load


LOADERS = {"torch": _torch, "dynamic": _dynamic, "static": _runtime("static"), "onnx": _runtime("onnx")}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
