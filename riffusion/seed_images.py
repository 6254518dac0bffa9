"""The seed image library riffusion-app draws from, made by our own code.

Seeds are spectrogram images of synthesized two-measure loops (93.75 BPM: 5.12 s is two bars of
4/4). Masks are greyscale images for interpolation, with riffusion-app's polarity: white repaints the
seed image, black keeps it, grey in between (the pipeline keeps 1 - grey of it at every step). Like
riffusion-app's own masks they are mostly white, the masked region a lighter or darker grey. Rows are
frequencies (the top is the highest). Riffusion's names, with our reading of them:
  mask_top_third_75 / _95       the top third at 75% / 95% white, the rest white
  mask_gradient_top_70          70% white at the top easing to white at half height
  mask_gradient_top_fifth_75    75% white at the top easing to white within the top fifth
  mask_gradient_dark            12.5% white at the top easing to white at half height
  mask_beat_lines_80            white with an 80% band at every beat over the top 40% (the drum hits'
                                high frequencies are partly kept)
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np
from PIL import Image

from riffusion import synth
from riffusion.audio import audio_to_image
from riffusion.image import save_image
from riffusion.params import SpectrogramParams

FOLDER = Path(str(files("riffusion") / "seed_images"))  # package data: shipped in the wheel
SIZE = 512
BEAT_COLUMNS = 64  # 0.64 s per beat at 93.75 BPM and 10 ms per column


def _motorway() -> np.ndarray:
    bass = synth.chord_progression(chords=((36, 48, 55, 60), (34, 46, 53, 58)), beats_per_chord=4)
    return synth.drum_loop(seed=2) * 0.7 + bass * 0.5


SEEDS = {
    "og_beat": lambda: synth.drum_loop(),
    "agile": lambda: synth.drum_loop(bpm=2 * synth.BPM, seed=1),
    "marim": lambda: synth.chord_progression(beats_per_chord=1),
    "motorway": _motorway,
    "vibes": lambda: synth.chord_progression(beats_per_chord=4) * 0.6 + synth.drum_loop(seed=3) * 0.3,
}


def _rows(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[:, None], SIZE, axis=1)


def _top(fraction: float, level: float) -> np.ndarray:
    column = np.ones(SIZE)
    column[: round(SIZE * fraction)] = level
    return _rows(column)


def _gradient(fraction: float, level: float) -> np.ndarray:
    """level at the top row, easing quadratically up to white at `fraction` of the height."""
    length = round(SIZE * fraction)
    column = np.ones(SIZE)
    column[:length] = level + (1.0 - level) * (np.arange(length) / length) ** 2
    return _rows(column)


def _beat_lines(level: float, width: int = 16, fraction: float = 0.4) -> np.ndarray:
    mask = np.ones((SIZE, SIZE))
    for start in range(0, SIZE, BEAT_COLUMNS):
        mask[: round(SIZE * fraction), start:start + width] = level
    return mask


MASKS = {
    "mask_beat_lines_80": lambda: _beat_lines(0.80),
    "mask_gradient_dark": lambda: _gradient(0.5, 0.125),
    "mask_gradient_top_70": lambda: _gradient(0.5, 0.70),
    "mask_gradient_top_fifth_75": lambda: _gradient(0.2, 0.75),
    "mask_top_third_75": lambda: _top(1 / 3, 0.75),
    "mask_top_third_95": lambda: _top(1 / 3, 0.95),
}


def seed_image_from_audio(audio: np.ndarray, sample_rate: int, params: SpectrogramParams = SpectrogramParams()) -> Image.Image:
    """A 512-column seed image from the start of the audio (padded with silence when shorter)."""
    seconds = SIZE * params.step_size_ms / 1000
    audio = np.asarray(audio, dtype=np.float32)
    audio = audio[None] if audio.ndim == 1 else audio
    wanted = int(round(seconds * sample_rate))
    audio = np.pad(audio[:, :wanted], ((0, 0), (0, max(0, wanted - audio.shape[1]))))
    image = audio_to_image(audio, sample_rate, params)
    cropped = image.crop((0, 0, SIZE, image.height))
    cropped.getexif().update(image.getexif())
    return cropped


def write_library(folder: Path = FOLDER) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in SEEDS.items():
        path = folder / f"{name}.png"
        save_image(seed_image_from_audio(make(), synth.SAMPLE_RATE), path)
        written.append(path)
    for name, make in MASKS.items():
        path = folder / f"{name}.png"
        Image.fromarray((make() * 255).round().astype(np.uint8), mode="L").save(path)
        written.append(path)
    return written


def seed_ids(folder: Path = FOLDER) -> list[str]:
    return sorted(path.stem for path in folder.glob("*.png") if not path.stem.startswith("mask_"))


def mask_ids(folder: Path = FOLDER) -> list[str]:
    return sorted(path.stem for path in folder.glob("mask_*.png"))


def load(image_id: str, folder: Path = FOLDER) -> Image.Image:
    """A library image by id. Only ids listed in the folder are accepted: never a path."""
    if image_id not in seed_ids(folder) + mask_ids(folder):
        raise KeyError(image_id)
    with Image.open(folder / f"{image_id}.png") as image:
        image.load()
        return image


def folder_for(checkpoint: str | Path, chosen: str | Path | None = None) -> Path:
    """The seed images a server uses: `chosen`, else the checkpoint's (a release's) seed_images/, else the
    built-in library. InputError when `chosen` holds none."""
    from riffusion.errors import InputError
    from riffusion.layout import SEED_FOLDER

    if chosen:
        if not seed_ids(Path(chosen)):
            raise InputError(f"{chosen}: no seed images (*.png) there")
        return Path(chosen)
    folder = Path(checkpoint) / SEED_FOLDER
    return folder if seed_ids(folder) else FOLDER
