"""The seed image library is ours, reproducible, complete, and safe to look up by id."""

import numpy as np
import pytest
from PIL import Image

from riffusion import seed_images
from riffusion.image import params_from_image, spectrogram_from_image

SEEDS = ["agile", "marim", "motorway", "og_beat", "vibes"]
MASKS = ["mask_beat_lines_80", "mask_gradient_dark", "mask_gradient_top_70", "mask_gradient_top_fifth_75",
         "mask_top_third_75", "mask_top_third_95"]


def test_library_is_complete_and_regenerates_pixel_for_pixel(tmp_path):
    """Same pixels and parameters. Not byte for byte: the EXIF max value comes out of float32 STFT and mel
    sums, whose last digit depends on the CPU's vector instructions (22188784 on one machine, 22188782 on
    another)."""
    assert seed_images.seed_ids() == SEEDS and seed_images.mask_ids() == MASKS
    seed_images.write_library(tmp_path)
    for name in SEEDS + MASKS:
        made, shipped = Image.open(tmp_path / f"{name}.png"), Image.open(seed_images.FOLDER / f"{name}.png")
        assert made.mode == shipped.mode and np.array_equal(np.asarray(made), np.asarray(shipped)), name
        made_exif, shipped_exif = dict(made.getexif()), dict(shipped.getexif())
        assert made_exif.keys() == shipped_exif.keys(), name
        for tag, value in shipped_exif.items():
            assert made_exif[tag] == pytest.approx(value, rel=1e-6), (name, tag)


def test_seeds_are_512_square_spectrograms_with_params_and_masks_are_greyscale():
    for name in SEEDS:
        image = seed_images.load(name)
        assert image.size == (512, 512) and image.mode == "RGB"
        assert params_from_image(image) is not None
    for name in MASKS:
        assert seed_images.load(name).mode == "L"


@pytest.mark.parametrize("name", MASKS)
def test_masks_have_riffusion_apps_polarity(name):
    """riffusion-app's masks are mostly white (white repaints) with the masked region a darker grey; ours
    were once inverted (black where theirs are white), so the app's mask kept what Riffusion repaints."""
    mask = np.asarray(seed_images.load(name), dtype=float) / 255
    assert mask.mean() > 0.7 and mask.max() == 1.0 and mask.min() < 0.96, (mask.mean(), mask.min())
    assert mask[-100:].min() == 1.0  # the low frequencies (bottom rows) are repainted in every one


def test_mask_levels_follow_their_names():
    """mask_top_third_75: bottom rows 1.00, top third 0.75, as in riffusion-app's file."""
    top_third = np.asarray(seed_images.load("mask_top_third_75"), dtype=float) / 255
    assert abs(top_third[:170].mean() - 0.75) < 0.002 and top_third[171:].min() == 1.0
    assert abs(np.asarray(seed_images.load("mask_top_third_95"), dtype=float)[:170].mean() / 255 - 0.95) < 0.002
    dark = np.asarray(seed_images.load("mask_gradient_dark"), dtype=float)[:, 0] / 255
    assert abs(dark[0] - 0.125) < 0.004 and np.all(np.diff(dark) >= 0) and dark[256:].min() == 1.0


def test_og_beat_kicks_land_every_two_beats():
    image = seed_images.load("og_beat")
    spectrogram = spectrogram_from_image(image, params_from_image(image))
    low = spectrogram[0, :20].sum(axis=0)  # bin 0 is the lowest mel bin: the kick's energy
    peaks = [int(np.argmax(low[start:start + 100])) + start for start in (0, 128, 256, 384)]
    assert peaks[0] < 10, peaks  # the kick peaks a few 10 ms columns after its onset
    assert all(abs(b - a - 128) <= 2 for a, b in zip(peaks, peaks[1:])), peaks  # 2 beats = 1.28 s


@pytest.mark.parametrize("bad", ["../server", "/etc/passwd", "og_beat.png", "", "OG_BEAT"])
def test_lookup_accepts_library_ids_only(bad):
    with pytest.raises(KeyError):
        seed_images.load(bad)
