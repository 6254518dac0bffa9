"""Audio <-> spectrogram image in one call, and audio files through soundfile (WAV, FLAC, OGG, MP3).

Audio arrays are float32 [channels, samples] in [-1, 1]; a 1-D array is one channel.
"""

from __future__ import annotations

import io
from math import gcd
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image
from scipy import ndimage, signal

from riffusion.image import image_from_spectrogram, params_from_image, spectrogram_from_image
from riffusion.params import SpectrogramParams
from riffusion.spectrogram import audio_from_spectrogram, check_decodable, spectrogram_from_audio

# Input audio: the sample rates accepted, and the longest audio turned into a spectrogram (10 minutes
# peaked at 0.65 GB: the input, the 60001-column spectrogram and its image).
INPUT_SAMPLE_RATES = (1000, 384000)
MAX_AUDIO_SECONDS = 600


def audio_to_image(audio: np.ndarray, sample_rate: int, params: SpectrogramParams = SpectrogramParams()) -> Image.Image:
    """Spectrogram image of the audio, resampled and mixed to the params' rate and channels first.

    5.12 s at 44.1 kHz gives 513 columns (a centred STFT); the image carries the params as EXIF.
    """
    conformed = conform(audio, sample_rate, params)
    return image_from_spectrogram(spectrogram_from_audio(conformed, params), params)


def image_to_audio(image: Image.Image, params: SpectrogramParams | None = None,
                   exact: bool = False, normalize: bool = True) -> tuple[np.ndarray, int]:
    """(audio, sample_rate) of a spectrogram image: 512 columns give 5.11 s.

    params: those given, else those the image's EXIF carries, else the defaults. exact: run
    Griffin-Lim as riffusion-hobby does, every iteration at full resolution (about 3x slower; see
    riffusion.spectrogram.griffin_lim_stages). normalize: bring the audio to the loudness target
    (normalize_loudness), as riffusion-hobby's audio filters do; False gives the spectrogram's own level.
    """
    params = params or params_from_image(image) or SpectrogramParams()
    check_decodable(image.width, params)
    audio = audio_from_spectrogram(spectrogram_from_image(image, params), params, exact=exact)
    if normalize:
        audio = normalize_loudness(audio, params.sample_rate)
    return audio, params.sample_rate


# The loudness target: RMS -12 dBFS (RMS relative to a full-scale sample, pydub's dBFS), the level
# riffusion-hobby's filters aim at, with every sample peak at most PEAK_CEILING (-1 dBFS).
LOUDNESS_TARGET_DBFS = -12.0
PEAK_CEILING = 10 ** (-1.0 / 20)
# Gain changes of the limiter ramp over this long (a look-ahead window centred on each peak).
LIMITER_WINDOW_S = 0.01
# The most the limiter lowers any peak (drums at a crest factor of 25 dB need about 20 dB to reach the
# target); peakier audio (clicks in near silence) stays below the target rather than having its
# noise floor raised further.
MAX_LIMITING_DB = 24.0


def normalize_loudness(audio: np.ndarray, sample_rate: int, target_dbfs: float = LOUDNESS_TARGET_DBFS,
                       ceiling: float = PEAK_CEILING) -> np.ndarray:
    """Audio brought to the loudness target without clipping.

    riffusion-hobby scales its output to an RMS of -12 dBFS, hard-clipping the peaks that this pushes
    past full scale, then scales the peak to -0.1 dBFS. Here the peak goes to `ceiling`; audio whose
    RMS is then below the target (a crest factor above ceiling / target, 11 dB: most drums) is raised
    to the target and its peaks are held under the ceiling by a look-ahead limiter instead of being
    clipped (by at most MAX_LIMITING_DB). So a quiet and a loud spectrogram of the same music come out
    at the same level, at least target_dbfs RMS, peaking at the ceiling. Silence stays silence.
    """
    audio = np.asarray(audio, dtype=np.float32)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak == 0.0 or not np.isfinite(peak):
        return audio
    out = audio * np.float32(ceiling / peak)
    target = 10 ** (target_dbfs / 20)
    allowance = 10 ** (MAX_LIMITING_DB / 20)
    # Each pass of the limiter lowers the RMS a little, so it runs until the target is met (3-5 passes
    # for drums) or the gain is spent.
    while allowance > 1.0001:
        gain = min(target / _rms(out), allowance)
        if gain <= 10 ** (0.05 / 20):
            break
        allowance /= gain
        out = _limit(out * np.float32(gain), ceiling, max(int(LIMITER_WINDOW_S * sample_rate), 1))
    return out


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))


