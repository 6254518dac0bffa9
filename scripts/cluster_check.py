"""A two-node Ray cluster on this machine, riffusion.serve deployed with `serve deploy` of the packaged
serve_config.yaml, a bounded load test with one model replica killed mid-load.

    flock /tmp/heavy.lock python scripts/cluster_check.py [--requests 40] [--clients 8]

Head and worker are two `ray start` nodes (own temp dirs, own `node_a` / `node_b` resources, 2 CPUs
each); `max_replicas_per_node: 1` puts one model replica on each. Every answer is checked (status,
JSON, a JPEG of the seed's size, MP3 audio of the right length, the step count); a 503 must be JSON with Retry-After, and its client retries
once after it. Passes when no request hangs or is lost, every answer is correct or a clear 503, and the
killed replica comes back (a new actor, answering). Every process it started is stopped, and its temp
dirs removed, whatever happens. Exit status 0 on pass.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path

import requests
import yaml

from riffusion.ports import free_port

BIN = Path(sys.executable).parent
MODEL_ACTOR_CLASS = "ServeReplica:riffusion:RiffusionModel"
SEED_WIDTH = 64  # seed images cut to 64 columns (0.64 s): the tiny model answers in about a second


class Cluster:
    """The `ray start` nodes this script started: each in its own session (process group)."""

    def __init__(self, root: Path):
        self.root, self.nodes, self.gcs_port, self.dashboard_port = root, [], free_port(), free_port()

    def start_node(self, name: str, head: bool) -> None:
        temp = self.root / name
        command = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                   f"--resources={json.dumps({name: 1})}", f"--temp-dir={temp}", "--disable-usage-stats"]
        if head:
            command += [f"--port={self.gcs_port}", "--head", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            command += [f"--address=127.0.0.1:{self.gcs_port}"]
        log = open(self.root / f"{name}.log", "w")
        self.nodes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def stop(self) -> None:
        """SIGTERM to each node's process group, SIGKILL what is left, then any process still naming our
        temp root (Ray's workers) by its pid."""
        for node in reversed(self.nodes):
            _signal_group(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for node in self.nodes:
            try:
                node.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(node.pid, signal.SIGKILL)
        for pid in _pids_naming(str(self.root)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pids_naming(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def tiny_library(root: Path) -> Path:
    from convert.builtin import build
    from convert.library import convert_library

    library = root / "riffusion-tiny-paddle"
    convert_library(str(build(root / "riffusion-tiny", size="tiny")), library, quiet=True)
    return library


def narrow_seeds(root: Path, width: int = SEED_WIDTH) -> Path:
    """The seed image library cut to its first `width` columns, in root/seed_images."""
    from riffusion import seed_images

    folder = root / "seed_images"
    folder.mkdir()
    for name in seed_images.seed_ids() + seed_images.mask_ids():
        seed_images.load(name).crop((0, 0, width, 512)).save(folder / f"{name}.png")
    return folder


def write_config(root: Path, library: Path, seeds: Path, port: int) -> Path:
    """The packaged serve_config.yaml with this cluster's paths and port, 2 replicas of 1 CPU, one per node."""
    config = yaml.safe_load(files("riffusion").joinpath("serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    application = config["applications"][0]
    application["args"].update(checkpoint=str(library), seed_images=str(seeds), max_steps=4, request_timeout_s=120)
    for deployment in application["deployments"]:
        if deployment["name"] == "RiffusionModel":
            deployment.update(num_replicas=2, max_replicas_per_node=1, max_ongoing_requests=8,
                              max_queued_requests=8, ray_actor_options={"num_cpus": 1, "num_gpus": 0})
    path = root / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def request_body(index: int) -> dict:
    return {"alpha": (index % 5) / 4, "num_inference_steps": 2 + index % 3, "seed_image_id": "og_beat",
            "mask_image_id": "mask_top_third_75" if index % 4 == 3 else None,
            "start": {"prompt": f"user {index} start", "seed": index, "denoising": 0.75, "guidance": 7},
            "end": {"prompt": f"user {index} end", "seed": 1000 + index, "denoising": 0.75, "guidance": 7}}


def check_answer(response: requests.Response, body: dict) -> str | None:
    """None when the reply is a correct answer, else what is wrong with it."""
    import soundfile
    from PIL import Image

    if response.status_code != 200:
        return f"status {response.status_code}: {response.text[:200]}"
    reply = response.json()
    image = Image.open(io.BytesIO(base64.b64decode(reply["image"].removeprefix("data:image/jpeg;base64,"))))
    audio, rate = soundfile.read(io.BytesIO(base64.b64decode(reply["audio"].removeprefix("data:audio/mpeg;base64,"))))
    if image.format != "JPEG" or image.size != (SEED_WIDTH, 512):
        return f"image {image.format} {image.size}"
    if rate != 44100 or abs(reply["duration_s"] - 0.63) > 0.02 or abs(len(audio) / rate - reply["duration_s"]) > 0.06:
        return f"audio {rate} Hz, {len(audio) / rate:.3f} s, duration_s {reply['duration_s']}"
    if reply["num_inference_steps"] != body["num_inference_steps"]:
        return f"num_inference_steps {reply['num_inference_steps']}"
    if response.headers.get("Access-Control-Allow-Origin") != "*":
        return "no CORS header"
    return None


def is_clear_503(response: requests.Response) -> bool:
    try:
        message = response.json()["error"]
    except (ValueError, KeyError):
        return False
    return (response.status_code == 503 and bool(message) and int(response.headers.get("Retry-After", "0")) >= 1
            and response.headers.get("Access-Control-Allow-Origin") == "*")


def model_replicas() -> list:
    from ray.util.state import list_actors

    return [actor for actor in list_actors(filters=[("class_name", "=", MODEL_ACTOR_CLASS), ("state", "=", "ALIVE")])]


def run_load(url: str, requests_total: int, clients: int, kill_after: int, kill) -> list[dict]:
    done, lock, killed = [0], threading.Lock(), threading.Event()

    def one(index: int) -> dict:
        body = request_body(index)
        started = time.monotonic()
        outcome = {"index": index, "attempts": []}
        for _ in range(2):  # a clear 503 is followed once, after its Retry-After
            try:
                response = requests.post(f"{url}/run_inference/", json=body, timeout=150)
            except requests.RequestException as error:
                outcome["attempts"].append(f"no answer: {type(error).__name__}")
                break
            if response.status_code == 503 and is_clear_503(response):
                outcome["attempts"].append("503")
                time.sleep(min(int(response.headers["Retry-After"]), 10))
                continue
            outcome["attempts"].append(check_answer(response, body) or "ok")
            break
        outcome["seconds"] = time.monotonic() - started
        with lock:
            done[0] += 1
            if done[0] == kill_after and not killed.is_set():
                killed.set()
                threading.Thread(target=kill, daemon=True).start()
        return outcome

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(requests_total)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short: Ray's socket paths live under it
    # This cluster's own auth token, for its nodes, this driver and the serve CLI (Ray's default token in
    # ~/.ray may belong to another cluster)
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    cluster = Cluster(root)
    failures: list[str] = []
    try:
        import ray

        library, seeds = tiny_library(root), narrow_seeds(root)
        port = free_port()
        config = write_config(root, library, seeds, port)
        started = time.monotonic()
        cluster.start_node("node_a", head=True)
        time.sleep(8)
        cluster.start_node("node_b", head=False)
        ray.init(address=f"127.0.0.1:{cluster.gcs_port}", log_to_driver=False)
        while len(ray.nodes()) < 2 or not all(node["Alive"] for node in ray.nodes()):
            if time.monotonic() - started > 120:
                raise RuntimeError("the two nodes did not come up in 120 s")
            time.sleep(1)
        print(f"cluster: 2 nodes up in {time.monotonic() - started:.1f} s", flush=True)
        subprocess.run([str(BIN / "serve"), "deploy", str(config), "--address",
                        f"http://127.0.0.1:{cluster.dashboard_port}"], check=True, timeout=120)
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                if requests.get(url, timeout=5).status_code == 200 and len(model_replicas()) == 2:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() - started > 300:
                raise RuntimeError("the application did not come up in 300 s")
            time.sleep(2)
        replicas = model_replicas()
        nodes = {replica.node_id for replica in replicas}
        print(f"serve deploy: app answering, {len(replicas)} model replicas on {len(nodes)} nodes "
              f"({time.monotonic() - started:.1f} s from start)", flush=True)
        if len(nodes) != 2:
            failures.append(f"model replicas on {len(nodes)} node(s), expected 2")
        victim = replicas[0]

        def kill():
            print(f"killing model replica {victim.name} (actor {victim.actor_id[:8]}) mid-load", flush=True)
            ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)

        load_started = time.monotonic()
        outcomes = run_load(url, args.requests, args.clients, kill_after=args.requests // 4, kill=kill)
        wall = time.monotonic() - load_started
        first = [outcome["attempts"][0] for outcome in outcomes]
        final = [outcome["attempts"][-1] for outcome in outcomes]
        latencies = sorted(outcome["seconds"] for outcome in outcomes)
        print(f"load: {len(outcomes)} requests from {args.clients} clients in {wall:.1f} s; first answers: "
              f"{first.count('ok')} correct, {first.count('503')} clear 503; after one retry: "
              f"{final.count('ok')} correct; slowest {latencies[-1]:.1f} s", flush=True)
        wrong = [(outcome["index"], attempt) for outcome in outcomes for attempt in outcome["attempts"]
                 if attempt not in ("ok", "503")]
        if wrong:
            failures.append(f"wrong or missing answers: {wrong[:5]}")
        if len(outcomes) != args.requests:
            failures.append(f"{args.requests - len(outcomes)} requests lost")
        back = time.monotonic()
        while True:
            replicas = model_replicas()
            if len(replicas) == 2 and victim.actor_id not in {replica.actor_id for replica in replicas}:
                break
            if time.monotonic() - back > 180:
                failures.append("the killed replica did not come back in 180 s")
                break
            time.sleep(2)
        else_ok = requests.post(f"{url}/run_inference/", json=request_body(0), timeout=150)
        problem = check_answer(else_ok, request_body(0))
        if problem:
            failures.append(f"after the restart: {problem}")
        print(f"replica back: {len(model_replicas())} model replicas on "
              f"{len({replica.node_id for replica in model_replicas()})} nodes, a new actor, answering "
              f"({time.monotonic() - back:.1f} s after the load ended)", flush=True)
    except Exception as error:
        failures.append(f"{type(error).__name__}: {error}")
    finally:
        try:
            import ray

            ray.shutdown()
        except Exception:
            pass
        cluster.stop()
        time.sleep(1)  # SIGKILLed processes take a moment to leave /proc
        left = _pids_naming(str(root))
        shutil.rmtree(root, ignore_errors=True)
        print(f"cleanup: nodes stopped, {len(left)} processes left, {root} removed", flush=True)
    if failures:
        for failure in failures:
            print(f"FAIL: {failure}", file=sys.stderr)
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
