"""What every command shows besides its own output: --version, one line naming the extra when torch is
not installed, progress for long checks, and none of the third-party libraries' noise."""

import importlib.metadata
import signal
import subprocess
import sys

import pytest

COMMANDS = ("convert", "convert.parity", "convert.verify", "convert.publish", "convert.single_file", "convert.builtin",
            "convert.demo", "export", "riffusion", "riffusion.server", "riffusion.dataset",
            "riffusion.train", "convert.lora")
# what Paddle, paddlenlp, datasets, setuptools and tokenizers print on their own
NOISE = ("No ccache found", "Setuptools is replacing distutils", "[    INFO]", "PyTorch version",
         "Ignored unknown kwarg option", "not support input out tensor", "Loading configuration file")
# run the command as if torch, diffusers and transformers were not installed (a [cpu]-only install)
WITHOUT_TORCH = """
import importlib.machinery, runpy, sys
class WithoutTorch(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "diffusers", "transformers"):
            return None
        return super().find_spec(name, path, target)
sys.meta_path = [WithoutTorch if finder is importlib.machinery.PathFinder else finder for finder in sys.meta_path]
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run(*args, cwd=None):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_tells_its_version_and_nothing_else(command):
    result = run("-m", command, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"python -m {command}: riffusion-paddle {importlib.metadata.version('riffusion-paddle')}\n"
    assert result.stderr == ""


@pytest.mark.parametrize("command, args", [
    ("convert", ["--src", "SRC", "--out", "out"]),
    ("convert", ["--src", "SRC", "--out", "out", "--release", "--no-check"]),
    ("convert.parity", ["--torch", "SRC", "--paddle", "LIB"]),
])
def test_without_torch_one_line_names_the_extra(command, args, torch_repo, paddle_library, tmp_path):
    args = [torch_repo if arg == "SRC" else paddle_library if arg == "LIB" else arg for arg in args]
    blocked = run("-c", "import sys; exec(sys.argv[1])", "import torch", cwd=tmp_path)  # the blocker itself works
    result = run("-c", WITHOUT_TORCH, command, *args, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: python -m {command.split('.')[0] if command == 'convert' else command} reads torch models and needs "
        f"torch, which the [cpu] and [gpu] installs leave out: pip install 'riffusion-paddle[convert]'"], result.stderr
    assert not (tmp_path / "out").exists() and blocked.returncode == 0
    without = run("-c", WITHOUT_TORCH, "riffusion", "--version", cwd=tmp_path)
    assert without.returncode == 0  # the runtime needs no torch


def test_parity_shows_progress_and_no_third_party_noise(torch_repo, paddle_library):
    result = run("-m", "convert.parity", "--torch", torch_repo, "--paddle", paddle_library, "--steps", 1)
    assert result.returncode == 0, result.stderr[-2000:]
    progress = [line for line in result.stderr.splitlines() if line.startswith("parity [")]
    assert progress[0] == "parity [1/6]: tokenizer" and progress[-1] == "parity [6/6]: pipeline, 1 steps"
    assert result.stdout.splitlines()[0].startswith("check ") and "all checks passed" in result.stdout
    assert [noise for noise in NOISE if noise in result.stdout + result.stderr] == []


def test_text_to_audio_prints_no_third_party_noise(paddle_library, tmp_path):
    result = run("-m", "riffusion", "text-to-audio", "jazz", tmp_path / "jazz.wav", "--checkpoint", paddle_library,
                 "--steps", 1, "--width", 64)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [noise for noise in NOISE if noise in result.stdout + result.stderr] == []


# One vocabulary: --src a torch source, --library a converted library, --export an export folder,
# --components what to export, --onnx/--no-onnx both ways; the old spellings stay as aliases.
SPELLINGS = {
    "convert": ["--src SRC", "--components EXPORT_COMPONENTS, --export-components", "--onnx, --no-onnx"],
    "export": ["--library MODEL, --model MODEL", "--components COMPONENTS, --export-components", "--onnx, --no-onnx"],
    "convert.parity": ["--src TORCH, --torch TORCH", "--library PADDLE, --paddle PADDLE", "--export EXPORTED, --exported"],
    "convert.verify": ["--src TORCH, --torch TORCH", "[FOLDER]", "--folder FOLDER the same as FOLDER"],
    "convert.publish": ["[FOLDER]", "--folder FOLDER the same as FOLDER"],
    "riffusion.server": ["--library CHECKPOINT, --checkpoint CHECKPOINT", "--export EXPORT, --exported EXPORT"],
}


@pytest.mark.parametrize("command", sorted(SPELLINGS))
def test_one_vocabulary_with_the_old_spellings_kept(command):
    result = run("-m", command, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for spelling in SPELLINGS[command]:
        assert spelling in text, spelling


def test_old_and_new_spellings_parse_alike():
    from convert.cli import parser as convert_parser
    from export.cli import parser as export_parser
    from riffusion.cli import parser as riffusion_parser

    assert vars(convert_parser().parse_args(["--src", "a", "--out", "b", "--export-components", "unet", "--no-onnx"])) == \
        vars(convert_parser().parse_args(["--src", "a", "--out", "b", "--components", "unet", "--no-onnx"]))
    assert export_parser().parse_args(["--model", "a", "--out", "b"]).model == \
        export_parser().parse_args(["--library", "a", "--out", "b"]).model
    assert export_parser().parse_args(["--library", "a", "--out", "b", "--onnx"]).onnx is True
    old = riffusion_parser().parse_args(["text-to-audio", "x", "o.wav", "--checkpoint", "L", "--export", "E"])
    new = riffusion_parser().parse_args(["text-to-audio", "x", "o.wav", "--library", "L", "--exported", "E"])
    assert (old.checkpoint, old.export) == (new.checkpoint, new.export)


def test_every_command_ends_bad_input_and_ctrl_c_alike(capsys):
    """riffusion.console.command: InputError (ConversionError, ExportError are kinds of it) -> one `error:` line
    and status 1; Ctrl-C -> one `interrupted` line and 130, SIGTERM turned into an interrupt -> 143; no traceback."""
    from convert.errors import ConversionError
    from export.errors import ExportError
    from riffusion.console import command
    from riffusion.errors import InputError, Terminated

    def ending_with(exception):
        @command
        def main(argv=None):
            raise exception
        return main

    for exception, status, line in ((InputError("a.json: missing"), 1, "error: a.json: missing"),
                                    (ConversionError("unet: bad"), 1, "error: unet: bad"),
                                    (ExportError("onnx: bad"), 1, "error: onnx: bad"),
                                    (KeyboardInterrupt(), 130, "interrupted"),
                                    (Terminated(15), 143, "interrupted")):
        assert ending_with(exception)([]) == status
        captured = capsys.readouterr()
        assert (captured.out, captured.err) == ("", line + "\n")
    assert command(lambda argv: 0)([]) == 0


def _staging(folder):
    return [path for path in folder.iterdir() if path.name.startswith(".out.")]


# `python -m convert` held at its last step, every file written into its staging folder and the rename to --out
# not yet done, so that the signal lands mid-conversion however fast or slow the machine is.
HELD_CONVERT = """
import runpy, sys, time
from pathlib import Path
from riffusion import files
held_marker, check = Path(sys.argv.pop(1)), files.check_destination
def check_then_hold(out, overwrite):
    if any(any(staging.iterdir()) for staging in Path(out).parent.glob(".out.*") if staging.is_dir()):
        held_marker.touch()
        time.sleep(300)
    return check(out, overwrite)
files.check_destination = check_then_hold
runpy.run_module("convert", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_mid_conversion_removes_staging_and_says_interrupted(signum, status, torch_repo, tmp_path):
    """SIGINT (Ctrl-C) sent to a real `python -m convert` of the tiny model while its staging folder holds every
    file: exit 130 (before the shared entry point: killed by the signal, with a traceback), stderr ends with one
    `interrupted` line and shows no traceback, and neither the staging folder nor --out is left. SIGTERM ends it
    the same way with 143. (`python -m export` and the others stage through the same atomic_folder.)"""
    import time

    held = tmp_path / "held"
    child = subprocess.Popen([sys.executable, "-c", HELD_CONVERT, str(held), "--src", str(torch_repo),
                              "--out", str(tmp_path / "out"), "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not held.exists():
            assert child.poll() is None and time.monotonic() < deadline, "never finished writing into staging"
            time.sleep(0.05)
        assert _staging(tmp_path) and not (tmp_path / "out").exists()
        child.send_signal(signum)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == status, err[-2000:]
    assert err.splitlines()[-1] == "interrupted" and "Traceback" not in err, err[-2000:]
    assert _staging(tmp_path) == [] and not (tmp_path / "out").exists()
