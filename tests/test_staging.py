"""Atomic output under hostile conditions: SIGTERM, staging left by killed runs, two runs writing the same
--out at once, a full disk or a read-only destination. Each ends in one line and nothing half-written."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from riffusion.errors import InputError
from riffusion.files import atomic_folder


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def leftovers(folder, name="out"):
    return sorted(path.name for path in folder.iterdir() if path.name.startswith(f".{name}."))


def test_sigterm_removes_the_staging_folder(tmp_path):
    """SIGTERM is handled like Ctrl-C: the staging folder is removed and the process exits non-zero."""
    script = textwrap.dedent(f"""
        import time
        from riffusion.files import atomic_folder
        with atomic_folder({str(tmp_path / 'out')!r}, overwrite=False) as staging:
            (staging / "half.bin").write_bytes(b"0" * 1000)
            print("ready", flush=True)
            time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    assert leftovers(tmp_path) == [f".out.partial-{child.pid}"]
    child.terminate()
    assert child.wait(timeout=30) != 0
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_staging_of_a_dead_process_is_removed_and_reported(tmp_path, capsys):
    pid = dead_pid()
    for name in (f".out.partial-{pid}", f".out.work-{pid}-x1y2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "junk.bin").write_bytes(b"0")
    (tmp_path / ".out.note").write_text("not staging: kept")
    with atomic_folder(tmp_path / "out", overwrite=False) as staging:
        (staging / "done.txt").write_text("ok")
    assert leftovers(tmp_path) == [".out.note"]
    assert (tmp_path / "out" / "done.txt").read_text() == "ok"
    err = capsys.readouterr().err
    assert f"removed {tmp_path / f'.out.partial-{pid}'}: left by process {pid}, which is no longer running" in err


def test_a_second_writer_of_the_same_output_is_refused(tmp_path):
    """While a live process stages --out, another run refuses instead of racing it."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".out.partial-{other.pid}").mkdir()
        with pytest.raises(InputError, match=f"another process \\(pid {other.pid}\\) is writing it"):
            with atomic_folder(tmp_path / "out", overwrite=False):
                pass
        assert (tmp_path / f".out.partial-{other.pid}").is_dir()  # not ours to remove
    finally:
        other.kill()
        other.wait()


def test_an_output_written_meanwhile_is_not_replaced(tmp_path):
    """The destination is checked again before the final rename (the other run finished first)."""
    out = tmp_path / "out"
    with pytest.raises(InputError, match="not empty"):
        with atomic_folder(out, overwrite=False) as staging:
            (staging / "ours.txt").write_text("ours")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "No space left on device"),
                                          (errno.EROFS, "Read-only file system")])
def test_disk_full_or_read_only_destination_is_one_line(torch_repo, tmp_path, capsys, monkeypatch, code, reason):
    """Simulated in-process: the weights writer (disk full mid-write) or the staging mkdir (read-only) fails."""
    from convert import writer
    from convert.cli import main

    def fail(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    if code == errno.ENOSPC:
        monkeypatch.setattr(writer.StreamingSafetensorsWriter, "write", lambda self, name, array: fail(self.path))
    else:
        real_mkdir = os.mkdir
        monkeypatch.setattr(os, "mkdir", lambda path, *a, **k: fail(path) if ".out.partial-" in str(path)
                            else real_mkdir(path, *a, **k))
    assert main(["--src", str(torch_repo), "--out", str(tmp_path / "out"), "--no-check", "--quiet"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and reason in error, error
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()
