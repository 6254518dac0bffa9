"""Resources driven by input (issue 14): audio and images cannot make riffusion ask for gigabytes. Each
case either ends with one clear line or runs under a stated memory bound, measured as the command's peak
resident memory in a fresh process."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile
from PIL import Image

from riffusion.audio import MAX_AUDIO_SECONDS, image_to_audio
from riffusion.image import save_image
from riffusion.params import ExifTag, SpectrogramParams
from riffusion.spectrogram import MAX_STFT_CELLS

# VmHWM is the peak of this process's own memory map. ru_maxrss is not: it keeps the peak of the map
# replaced by exec, i.e. of the forked copy of a pytest process that may already hold gigabytes.
MEASURED_RUN = ("import re, sys; from riffusion.cli import main; code = main(sys.argv[1:]); "
                "peak_kb = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
                "print('peak_mb', peak_kb // 1024, file=sys.stderr); sys.exit(code)")


def run_measured(*args) -> tuple[int, str, int]:
    """(exit code, last stderr line that is not the measurement, peak resident MB) of a riffusion command."""
    result = subprocess.run([sys.executable, "-c", MEASURED_RUN, *map(str, args)], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    peak = int(lines[-1].split()[-1])
    return result.returncode, (lines[-2] if len(lines) > 1 else ""), peak


def spectrogram_image(width: int, exif: dict) -> Image.Image:
    image = Image.new("RGB", (width, 512), (200, 200, 200))
    image.getexif().update(exif)
    return image


def test_exif_sample_rate_of_ten_megahertz_is_refused_in_one_line(tmp_path):
    """Before: a 64-pixel image with 10**7 Hz in its EXIF used 8 GB, then raised MemoryError."""
    path = tmp_path / "huge_rate.png"
    save_image(spectrogram_image(64, {ExifTag.SAMPLE_RATE: 10**7}), path)
    code, line, peak = run_measured("image-to-audio", path, tmp_path / "out.wav")
    assert code == 1 and line == "error: EXIF: spectrogram parameter sample_rate = 10000000 is outside [1000, 192000]"
    assert peak < 400 and not (tmp_path / "out.wav").exists()


@pytest.mark.parametrize("tag", [tag for tag in ExifTag if tag not in (ExifTag.STEREO, ExifTag.MIN_FREQUENCY)])
def test_exif_zero_values_are_refused_with_the_tag_named(tag):
    """0 where a size, rate or power belongs (stereo 0 and min frequency 0 are valid values)."""
    image = spectrogram_image(64, {tag: 0})
    with pytest.raises(ValueError, match=tag.name.lower()):
        image_to_audio(image)


def test_largest_parameters_allowed_stay_under_a_gigabyte(tmp_path):
    """The worst sizes the ranges allow (FFT 65536, 1024 mel bins) on a 64-column image: measured 0.97 GB
    peak, of which the mel filterbank and its pseudo-inverse are most."""
    params = SpectrogramParams(sample_rate=163840, window_duration_ms=400, padded_duration_ms=400,
                               num_frequencies=1024, max_frequency=81920)
    assert params.n_fft == 2**16
    path = tmp_path / "largest.png"
    image = Image.new("RGB", (64, 1024), (120, 120, 120))
    image.getexif().update(params.to_exif())
    save_image(image, path)
    code, line, peak = run_measured("image-to-audio", path, tmp_path / "out.wav")
    assert code == 0, line
    assert peak < 1200, peak


def test_audio_at_one_hertz_is_refused_before_resampling(tmp_path):
    """Before: a 4 KB wav at 1 Hz asked for 13 GiB (resampled to 44.1 kHz, then a spectrogram)."""
    path = tmp_path / "one_hertz.wav"
    soundfile.write(path, np.zeros(2000, np.float32), 1, subtype="PCM_16")
    code, line, peak = run_measured("audio-to-image", path, tmp_path / "out.png")
    assert code == 1 and line.endswith("sample rate 1 Hz is outside 1000..384000 Hz"), line
    assert peak < 400 and not (tmp_path / "out.png").exists()


def test_audio_longer_than_the_limit_is_refused_from_its_header(tmp_path):
    path = tmp_path / "long.wav"
    rate = 8000
    with soundfile.SoundFile(path, "w", rate, 1, "PCM_16") as sound:
        for _ in range(MAX_AUDIO_SECONDS // 60 + 1):
            sound.write(np.zeros(60 * rate, np.float32))
    code, line, peak = run_measured("audio-to-image", path, tmp_path / "out.png")
    assert code == 1 and line.endswith(f"at most {MAX_AUDIO_SECONDS} s is turned into a spectrogram"), line
    assert peak < 400


def test_a_minute_of_audio_to_image_runs_in_bounded_memory(tmp_path):
    """The FFT runs over 1024 frames at a time. One minute: 353 MB peak here, against 1.09 GB before (and
    a 10-minute wav: 654 MB against 8.9 GB)."""
    path = tmp_path / "minute.wav"
    soundfile.write(path, np.random.default_rng(0).normal(0, 0.1, 60 * 44100).astype(np.float32), 44100, "PCM_16")
    code, line, peak = run_measured("audio-to-image", path, tmp_path / "minute.png")
    assert code == 0, line
    assert Image.open(tmp_path / "minute.png").size == (6001, 512)
    assert peak < 600, peak


def test_images_too_long_to_decode_are_refused_before_work():
    """Griffin-Lim holds the whole STFT several times: at most MAX_STFT_CELLS (6000 columns, 60 s, about
    1.4 GB at the default parameters)."""
    longest = MAX_STFT_CELLS // (SpectrogramParams().n_fft // 2 + 1)
    assert longest == 6000
    with pytest.raises(ValueError, match="6001 columns long is too long to decode: at most 6000 columns"):
        image_to_audio(Image.new("RGB", (6001, 512)))
