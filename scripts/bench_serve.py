"""Throughput and latency of riffusion-app's API: the stdlib server, the Ray Serve app with one replica
(batches of 1) and with batching, on the same model and load, in one run.

    flock /tmp/heavy.lock python scripts/bench_serve.py [--checkpoint LIB] [--requests 24] [--clients 4]
        [--steps 10] [--seed-width 64] [--max-batch-size 4]

Without --checkpoint it builds the tiny random-weight model. Requests differ in prompts, seeds and
alpha and share step count and seed image, so the Ray app may batch them. Seed images are cut to
--seed-width columns (512 = the app's full 5.12 s clip). Prints requests/s, p50 and p95 latency, and
each server's throughput relative to the stdlib server's.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_check import narrow_seeds, tiny_library  # noqa: E402

from riffusion.ports import free_port  # noqa: E402


def body(index: int, steps: int) -> dict:
    return {"alpha": (index % 7) / 6, "num_inference_steps": steps, "seed_image_id": "og_beat",
            "start": {"prompt": f"user {index}", "seed": index, "denoising": 0.75, "guidance": 7},
            "end": {"prompt": f"user {index} later", "seed": 500 + index, "denoising": 0.75, "guidance": 7}}


def load(url: str, total: int, clients: int, steps: int) -> dict:
    """`total` requests from `clients` concurrent clients; every answer must be a 200."""
    def one(index: int) -> float:
        started = time.monotonic()
        response = requests.post(f"{url}/run_inference/", json=body(index, steps), timeout=600)
        if response.status_code != 200:
            raise RuntimeError(f"request {index}: {response.status_code} {response.text[:200]}")
        return time.monotonic() - started

    one(10_000)  # warm-up, not counted
    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(one, range(total)))
    wall = time.monotonic() - started
    return {"throughput": total / wall, "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))], "wall": wall}


def wait_until_up(url: str, process: subprocess.Popen | None = None, limit_s: float = 300) -> None:
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {limit_s:.0f} s")


def bench_stdlib(library: Path, seed_folder: Path, args) -> dict:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "riffusion.server", "--checkpoint", str(library),
                                "--seed-images", str(seed_folder), "--port", str(port),
                                "--max-pending", str(args.requests + 1)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, process)
        return load(url, args.requests, args.clients, args.steps)
    finally:
        process.terminate()
        process.wait(30)


def bench_ray(library: Path, seed_folder: Path, args, max_batch_size: int) -> dict:
    from ray import serve

    from riffusion.model_options import ModelOptions
    from riffusion.serve import build

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # 2 CPUs for the one replica: Paddle uses both cores, as in the stdlib server
        serve.run(build(ModelOptions(library), seed_images=str(seed_folder), replicas=1, max_batch_size=max_batch_size,
                        batch_wait_s=0.05, max_queued=args.requests, num_cpus=2), name="riffusion", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url)
        return load(url, args.requests, args.clients, args.steps)
    finally:
        serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a converted library (default: build the tiny random model)")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed-width", type=int, default=64, choices=(64, 128, 256, 512))
    parser.add_argument("--max-batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    import ray

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as temp:
        root = Path(temp)
        library = Path(args.checkpoint) if args.checkpoint else tiny_library(root)
        seed_folder = narrow_seeds(root, args.seed_width)
        print(f"model {library.name}, {args.requests} requests from {args.clients} clients, {args.steps} steps, "
              f"seed images {args.seed_width}x512", flush=True)
        results = {"stdlib server": bench_stdlib(library, seed_folder, args)}
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)  # 2 for the replica, some for the ingress
        try:
            results["ray, 1 replica, no batching"] = bench_ray(library, seed_folder, args, 1)
            results[f"ray, 1 replica, batches of {args.max_batch_size}"] = bench_ray(library, seed_folder, args,
                                                                                  args.max_batch_size)
        finally:
            ray.shutdown()
    base = results["stdlib server"]["throughput"]
    print(f"{'server':34} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'vs stdlib':>9}")
    for name, result in results.items():
        print(f"{name:34} {result['throughput']:7.2f} {result['p50']:7.2f} {result['p95']:7.2f} "
              f"{result['throughput'] / base:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
