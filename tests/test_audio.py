"""riffusion's audio half: spectrogram image <-> audio, measured against numbers, not only shapes."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from riffusion import synth
from riffusion.audio import audio_to_image, image_to_audio, read_audio, write_audio
from riffusion.image import image_from_spectrogram, params_from_image, save_image, spectrogram_from_image
from riffusion.params import ExifTag, SpectrogramParams
from riffusion.spectrogram import mel_filterbank, spectral_convergence, spectrogram_from_audio

PARAMS = SpectrogramParams()
RATE = PARAMS.sample_rate

# Measured with the default Griffin-Lim stages and seed: chords 0.081 (exact schedule: 0.069; the
# 8-bit image alone: 0.012); MP3 at soundfile's default settings: 0.050.
CHORDS_ROUND_TRIP_MAX_SC = 0.10
MP3_MAX_SC = 0.08


def dominant_frequency(audio: np.ndarray, sample_rate: int) -> float:
    """Peak of a hann-windowed spectrum zero-padded 16x (about 0.06 Hz bins for 1 s)."""
    padded_length = 16 * audio.shape[-1]
    spectrum = np.abs(np.fft.rfft(audio[0] * np.hanning(audio.shape[-1]), padded_length))
    return np.argmax(spectrum) * sample_rate / padded_length


@pytest.fixture(scope="module")
def chords():
    return synth.chord_progression()


@pytest.fixture(scope="module")
def chords_image(chords):
    return audio_to_image(chords, RATE)


def test_params_defaults_and_derived_sizes():
    assert (PARAMS.hop_length, PARAMS.win_length, PARAMS.n_fft) == (441, 4410, 17640)
    assert PARAMS.num_frequencies == 512 and PARAMS.max_frequency == 10000 and PARAMS.power_for_image == 0.25


def test_5_12_seconds_make_513_columns_of_512_rows(chords, chords_image):
    assert chords.shape == (1, 225792)
    assert chords_image.size == (513, 512) and chords_image.mode == "RGB"


def test_512_columns_decode_to_5_11_seconds(chords_image):
    audio, sample_rate = image_to_audio(chords_image.crop((0, 0, 512, 512)))
    assert sample_rate == 44100
    assert audio.shape == (1, 225351) and audio.dtype == np.float32
    assert audio.shape[1] / sample_rate == pytest.approx(5.11)


def test_chords_round_trip_spectral_convergence(chords, chords_image):
    audio, _ = image_to_audio(chords_image, normalize=False)
    assert audio.shape == chords.shape
    convergence = spectral_convergence(spectrogram_from_audio(chords, PARAMS), spectrogram_from_audio(audio, PARAMS))
    assert convergence < CHORDS_ROUND_TRIP_MAX_SC


@pytest.mark.parametrize("frequency", [440.0, 3000.0])
def test_tone_frequency_survives_round_trip(frequency):
    audio, sample_rate = image_to_audio(audio_to_image(synth.tone(frequency, 1.0), RATE))
    assert abs(dominant_frequency(audio, sample_rate) - frequency) < 3.0


def test_low_tone_darkens_the_bottom_rows():
    image = audio_to_image(synth.tone(110.0, 1.0), RATE)
    brightness = np.asarray(image)[..., 0].astype(float).mean(axis=1)  # one value per row, top first
    loudest_mel_bin = int(np.argmax(mel_filterbank(PARAMS)[int(round(110.0 / (RATE / PARAMS.n_fft)))]))
    # 110 Hz sits between two filters' peaks (108.0 and 112.3 Hz, weights 0.54 and 0.46): either may win.
    assert abs(int(np.argmin(brightness)) - (511 - loudest_mel_bin)) <= 1
    assert brightness[-128:].mean() < brightness[:128].mean() - 20


def test_image_pixels_follow_the_hobby_formula():
    spectrogram = np.zeros((1, 512, 4), dtype=np.float32)
    spectrogram[0, 0, :] = [16.0, 1.0, 0.0625, 0.0]  # bottom row after the flip
    pixels = np.asarray(image_from_spectrogram(spectrogram, PARAMS))
    assert pixels[511, :, 0].tolist() == [0, 127, 191, 255]  # 255 - (v / 16) ** 0.25 * 255, truncated
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert (pixels[:511] == 255).all()


def test_stereo_uses_green_and_blue():
    params = SpectrogramParams(stereo=True)
    image = audio_to_image(np.concatenate([synth.tone(220.0, 1.0), synth.tone(2000.0, 1.0)]), RATE, params)
    pixels = np.asarray(image)
    assert (pixels[..., 0] == 0).all()
    assert np.argmin(pixels[..., 1].mean(axis=1)) > np.argmin(pixels[..., 2].mean(axis=1))  # 220 Hz lower
    assert spectrogram_from_image(image, params).shape == (2, 512, 101)


def test_exif_round_trip_of_params_and_max_value(tmp_path):
    params = SpectrogramParams(stereo=True, min_frequency=20, max_frequency=9000, power_for_image=0.3)
    assert SpectrogramParams.from_exif(params.to_exif()) == params
    spectrogram = spectrogram_from_audio(np.concatenate([synth.tone(440.0, 1.0)] * 2), params)
    path = tmp_path / "spectrogram.png"
    save_image(image_from_spectrogram(spectrogram, params), path)
    with Image.open(path) as reopened:
        assert params_from_image(reopened) == params
        assert reopened.getexif()[ExifTag.MAX_VALUE] == pytest.approx(float(spectrogram.max()))
        assert reopened.getexif()[ExifTag.SAMPLE_RATE] == 44100


def test_decoding_without_exif_uses_defaults():
    plain = Image.new("L", (8, 512), 0)  # every pixel black: the loudest value
    assert params_from_image(plain) is None
    assert np.allclose(spectrogram_from_image(plain, PARAMS), 30e6)


def test_48_khz_stereo_input_is_resampled_and_mixed_down():
    tone_48k = synth.tone(440.0, 1.0, sample_rate=48000)
    image = audio_to_image(np.concatenate([tone_48k, tone_48k]), 48000)
    reference = audio_to_image(synth.tone(440.0, 1.0), RATE)
    assert image.size == reference.size == (101, 512)
    assert np.argmin(np.asarray(image)[..., 0].mean(axis=1)) == np.argmin(np.asarray(reference)[..., 0].mean(axis=1))


def test_wav_round_trip_is_16_bit_exact(chords, tmp_path):
    path = tmp_path / "chords.wav"
    write_audio(path, chords, RATE)
    audio, sample_rate = read_audio(path)
    assert sample_rate == RATE and audio.shape == chords.shape
    assert np.abs(audio - chords).max() <= 1 / 32768


def test_mp3_round_trip(chords, tmp_path):
    path = tmp_path / "chords.mp3"
    write_audio(path, chords, RATE)
    assert soundfile.info(str(path)).format == "MP3"
    audio, sample_rate = read_audio(path)
    assert sample_rate == RATE and abs(audio.shape[1] - chords.shape[1]) <= 1152  # one MPEG frame
    length = min(audio.shape[1], chords.shape[1])
    convergence = spectral_convergence(spectrogram_from_audio(chords[:, :length], PARAMS),
                                       spectrogram_from_audio(audio[:, :length], PARAMS))
    assert convergence < MP3_MAX_SC


def test_mp3_to_a_file_object():
    buffer = io.BytesIO()
    write_audio(buffer, synth.tone(440.0, 1.0), RATE, format="MP3")
    buffer.seek(0)
    audio, sample_rate = read_audio(buffer)
    assert abs(dominant_frequency(audio, sample_rate) - 440.0) < 1.0


def test_riffusion_imports_no_torch():
    code = ("import sys, riffusion.audio, riffusion.synth; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.strip() == "[]"
