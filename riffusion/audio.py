"""Audio <-> spectrogram image in one call, and audio files through soundfile (WAV, FLAC, OGG, MP3).

Audio arrays are float32 [channels, samples] in [-1, 1]; a 1-D array is one channel.
"""

from __future__ import annotations

from math import gcd

import numpy as np
import soundfile
from PIL import Image
from scipy import signal

from riffusion.image import image_from_spectrogram, params_from_image, spectrogram_from_image
from riffusion.params import SpectrogramParams
from riffusion.spectrogram import audio_from_spectrogram, spectrogram_from_audio


def audio_to_image(audio: np.ndarray, sample_rate: int, params: SpectrogramParams = SpectrogramParams()) -> Image.Image:
    """Spectrogram image of the audio, resampled and mixed to the params' rate and channels first.

    5.12 s at 44.1 kHz gives 513 columns (a centred STFT); the image carries the params as EXIF.
    """
    conformed = conform(audio, sample_rate, params)
    return image_from_spectrogram(spectrogram_from_audio(conformed, params), params)


def image_to_audio(image: Image.Image, params: SpectrogramParams | None = None,
                   exact: bool = False) -> tuple[np.ndarray, int]:
    """(audio, sample_rate) of a spectrogram image: 512 columns give 5.11 s.

    params: those given, else those the image's EXIF carries, else the defaults. exact: run
    Griffin-Lim as riffusion-hobby does, every iteration at full resolution (about 3x slower; see
    riffusion.spectrogram.griffin_lim_stages).
    """
    params = params or params_from_image(image) or SpectrogramParams()
    audio = audio_from_spectrogram(spectrogram_from_image(image, params), params, exact=exact)
    return audio, params.sample_rate


def without_clipping(audio: np.ndarray, peak: float = 0.99) -> np.ndarray:
    """Griffin-Lim output can peak above full scale (a 0.8-peak chord came back at 1.03): scale it
    down before writing 16-bit or MP3, as riffusion-hobby normalises its output too."""
    loudest = float(np.max(np.abs(audio))) if audio.size else 0.0
    return audio * (peak / loudest) if loudest > peak else audio


def conform(audio: np.ndarray, sample_rate: int, params: SpectrogramParams) -> np.ndarray:
    """Float32 [channels, samples] at params.sample_rate with params.num_channels (mono by averaging)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    if audio.shape[0] != params.num_channels:
        audio = np.broadcast_to(audio.mean(axis=0, keepdims=True), (params.num_channels, audio.shape[1]))
    return resample(audio, sample_rate, params.sample_rate)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Polyphase resampling along the last axis (48 kHz -> 44.1 kHz is up 147, down 160)."""
    if from_rate == to_rate:
        return np.ascontiguousarray(audio, dtype=np.float32)
    common = gcd(from_rate, to_rate)
    return signal.resample_poly(audio, to_rate // common, from_rate // common, axis=-1).astype(np.float32)


def read_audio(file) -> tuple[np.ndarray, int]:
    """(audio [channels, samples] float32, sample_rate) from a path or file object."""
    data, sample_rate = soundfile.read(file, dtype="float32", always_2d=True)
    return np.ascontiguousarray(data.T), sample_rate


def write_audio(file, audio: np.ndarray, sample_rate: int, format: str | None = None) -> None:
    """Write [channels, samples] float audio; the format follows the file name unless given
    (a file object needs one: "WAV", "MP3", ...). soundfile 0.14 encodes MP3 itself."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    soundfile.write(file, audio.T, sample_rate, format=format)