def _limit(audio: np.ndarray, ceiling: float, window: int) -> np.ndarray:
    """Scale every sample by a smooth gain that keeps |sample| <= ceiling.

    The gain each sample needs is min(1, ceiling / |sample|) (shared by the channels). Its running
    minimum over `window`, averaged over `window`, is a smooth gain no larger than what any sample in
    the window needs; the final minimum with the needed gain only guards the edges and rounding.
    """
    needed = np.minimum(1.0, ceiling / np.maximum(np.max(np.abs(audio), axis=0), 1e-30))
    smooth = ndimage.uniform_filter1d(ndimage.minimum_filter1d(needed, window), window)
    gain = np.minimum(smooth, needed).astype(np.float32)
    return np.clip(audio * gain, -ceiling, ceiling)


def without_clipping(audio: np.ndarray, peak: float = 0.99) -> np.ndarray:
    """Griffin-Lim output can peak above full scale (a 0.8-peak chord came back at 1.03): scale it
    down before writing 16-bit audio. Audio from image_to_audio's default normalisation already peaks
    at PEAK_CEILING, below this."""
    loudest = float(np.max(np.abs(audio))) if audio.size else 0.0
    return audio * (peak / loudest) if loudest > peak else audio


def conform(audio: np.ndarray, sample_rate: int, params: SpectrogramParams) -> np.ndarray:
    """Float32 [channels, samples] at params.sample_rate with params.num_channels (mono by averaging)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    check_input(audio.shape[-1], sample_rate)
    if audio.shape[0] != params.num_channels:
        audio = np.broadcast_to(audio.mean(axis=0, keepdims=True), (params.num_channels, audio.shape[1]))
    return resample(audio, sample_rate, params.sample_rate)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Polyphase resampling along the last axis (48 kHz -> 44.1 kHz is up 147, down 160)."""
    if from_rate == to_rate:
        return np.ascontiguousarray(audio, dtype=np.float32)
    common = gcd(from_rate, to_rate)
    return signal.resample_poly(audio, to_rate // common, from_rate // common, axis=-1).astype(np.float32)


def check_input(samples: int, sample_rate: int) -> None:
    """ValueError unless the sample rate is in INPUT_SAMPLE_RATES and the audio at most MAX_AUDIO_SECONDS."""
    low, high = INPUT_SAMPLE_RATES
    if not low <= sample_rate <= high:
        raise ValueError(f"sample rate {sample_rate} Hz is outside {low}..{high} Hz")
    if samples > MAX_AUDIO_SECONDS * sample_rate:
        raise ValueError(f"audio is {samples / sample_rate:.0f} s long: at most {MAX_AUDIO_SECONDS} s is turned "
                         f"into a spectrogram")


def read_audio(file, seconds: float | None = None) -> tuple[np.ndarray, int]:
    """(audio [channels, samples] float32, sample_rate) from a path or file object.

    seconds: read only that much from the start. Otherwise the file's header is checked before its
    samples are read: at most MAX_AUDIO_SECONDS, a sample rate in INPUT_SAMPLE_RATES.
    """
    with soundfile.SoundFile(file) as sound:
        frames = sound.frames if seconds is None else min(sound.frames, int(round(seconds * sound.samplerate)))
        check_input(frames, sound.samplerate)
        data = sound.read(frames, dtype="float32", always_2d=True)
    return np.ascontiguousarray(data.T), sound.samplerate


# What a decoded MP3 may peak at. MP3 encoding overshoots the input's peaks (audio peaking at 0.99 came
# back at 1.005, a 0.99 square wave at 1.42), so MP3 output is decoded and checked, and scaled down
# and encoded again when it overshoots.
MP3_MAX_DECODED_PEAK = 0.99


def write_audio(file, audio: np.ndarray, sample_rate: int, format: str | None = None) -> None:
    """Write [channels, samples] float audio; the format follows the file name unless given
    (a file object needs one: "WAV", "MP3", ...). soundfile 0.14 encodes MP3 itself; MP3 output decodes
    to peaks of at most MP3_MAX_DECODED_PEAK."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    if (format or ("" if hasattr(file, "write") else Path(file).suffix[1:])).upper() != "MP3":
        soundfile.write(file, audio.T, sample_rate, format=format)
        return
    encoded = _mp3_within_peak(audio, sample_rate)
    if hasattr(file, "write"):
        file.write(encoded)
    else:
        Path(file).write_bytes(encoded)


def _mp3_within_peak(audio: np.ndarray, sample_rate: int) -> bytes:
    for _ in range(4):
        buffer = io.BytesIO()
        soundfile.write(buffer, audio.T, sample_rate, format="MP3")
        decoded, _ = soundfile.read(io.BytesIO(buffer.getvalue()), dtype="float32")
        peak = float(np.max(np.abs(decoded))) if decoded.size else 0.0
        if peak <= MP3_MAX_DECODED_PEAK:
            return buffer.getvalue()
        audio = audio * np.float32(0.995 * MP3_MAX_DECODED_PEAK / peak)
    raise ValueError(f"MP3 encoding keeps overshooting to a peak of {peak:.3f}")
