"""Benchmark: how long `python -m convert` takes and how much memory it needs, beside two references.

Measured on one torch diffusers checkpoint, in this order, each in its own child process:

  (a) cp -r SRC COPY                 the I/O floor: reading and writing the bytes, nothing else
  (b) python -m convert SRC -> OUT   this project's streaming converter (--no-check --quiet)
  (c) ppdiffusers' own route         from_pretrained(COPY, from_diffusers=True) + save_pretrained;
                                     the whole StableDiffusionPipeline, or, when that fails, the
                                     UNet alone (the output says which was measured)
  (d) python -m convert.single_file  the compiled single-file checkpoint (.safetensors) from SRC

The targets are checked on (b) and (d): wall time at most 2x that of (a), peak RSS at most 1.5 GB.
(c) runs on COPY because that route writes files into its source folder.

Wall time is time.perf_counter() around the child. Peak RSS is the child's own ru_maxrss, read
with os.wait4() on its pid (not RUSAGE_CHILDREN, which is the maximum over every child so far).
An exec'd child starts from this process's high-water mark, so this process stays small: it never
imports torch or Paddle, and building the source is a child process too. GB here is 10^9 bytes.

Nothing is dropped from the page cache: the source is warm for all steps (just built, or
read by (a) at the latest). Dirty pages are flushed (sync) before each step, untimed, so that no
step pays for the previous step's writes.

    python scripts/bench_convert.py --src DIR [--json FILE]
    python scripts/bench_convert.py --size full --work /tmp/bench --keep --json FILE
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_TIME_RATIO = 2.0  # convert wall time / cp -r wall time
MAX_RSS_GB = 1.5

PIPELINE_ROUTE = """
import sys
from ppdiffusers import StableDiffusionPipeline
StableDiffusionPipeline.from_pretrained(sys.argv[1], from_diffusers=True).save_pretrained(sys.argv[2])
"""
UNET_ROUTE = """
import sys
from ppdiffusers import UNet2DConditionModel
UNet2DConditionModel.from_pretrained(sys.argv[1], subfolder="unet", from_diffusers=True).save_pretrained(sys.argv[2])
"""


@dataclass
class Step:
    name: str
    command: list[str]
    seconds: float
    peak_rss_gb: float
    exit_code: int
    error: str  # the last line of the child's output when it failed, else ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def measure(name: str, command: list[str]) -> Step:
    """Run `command` as a child process; its wall time, its own peak RSS and, on failure, its error line."""
    os.sync()
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here; stops Popen waiting again
        log.seek(0)
        output = log.read().decode("utf-8", "replace")
    error = ""
    if child.returncode != 0:
        lines = [line for line in output.splitlines() if line.strip()]
        error = lines[-1].strip() if lines else ""
        if child.returncode < 0:
            error = f"killed by signal {-child.returncode}" + (f" (last output: {error})" if error else "")
    return Step(name, command, seconds, usage.ru_maxrss * 1024 / 1e9, child.returncode, error)


def build_source(work: Path, size: str) -> Path:
    source = work / f"{size}-torch"
    print(f"building a {size}-size random-weight riffusion-model-v1 lookalike in {source} ...", flush=True)
    step = measure("build", [sys.executable, "-m", "convert.builtin", "--out", str(source), "--size", size])
    if not step.ok:
        shutil.rmtree(source, ignore_errors=True)
        raise SystemExit(f"building the source failed: {step.error}")
    print(f"built in {step.seconds:.1f} s", flush=True)
    return source


def ppdiffusers_route(copy: Path, out: Path) -> tuple[Step, Step | None]:
    """(c): the whole pipeline; on failure the UNet alone. Returns (measured step, failed pipeline step or None)."""
    pipeline = measure("(c) ppdiffusers pipeline", [sys.executable, "-c", PIPELINE_ROUTE, str(copy), str(out)])
    if pipeline.ok:
        return pipeline, None
    shutil.rmtree(out, ignore_errors=True)
    unet = measure("(c) ppdiffusers UNet only", [sys.executable, "-c", UNET_ROUTE, str(copy), str(out)])
    return unet, pipeline


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def print_table(steps: list[Step], floor: Step) -> None:
    print(f"\n{'step':<28} {'wall s':>9} {'peak RSS GB':>12} {'x cp -r':>8}")
    for step in steps:
        ratio = step.seconds / floor.seconds
        status = "" if step.ok else f"  FAILED (exit {step.exit_code})"
        print(f"{step.name:<28} {step.seconds:>9.1f} {step.peak_rss_gb:>12.2f} {ratio:>8.2f}{status}")


def check_targets(step: Step, floor: Step) -> list[dict]:
    ratio = step.seconds / floor.seconds
    return [
        {"target": f"{step.name} wall time <= {MAX_TIME_RATIO:g}x cp -r", "value": round(ratio, 3),
         "passed": step.ok and ratio <= MAX_TIME_RATIO},
        {"target": f"{step.name} peak RSS <= {MAX_RSS_GB:g} GB", "value": round(step.peak_rss_gb, 3),
         "passed": step.ok and step.peak_rss_gb <= MAX_RSS_GB},
    ]


def run(source: Path, work: Path, skip_ppdiffusers: bool) -> dict:
    copy, out, out_ppdiffusers = work / "copy", work / "out-convert", work / "out-ppdiffusers"
    single = work / "out-single" / "model.safetensors"
    for path in (copy, out, out_ppdiffusers, single.parent):
        if path.exists():
            raise SystemExit(f"error: {path} already exists")
    print(f"source {source}: {folder_bytes(source) / 1e9:.2f} GB", flush=True)
    floor = measure("(a) cp -r", ["cp", "-r", str(source), str(copy)])
    if not floor.ok:
        raise SystemExit(f"cp -r failed: {floor.error}")
    convert = measure("(b) python -m convert", [sys.executable, "-m", "convert", "--src", str(source), "--out", str(out),
                                                "--no-check", "--quiet"])
    single_file = measure("(d) convert.single_file", [sys.executable, "-m", "convert.single_file", "--src", str(source),
                                                     "--out", str(single), "--quiet"])
    steps = [floor, convert, single_file]
    failed_pipeline = None
    if not skip_ppdiffusers:
        measured, failed_pipeline = ppdiffusers_route(copy, out_ppdiffusers)
        steps.append(measured)

    print_table(steps, floor)
    print("source warm in page cache for all steps (nothing dropped; dirty pages synced before each, untimed)")
    if skip_ppdiffusers:
        print("(c) skipped (--skip-ppdiffusers)")
    elif failed_pipeline is not None:
        print(f"(c) measured the UNet alone: the whole-pipeline route failed after {failed_pipeline.seconds:.1f} s "
              f"(exit {failed_pipeline.exit_code}): {failed_pipeline.error}")
    else:
        print("(c) measured the whole StableDiffusionPipeline")
    for step in steps:
        if not step.ok:
            print(f"{step.name} failed: {step.error}")
    targets = check_targets(convert, floor) + check_targets(single_file, floor)
    for target in targets:
        print(f"{'PASS' if target['passed'] else 'MISS'}  {target['target']} (got {target['value']:g})")

    return {
        "source": str(source),
        "source_bytes": folder_bytes(source),
        "page_cache": "warm (nothing dropped; sync before each step)",
        "cpus": os.cpu_count(),
        "steps": [dict(asdict(step), ratio_to_cp=round(step.seconds / floor.seconds, 3)) for step in steps],
        "ppdiffusers_route": ("skipped" if skip_ppdiffusers else "unet" if failed_pipeline else "pipeline"),
        "ppdiffusers_pipeline_failure": asdict(failed_pipeline) if failed_pipeline else None,
        "targets": targets,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, help="torch diffusers folder to convert (default: build one with convert.builtin)")
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="size of the built source, without --src")
    p.add_argument("--work", type=Path, help="folder for the built source and the outputs (default: a new temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the built source (WORK/SIZE-torch)")
    p.add_argument("--skip-ppdiffusers", action="store_true", help="skip step (c)")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.src is not None and not (args.src / "model_index.json").is_file():
        print(f"error: {args.src}: no model_index.json, not a diffusers folder", file=sys.stderr)
        return 2
    made_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="bench-convert-")) if made_work else args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    built = None
    try:
        if args.src is None:
            built = build_source(work, args.size)
        result = run(args.src.absolute() if args.src else built, work, args.skip_ppdiffusers)
    finally:
        for name in ("copy", "out-convert", "out-ppdiffusers", "out-single"):
            shutil.rmtree(work / name, ignore_errors=True)
        if built is not None and not args.keep:
            shutil.rmtree(built, ignore_errors=True)
        if made_work and not any(work.iterdir()):
            work.rmdir()
    if built is not None and args.keep:
        print(f"kept the built source: {built}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0 if all(target["passed"] for target in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
