"""riffusion's commands (python -m riffusion, riffusion.server, riffusion.serve and each of its model replicas)
apply riffusion.cpu_tuning before Paddle loads (README "Precision and speed" has what it gains), keep every
variable the user set, and leave everything alone under RIFFUSION_CPU_TUNING=0."""

import json
import os
import subprocess
import sys

import pytest

from riffusion.cpu_tuning import SWITCH, cpu_flags, cpu_vendor

# Each entry point runs on a checkpoint that does not exist, so it stops with its one error line right after
# its start-up; the child then reports its environment and, for each call of tune_cpu_runtime, whether Paddle
# was loaded by then.
ENTRY = """
import json, os, sys
from riffusion import cpu_tuning
entry, missing = sys.argv[1], sys.argv[2]
calls, real = [], cpu_tuning.tune_cpu_runtime
def tune():
    calls.append("paddle" in sys.modules)
    real()
cpu_tuning.tune_cpu_runtime = tune  # before the entry point imports it
if entry == "replica":
    from riffusion.model_options import ModelOptions
    from riffusion.serve import RiffusionModel
    try:
        RiffusionModel.func_or_class(ModelOptions(checkpoint=missing))
    except Exception as error:
        print(type(error).__name__, error, file=sys.stderr)
else:
    import importlib
    main = importlib.import_module(entry).main
    argv = {"riffusion.cli": ["text-to-audio", "jazz", missing + ".wav", "--checkpoint", missing]}.get(
        entry, ["--checkpoint", missing, "--port", "0"])
    assert main(argv) == 1
print(json.dumps({"env": {name: os.environ.get(name) for name in ("MKL_CBWR", "MKL_DEBUG_CPU_TYPE",
                                                                 "MKL_ENABLE_INSTRUCTIONS", "USE_TORCH")},
                  "paddle_loaded_at_calls": calls}))
"""
ENTRIES = ("riffusion.cli", "riffusion.server", "riffusion.serve", "replica")


def untuned_environment(**user_env) -> dict[str, str]:
    """This process's environment without any tuning variable (the test process sets MKL's), plus `user_env`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MKL_", "USE_TORCH", SWITCH))}
    return {**env, **user_env}


def run_entry(entry: str, tmp_path, **user_env) -> dict:
    done = subprocess.run([sys.executable, "-c", ENTRY, entry, str(tmp_path / "missing")], capture_output=True,
                          text=True, env=untuned_environment(**user_env), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "missing" in done.stderr  # it did stop on the missing checkpoint
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("entry", ENTRIES)
def test_entry_points_tune_the_cpu_runtime_and_keep_the_users_settings(entry, tmp_path):
    """MKL's reproducible mode, its CPU type (AMD CPUs only) and USE_TORCH=0 are set where the user set nothing;
    the user's own MKL_ENABLE_INSTRUCTIONS stays as the user wrote it."""
    amd = cpu_vendor() == "AuthenticAMD"
    result = run_entry(entry, tmp_path, MKL_ENABLE_INSTRUCTIONS="AVX2")
    assert result["env"] == {"MKL_CBWR": "AUTO,STRICT", "MKL_DEBUG_CPU_TYPE": "5" if amd else None,
                             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "USE_TORCH": "0"}
    assert result["paddle_loaded_at_calls"] == [False]  # called once, before anything loaded Paddle


def test_the_user_can_turn_the_tuning_off(tmp_path):
    """RIFFUSION_CPU_TUNING=0 sets nothing, and a user's MKL_DEBUG_CPU_TYPE is never replaced."""
    assert run_entry("riffusion.cli", tmp_path, **{SWITCH: "0"})["env"] == {
        "MKL_CBWR": None, "MKL_DEBUG_CPU_TYPE": None, "MKL_ENABLE_INSTRUCTIONS": None, "USE_TORCH": None}
    kept = run_entry("riffusion.cli", tmp_path, MKL_DEBUG_CPU_TYPE="4")["env"]
    wanted = "AVX512" if cpu_vendor() == "AuthenticAMD" and "avx512f" in cpu_flags() else None
    assert kept == {"MKL_CBWR": "AUTO,STRICT", "MKL_DEBUG_CPU_TYPE": "4", "MKL_ENABLE_INSTRUCTIONS": wanted,
                    "USE_TORCH": "0"}


REPEAT = """
import hashlib, json, sys
from pathlib import Path
from riffusion.cpu_tuning import tune_cpu_runtime
tune_cpu_runtime()
from riffusion import app_api
from riffusion.model_options import ModelOptions
library, seeds, body = sys.argv[1], Path(sys.argv[2]), sys.argv[3].encode()
pipeline = ModelOptions(library).load(quiet=True)
digests = []
for _ in range(3):
    request = app_api.parse_request(body, seeds, app_api.DEFAULT_MAX_STEPS)
    reply = app_api.inference_reply(*app_api.infer(pipeline, request, seeds), request)
    digests.append(hashlib.sha256(reply.body).hexdigest())
print(json.dumps(digests))
"""


def test_the_same_request_gives_the_same_bytes_every_time(paddle_library, narrow_seed_folder):
    """In a process tuned as every command is, riffusion-app's request answered three times after loading gives
    the same bytes each time. (Before MKL_CBWR=AUTO,STRICT, MKL's AVX-512 path on AMD rounded by buffer
    alignment and the first answer differed from the later ones.)"""
    body = json.dumps({"alpha": 0.25, "num_inference_steps": 2, "seed_image_id": "og_beat", "mask_image_id": None,
                       "start": {"prompt": "church bells", "seed": 42, "denoising": 0.75, "guidance": 7},
                       "end": {"prompt": "jazz", "seed": 123, "denoising": 0.75, "guidance": 7}})
    done = subprocess.run([sys.executable, "-c", REPEAT, str(paddle_library), str(narrow_seed_folder), body],
                          capture_output=True, text=True, env=untuned_environment(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    digests = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(set(digests)) == 1, digests
