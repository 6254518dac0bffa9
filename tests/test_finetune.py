"""Datasets from audio (riffusion.dataset) and training on Paddle (riffusion.train), on tiny models."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile
from PIL import Image

from riffusion.params import SpectrogramParams


def _tone(seconds: float, rate: int, channels: int = 1, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    mono = amplitude * np.sin(2 * np.pi * 440 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def _run(*args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory):
    """Captioned audio in every way the dataset reads captions, plus files it must skip."""
    folder = tmp_path_factory.mktemp("audio")
    soundfile.write(folder / "stereo48k.wav", _tone(12.0, 48000, channels=2), 48000)  # 2 clips, 1.76 s tail dropped
    (folder / "stereo48k.txt").write_text("a warbling  tone\n", encoding="utf-8")
    (folder / "sub").mkdir()
    soundfile.write(folder / "sub" / "padded.flac", _tone(8.0, 44100), 44100)  # 1 clip + 2.88 s tail padded
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/padded.flac", "text": "flac tone"}) + "\n")
    soundfile.write(folder / "silent.ogg", np.zeros(44100 * 6), 44100)  # 1 silent clip, tail dropped
    (folder / "silent.txt").write_text("nothing")
    soundfile.write(folder / "uncaptioned.wav", _tone(6.0, 44100), 44100)
    (folder / "empty.mp3").write_bytes(b"")
    (folder / "empty.txt").write_text("x")
    (folder / "garbage.wav").write_bytes(b"RIFF not really a wave file")
    (folder / "garbage.txt").write_text("x")
    soundfile.write(folder / "latin1.wav", _tone(6.0, 44100), 44100)
    (folder / "latin1.txt").write_bytes(b"caf\xe9")
    os.symlink("/etc/hostname", folder / "link.wav")
    return folder


@pytest.fixture(scope="module")
def dataset(audio_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset") / "ds"
    result = _run("-m", "riffusion.dataset", "--audio", str(audio_folder), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_dataset_clips_captions_and_summary(audio_folder, dataset):
    """Clips, captions (.txt and metadata.jsonl), tails, silence and every bad file are as documented, and
    the summary says so."""
    out, stdout = dataset
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(row["source"], row["start_s"], row["text"]) for row in rows] == [
        ("stereo48k.wav", 0.0, "a warbling tone"), ("stereo48k.wav", 5.12, "a warbling tone"),
        ("sub/padded.flac", 0.0, "flac tone"), ("sub/padded.flac", 5.12, "flac tone")]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["files"], summary["clips"], summary["silent_clips"]) == (3, 4, 1)
    assert (summary["dropped_tails"], summary["padded_tails"]) == (2, 1)
    assert summary["seconds"] == pytest.approx(5.12 * 3 + 2.88, abs=1e-3)
    assert set(summary["skipped_files"]) == {"uncaptioned.wav", "empty.mp3", "garbage.wav", "latin1.wav", "link.wav"}
    assert "0 bytes" in summary["skipped_files"]["empty.mp3"] and "UTF-8" in summary["skipped_files"]["latin1.wav"]
    assert "symbolic link" in summary["skipped_files"]["link.wav"]
    assert "3 files, 4 clips" in stdout and "skipped garbage.wav: not a readable audio file" in stdout


def test_dataset_images_are_audio_to_image_of_the_clip(audio_folder, dataset):
    """Each image is 512x512 and pixel for pixel what audio-to-image makes of the clip (mono, 44.1 kHz)
    without its last column; datasets' imagefolder loader reads the folder."""
    import datasets

    from riffusion.audio import audio_to_image, conform, read_audio

    out, _ = dataset
    image = Image.open(out / "images" / "stereo48k.wav.0001.png")
    assert image.size == (512, 512)
    audio, rate = read_audio(audio_folder / "stereo48k.wav")
    mono = conform(audio, rate, SpectrogramParams())
    expected = audio_to_image(mono[:, 225792:2 * 225792], 44100)
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(expected)[:, :512])

    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert loaded.num_rows == 4 and loaded[2]["text"] == "flac tone" and loaded[0]["image"].size == (512, 512)


def test_dataset_without_clips_fails_and_writes_nothing(tmp_path):
    """Nothing usable (only silence and a file without a caption): one line, exit 1, no --out."""
    (tmp_path / "audio").mkdir()
    soundfile.write(tmp_path / "audio" / "quiet.wav", np.zeros(44100 * 6), 44100)
    (tmp_path / "audio" / "quiet.txt").write_text("quiet")
    soundfile.write(tmp_path / "audio" / "x.wav", _tone(6, 44100), 44100)
    result = _run("-m", "riffusion.dataset", "--audio", str(tmp_path / "audio"), "--out", str(tmp_path / "ds"), "--quiet")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "no clips made" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "ds").exists() and os.listdir(tmp_path) == ["audio"]


@pytest.mark.parametrize("args, message", [
    (["--clip-seconds", "nan"], "--clip-seconds must be a finite number"),
    (["--clip-seconds", "1e9"], "--clip-seconds must be between"),
    (["--hop-seconds", "0"], "--hop-seconds must be between"),
])
def test_dataset_bad_options(audio_folder, tmp_path, args, message):
    """Hostile numbers are refused before anything is read or written."""
    result = _run("-m", "riffusion.dataset", "--audio", str(audio_folder), "--out", str(tmp_path / "ds"), *args)
    assert result.returncode == 1 and message in result.stderr and not (tmp_path / "ds").exists()
