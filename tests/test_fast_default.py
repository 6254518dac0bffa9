"""A plain library given to the riffusion CLI runs in Paddle Inference, not Paddle's 20x slower dynamic mode:
its static programs are exported once into the cache, said so, reused on the next run; the command says
which engine runs each part, and --runtime onnx without ONNX programs is refused before any work."""

import os
import subprocess
import sys


def run(*args, cache=None):
    env = {**os.environ, "RIFFUSION_PADDLE_CACHE": str(cache)} if cache else None
    return subprocess.run([sys.executable, "-m", "riffusion", *map(str, args)], capture_output=True, text=True,
                          env=env)


def test_a_library_runs_its_static_programs_exported_once(paddle_library, tmp_path):
    """An empty cache of its own: other tests' commands fill the session's cache with this library's programs."""
    args = ("text-to-audio", "jazz", tmp_path / "jazz.wav", "--library", paddle_library, "--steps", 1, "--width", 64)
    cache = tmp_path / "cache"
    first = run(*args, cache=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "no exported programs; exporting its UNet's static program once" in first.stderr
    static = "running: unet Paddle Inference, text_encoder Paddle dynamic, vae Paddle dynamic"
    assert static in first.stderr.splitlines()
    again = run(*args, cache=cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "exporting" not in again.stderr and static in again.stderr.splitlines()
    dynamic = run(*args, "--runtime", "dynamic", cache=cache)
    assert "running: unet Paddle dynamic, text_encoder Paddle dynamic, vae Paddle dynamic" in dynamic.stderr.splitlines()


def test_runtime_onnx_without_onnx_programs_is_refused(paddle_library, tmp_path):
    result = run("text-to-audio", "jazz", tmp_path / "jazz.wav", "--checkpoint", paddle_library, "--runtime", "onnx")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --runtime onnx: no ONNX programs given; export them with python -m export --onnx and pass "
        "--export FOLDER (or choose --runtime static)"]
    assert not (tmp_path / "jazz.wav").exists()


def test_help_says_what_runs():
    result = run("text-to-audio", "--help")
    assert "exported once on first use" in result.stdout and "about 20x slower" in result.stdout
    assert "(default: 50)" in result.stdout  # --steps: defaults shown


def test_processes_starting_together_export_once(paddle_library, tmp_path, monkeypatch, capsys):
    """Model replicas starting together on one machine (riffusion.serve) share the cache: one exports, the others
    wait for it and reuse its programs (without the lock each exported, and all but one failed on the folder
    another process was writing)."""
    import threading
    import time

    from export import cache, exporter

    calls = []

    def slow_export(library, out, **options):
        calls.append(out)
        time.sleep(1.0)
        out.mkdir(parents=True)
        (out / exporter.REPORT_NAME).write_text("{}")

    monkeypatch.setenv("RIFFUSION_PADDLE_CACHE", str(tmp_path))
    monkeypatch.setattr(exporter, "export_library", slow_export)
    folders = []
    threads = [threading.Thread(target=lambda: folders.append(cache.cached_export(paddle_library))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and folders == calls * 3
    assert "another process is exporting its UNet" in capsys.readouterr().err
