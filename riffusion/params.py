"""Spectrogram parameters: riffusion-hobby's defaults and the EXIF tags that carry them in images."""

from __future__ import annotations

import dataclasses
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
        """Params from EXIF entries; fields the tags do not carry keep their defaults."""
        fields = {field.name for field in dataclasses.fields(cls)}
        values = {}
        for tag in ExifTag:
            name = tag.name.lower()
            if name in fields and tag in exif:
                values[name] = _coerce(exif[tag], getattr(cls, name))
        return cls(**values)


def _coerce(value: Any, default: Any) -> Any:
    """EXIF stores booleans as integers and may hand back rationals: restore the field's type."""
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int):
        return int(value)
    return float(value)
