"""Spectrogram parameters: riffusion-hobby's defaults and the EXIF tags that carry them in images.

Parameters come from images' EXIF, that is from anyone: every value is checked against RANGES, and the
FFT size (n_fft: padded duration x sample rate) is at most MAX_FFT_SIZE, so no image can ask for
gigabytes (a 64-pixel image whose EXIF said 10**7 Hz once took 8 GB).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class ExifTag(IntEnum):
    """Private EXIF tag numbers riffusion-hobby writes into spectrogram images."""

    SAMPLE_RATE = 11000
    STEREO = 11005
    STEP_SIZE_MS = 11010
    WINDOW_DURATION_MS = 11020
    PADDED_DURATION_MS = 11030
    NUM_FREQUENCIES = 11040
    MIN_FREQUENCY = 11050
    MAX_FREQUENCY = 11060
    POWER_FOR_IMAGE = 11070
    MAX_VALUE = 11080


# Sane ranges, inclusive: the hobby's defaults sit well inside each.
RANGES = {
    "sample_rate": (1000, 192000),  # Hz
    "step_size_ms": (1, 1000),
    "window_duration_ms": (1, 1000),
    "padded_duration_ms": (1, 2000),
    "num_frequencies": (1, 1024),  # mel bins = image rows
    "min_frequency": (0, 96000),  # Hz, and below max_frequency
    "max_frequency": (1, 96000),  # Hz, and at most half the sample rate
    "power_for_image": (0.01, 10.0),
    "max_mel_iters": (0, 10000),
    "num_griffin_lim_iters": (0, 1000),
}
MAX_FFT_SIZE = 2 ** 16  # 65536 samples, 1.49 s at 44.1 kHz: with 1024 mel bins a 134 MB filterbank


@dataclass(frozen=True)
class SpectrogramParams:
    """riffusion-hobby's spectrogram settings; durations in ms, sizes in samples are derived."""

    sample_rate: int = 44100
    stereo: bool = False
    step_size_ms: int = 10
    window_duration_ms: int = 100
    padded_duration_ms: int = 400
    num_frequencies: int = 512  # mel bins = image rows
    min_frequency: int = 0
    max_frequency: int = 10000
    mel_scale_norm: str | None = None
    mel_scale_type: str = "htk"
    # Iterations of the hobby's gradient-descent inverse mel; this package inverts the mel scale with
    # a pseudo-inverse instead (measured: the same quality, 0.09 s against most of the hobby's 20 s per
    # 512x512 image), so it is kept for the record only.
    max_mel_iters: int = 200
    num_griffin_lim_iters: int = 32
    power_for_image: float = 0.25

    def __post_init__(self):
        for name, (low, high) in RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"spectrogram parameter {name} = {value!r} is outside [{low}, {high}]")
            if isinstance(getattr(type(self), name), int) and not isinstance(value, int):
                raise ValueError(f"spectrogram parameter {name} = {value!r} must be an integer")
        if not math.isfinite(self.power_for_image):
            raise ValueError(f"spectrogram parameter power_for_image = {self.power_for_image!r} is not finite")
        if self.min_frequency >= self.max_frequency or 2 * self.max_frequency > self.sample_rate:
            raise ValueError(f"spectrogram frequencies {self.min_frequency}..{self.max_frequency} Hz must rise and "
                             f"end at most at half the sample rate ({self.sample_rate} Hz)")
        if self.hop_length < 1 or self.win_length < 2 or self.n_fft < self.win_length or self.n_fft > MAX_FFT_SIZE:
            raise ValueError(f"spectrogram sizes at {self.sample_rate} Hz: hop {self.hop_length}, window "
                             f"{self.win_length}, FFT {self.n_fft}; need hop >= 1, window >= 2, "
                             f"window <= FFT <= {MAX_FFT_SIZE}")

    @property
    def num_channels(self) -> int:
        return 2 if self.stereo else 1

    @property
    def hop_length(self) -> int:
        return int(self.step_size_ms / 1000.0 * self.sample_rate)

    @property
    def win_length(self) -> int:
        return int(self.window_duration_ms / 1000.0 * self.sample_rate)

    @property
    def n_fft(self) -> int:
        return int(self.padded_duration_ms / 1000.0 * self.sample_rate)

    def to_exif(self) -> dict[int, Any]:
        """The EXIF entries for these params (the image's max value is added by the image encoder)."""
        return {
            ExifTag.SAMPLE_RATE: self.sample_rate,
            ExifTag.STEREO: self.stereo,
            ExifTag.STEP_SIZE_MS: self.step_size_ms,
            ExifTag.WINDOW_DURATION_MS: self.window_duration_ms,
            ExifTag.PADDED_DURATION_MS: self.padded_duration_ms,
            ExifTag.NUM_FREQUENCIES: self.num_frequencies,
            ExifTag.MIN_FREQUENCY: self.min_frequency,
            ExifTag.MAX_FREQUENCY: self.max_frequency,
            ExifTag.POWER_FOR_IMAGE: float(self.power_for_image),
        }

    @classmethod
    def from_exif(cls, exif: Mapping[int, Any]) -> SpectrogramParams:
        """Params from EXIF entries; fields the tags do not carry keep their defaults. ValueError names
        the first tag out of range."""
        fields = {field.name for field in dataclasses.fields(cls)}
        values = {}
        for tag in ExifTag:
            name = tag.name.lower()
            if name in fields and tag in exif:
                values[name] = _coerce(exif[tag], getattr(cls, name), tag)
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"EXIF: {error}") from None


def _coerce(value: Any, default: Any, tag: ExifTag) -> Any:
    """EXIF stores booleans as integers and may hand back rationals: restore the field's type."""
    try:
        number = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ValueError(f"EXIF tag {int(tag)} ({tag.name.lower()}) is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"EXIF tag {int(tag)} ({tag.name.lower()}) is not finite: {value!r}")
    if isinstance(default, bool):
        return bool(number)
    if isinstance(default, int):
        if number != int(number):
            raise ValueError(f"EXIF tag {int(tag)} ({tag.name.lower()}) must be an integer, got {value!r}")
        return int(number)
    return number
