"""python -m riffusion: each command end to end, with measured outputs, and clear errors."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile
from PIL import Image

from riffusion import seed_images, synth
from riffusion.audio import write_audio


def run(*args):
    return subprocess.run([sys.executable, "-m", "riffusion", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def drums(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "drums.wav"
    write_audio(path, synth.drum_loop(6.0), 44100)
    return path


def test_audio_to_image_and_back(drums, tmp_path):
    image_path, audio_path = tmp_path / "drums.png", tmp_path / "back.wav"
    assert run("audio-to-image", drums, image_path).returncode == 0
    image = Image.open(image_path)
    assert image.size == (601, 512)  # 6 s at 10 ms per column, centred STFT
    assert run("image-to-audio", image_path, audio_path).returncode == 0
    info = soundfile.info(audio_path)
    assert info.samplerate == 44100 and abs(info.duration - 6.0) < 0.02


def test_make_seed_image_takes_the_first_five_seconds(drums, tmp_path):
    out = tmp_path / "seed.png"
    result = run("make-seed-image", drums, out)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (512, 512)


def test_text_to_audio_and_interpolate_on_a_tiny_model(paddle_library, tmp_path):
    out = tmp_path / "jazz.wav"
    result = run("text-to-audio", "(caribbean:1.5) (jazz:0.3)", out, "--checkpoint", paddle_library, "--steps", 2, "--width", 64)
    assert result.returncode == 0, result.stderr
    assert abs(soundfile.info(out).duration - 0.63) < 0.02 and Image.open(out.with_suffix(".png")).size == (64, 512)
    seed = tmp_path / "seed.png"
    seed_images.load("og_beat").crop((0, 0, 64, 512)).save(seed)
    out = tmp_path / "mix.mp3"
    result = run("interpolate", "jazz", "rock", out, "--checkpoint", paddle_library, "--alpha", 0.3, "--steps", 2,
                 "--seed-image", seed, "--mask", "mask_top_third_75")
    assert result.returncode == 0, result.stderr
    audio, rate = soundfile.read(out)
    assert rate == 44100 and np.abs(audio).max() > 0


@pytest.mark.parametrize("args, message", [
    (["image-to-audio", "missing.png", "x.wav"], "missing.png: no such file"),
    (["audio-to-image", "not-audio.txt", "x.png"], "not-audio.txt: not a readable audio file"),
    (["text-to-audio", "jazz", "x.wav", "--checkpoint", "nowhere"], "nowhere: not a converted library"),
    (["interpolate", "a", "b", "x.wav", "--checkpoint", "LIB", "--seed-image", "no_such_seed"], "unknown seed or mask image 'no_such_seed'"),
    # Output names and folders are checked before any work (the model is never loaded for these).
    (["text-to-audio", "x", "out.png", "--checkpoint", "LIB"], "out.png: the output must end in one of .wav, .mp3, .flac, .ogg, .aiff"),
    (["image-to-audio", "SEED", "x.xyz"], "x.xyz: the output must end in one of .wav, .mp3, .flac, .ogg, .aiff"),
    (["audio-to-image", "drums.wav", "x.wav"], "x.wav: the output must end in one of .png, .jpg, .jpeg"),
    (["interpolate", "a", "b", "missing/x.wav", "--checkpoint", "LIB"], "missing/x.wav: no such folder missing"),
    (["image-to-audio", "SEED", "missing/x.wav"], "missing/x.wav: no such folder missing"),
    (["make-seed-image", "drums.wav", "missing/seed.png"], "missing/seed.png: no such folder missing"),
    (["image-to-audio", "SEED", "sub"], "sub: the output must end in one of .wav, .mp3, .flac, .ogg, .aiff"),
])
def test_errors_are_one_line_and_exit_1(tmp_path, paddle_library, drums, args, message):
    (tmp_path / "not-audio.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "drums.wav").write_bytes(drums.read_bytes())
    replace = {"LIB": str(paddle_library), "SEED": str(seed_images.FOLDER / "og_beat.png")}
    args = [replace.get(a, a) for a in args]
    result = subprocess.run([sys.executable, "-m", "riffusion", *args], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {message}" or message in result.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drums.wav", "not-audio.txt", "sub"]  # nothing written


@pytest.mark.parametrize("option, value, message", [
    ("--steps", "0", "argument --steps: must be at least 1, got 0"),
    ("--steps", "-5", "argument --steps: must be at least 1, got -5"),
    ("--guidance", "nan", "argument --guidance: must be a finite number, got nan"),
    ("--width", "100", "argument --width: must be a multiple of 8 up to 6000, got 100"),
])
def test_bad_numbers_are_refused_before_any_work(tmp_path, option, value, message):
    result = run("text-to-audio", "jazz", tmp_path / "x.wav", "--checkpoint", tmp_path, option, value)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].endswith(message)


def test_a_failed_audio_step_leaves_neither_file(tmp_path, monkeypatch):
    """The audio and its .png are written side by side and renamed into place together: when the audio
    write fails (here: the disk fills up), no lone .png is left, and no staging file either."""
    import errno

    import riffusion.audio
    from riffusion.cli import _save_image_and_audio

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(riffusion.audio, "write_audio", disk_full)
    with pytest.raises(OSError):
        _save_image_and_audio(seed_images.load("og_beat").crop((0, 0, 64, 512)), tmp_path / "out.wav")
    assert list(tmp_path.iterdir()) == []
