"""Mel spectrogram <-> PIL image, pixel for pixel as riffusion-hobby's image_util.

pixel = 255 - (value / max_value) ** power_for_image * 255, truncated to uint8: loud is dark. Rows
are flipped so that low frequencies sit at the bottom. Mono fills R, G and B; stereo puts its two
channels in G and B (R is 0). The params and the max value travel as EXIF tags.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from riffusion.params import ExifTag, SpectrogramParams

# What riffusion-hobby assumes for images that carry no max value (the model's own outputs).
DEFAULT_MAX_VALUE = 30e6
# Far above any real one (full-scale 16-bit audio stays below 1e10) and far below float32's overflow.
MAX_MAX_VALUE = 1e15


def image_from_spectrogram(spectrogram: np.ndarray, params: SpectrogramParams) -> Image.Image:
    """Image (width = frames, height = num_frequencies) of a [channels, num_frequencies, frames] spectrogram."""
    channels = spectrogram.shape[0]
    if channels not in (1, 2):
        raise ValueError(f"expected 1 or 2 channels, got {channels}")
    max_value = float(np.max(spectrogram))
    scaled = (spectrogram / (max_value if max_value > 0 else 1.0)) ** params.power_for_image * 255
    pixels = (255 - scaled).astype(np.uint8)[:, ::-1]
    if channels == 1:
        image = Image.fromarray(np.ascontiguousarray(pixels[0])).convert("RGB")
    else:
        rgb = np.stack([np.zeros_like(pixels[0]), pixels[0], pixels[1]], axis=-1)
        image = Image.fromarray(rgb)
    exif = image.getexif()
    exif.update(params.to_exif())
    exif[ExifTag.MAX_VALUE] = max_value
    return image


def save_image(image: Image.Image, file, format: str | None = None) -> None:
    """Save with its EXIF tags: Pillow writes EXIF to PNG and JPEG only when handed it."""
    image.save(file, format=format, exif=image.getexif())


def params_from_image(image: Image.Image) -> SpectrogramParams | None:
    """The params an image's EXIF tags carry, or None when it carries none."""
    exif = image.getexif()
    if not any(tag in exif for tag in ExifTag if tag != ExifTag.MAX_VALUE):
        return None
    return SpectrogramParams.from_exif(exif)


def spectrogram_from_image(image: Image.Image, params: SpectrogramParams, max_value: float | None = None) -> np.ndarray:
    """Spectrogram [channels, height, width] (float32) of an RGB or L image.

    max_value: the image's EXIF max value when it has one, else DEFAULT_MAX_VALUE.
    """
    if image.height != params.num_frequencies:
        raise ValueError(f"image is {image.height} rows high, params expect {params.num_frequencies}")
    if max_value is None:
        max_value = image.getexif().get(ExifTag.MAX_VALUE, DEFAULT_MAX_VALUE)
    try:
        max_value = float(max_value)
    except (TypeError, ValueError, ZeroDivisionError):
        max_value = float("nan")
    if not 0 < max_value <= MAX_MAX_VALUE:
        raise ValueError(f"EXIF tag {int(ExifTag.MAX_VALUE)} (max_value) = {max_value} is outside (0, {MAX_MAX_VALUE:g}]")
    rgb = np.asarray(image.convert("RGB"))[::-1]
    pixels = rgb[..., [1, 2]] if params.stereo else rgb[..., :1]
    scaled = (255 - pixels.transpose(2, 0, 1).astype(np.float32)) / 255
    return scaled ** np.float32(1 / params.power_for_image) * np.float32(max_value)
