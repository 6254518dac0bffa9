"""The loudness target (RMS -12 dBFS, sample peaks at most -1 dBFS) and MP3 output that decodes without
clipping, measured in dB against riffusion-hobby's own audio filters run with pydub, the library it uses."""

import io

import numpy as np
import pytest
from PIL import Image

from riffusion import seed_images, synth
from riffusion.audio import (LOUDNESS_TARGET_DBFS, MP3_MAX_DECODED_PEAK, PEAK_CEILING, image_to_audio,
                             normalize_loudness, read_audio, write_audio)

RATE = 44100
pytestmark = pytest.mark.filterwarnings("ignore:Couldn't find ffmpeg")  # pydub, used without ffmpeg here


def rms_dbfs(audio: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))


def hobby_filters(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """riffusion-hobby's output chain (audio_from_waveform with normalize=True, then apply_filters without
    compression): peak to int16 full scale, gain to -12 dBFS RMS (pydub saturates what passes full scale),
    peak to -0.1 dBFS."""
    import pydub
    import pydub.effects

    samples = audio * (np.iinfo(np.int16).max / np.max(np.abs(audio)))
    segment = pydub.AudioSegment(samples.T.astype(np.int16).tobytes(), frame_rate=sample_rate,
                                 sample_width=2, channels=audio.shape[0])
    segment = segment.apply_gain(-12 - segment.dBFS)
    segment = pydub.effects.normalize(segment, headroom=0.1)
    return np.array(segment.get_array_of_samples(), dtype=np.float32)[None] / 32768


def quieter(image: Image.Image, factor: float) -> Image.Image:
    """The same spectrogram with every magnitude scaled by factor ** 4 (pixels encode magnitude ** 0.25)."""
    pixels = np.asarray(image, dtype=np.float64)
    return Image.fromarray((255 - (255 - pixels) * factor).astype(np.uint8))


@pytest.mark.parametrize("name", ["og_beat", "marim"])
def test_quiet_and_loud_spectrograms_come_out_at_the_hobbys_level(name):
    """og_beat (drums, crest factor 25 dB) and marim (11.5 dB), as they are and 24 dB quieter (pixels halfway
    to white). Before: the quiet og_beat came out at -46 dBFS RMS against the hobby's -13.7, 33 dB below it
    (marim: -34.6 against -11.5). Now every one is within 0.2 dB of the target and 2 dB of the hobby."""
    image = seed_images.load(name)
    for picture in (image, quieter(image, 0.5)):
        raw, rate = image_to_audio(picture, normalize=False)
        audio, _ = image_to_audio(picture)
        hobby = hobby_filters(raw, rate)
        assert abs(rms_dbfs(audio) - LOUDNESS_TARGET_DBFS) < 0.2, rms_dbfs(audio)
        assert abs(rms_dbfs(audio) - rms_dbfs(hobby)) < 2.0, (rms_dbfs(audio), rms_dbfs(hobby))
        assert np.abs(audio).max() <= PEAK_CEILING


def test_normalisation_keeps_shape_where_no_limiting_is_needed_and_silence_silent():
    """A sine has a crest factor of 3 dB: it is only scaled (to peak at the ceiling, RMS -4 dBFS, above the
    target), as the hobby's final peak normalisation does. Silence is left alone."""
    sine = synth.tone(440.0, 1.0, amplitude=0.01)
    out = normalize_loudness(sine, RATE)
    assert np.allclose(out, sine * (PEAK_CEILING / np.abs(sine).max()), atol=1e-6)
    assert rms_dbfs(out) == pytest.approx(20 * np.log10(PEAK_CEILING / np.sqrt(2)), abs=0.01)
    assert not normalize_loudness(np.zeros((1, 1000), np.float32), RATE).any()


def test_limiter_stops_at_its_maximum_on_clicks_in_near_silence():
    """Clicks over noise 54 dB below them: reaching -12 dBFS RMS would mean raising the noise floor by
    34 dB; the limiter stops at MAX_LIMITING_DB (24), so the noise rises by 24 dB over plain peak
    normalisation and no more, and the peaks stay under the ceiling."""
    from riffusion.audio import MAX_LIMITING_DB

    audio = np.random.default_rng(0).normal(0, 0.001, (1, RATE)).astype(np.float32)
    clicks = np.arange(0, RATE, RATE // 4)
    audio[0, clicks] = 0.5
    out = normalize_loudness(audio, RATE)
    assert np.abs(out).max() <= PEAK_CEILING
    quiet = np.ones(RATE, bool)
    for click in clicks:
        quiet[max(click - 2000, 0):click + 2000] = False
    raised = rms_dbfs(out[:, quiet]) - rms_dbfs(audio[:, quiet] * (PEAK_CEILING / 0.5))
    assert MAX_LIMITING_DB - 0.1 < raised < MAX_LIMITING_DB + 0.1, raised
    assert rms_dbfs(out) < LOUDNESS_TARGET_DBFS - 1


@pytest.mark.parametrize("signal", ["square", "agile"])
def test_mp3_decodes_below_full_scale(signal):
    """MP3 overshoots: a square wave at 0.99 decoded to a peak of 1.42, agile limited to 0.99 to 1.005
    (clipped by any 16-bit player). Written MP3 now decodes to at most 0.99."""
    if signal == "square":
        audio = 0.99 * np.sign(np.sin(2 * np.pi * 1000 * np.arange(RATE) / RATE)).astype(np.float32)[None]
    else:
        audio, _ = image_to_audio(seed_images.load("agile"))
    buffer = io.BytesIO()
    write_audio(buffer, audio, RATE, format="MP3")
    buffer.seek(0)
    decoded, _ = read_audio(buffer)
    assert np.abs(decoded).max() <= MP3_MAX_DECODED_PEAK
    assert rms_dbfs(decoded) > rms_dbfs(audio) - 3.5  # scaled down by the overshoot only


def test_cli_image_to_audio_writes_at_the_target(tmp_path):
    """The command line's audio path (image-to-audio; text-to-audio and interpolate share its writer):
    a quiet og_beat comes out at -12 dBFS RMS in the WAV, not at -46."""
    import subprocess
    import sys

    quiet, out = tmp_path / "quiet.png", tmp_path / "quiet.wav"
    quieter(seed_images.load("og_beat"), 0.5).save(quiet)
    result = subprocess.run([sys.executable, "-m", "riffusion", "image-to-audio", str(quiet), str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    audio, _ = read_audio(out)
    assert abs(rms_dbfs(audio) - LOUDNESS_TARGET_DBFS) < 0.2 and np.abs(audio).max() <= PEAK_CEILING + 1 / 32768
