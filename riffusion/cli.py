"""python -m riffusion COMMAND: spectrogram images <-> audio, text to audio, interpolation, seed images."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from riffusion.console import HelpFormatter, add_version, command, quiet_third_party
from riffusion.cpu_tuning import tune_cpu_runtime
from riffusion.errors import InputError
from riffusion.model_options import ModelOptions, add_model_options, finite


class CommandError(InputError):
    pass


def _read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise CommandError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as error:
        raise CommandError(f"{path}: not an image ({error})") from None


def _read_audio(path: Path, seconds: float | None = None):
    from soundfile import LibsndfileError

    from riffusion.audio import read_audio

    if not path.is_file():
        raise CommandError(f"{path}: no such file")
    try:
        return read_audio(path, seconds)
    except (LibsndfileError, RuntimeError) as error:
        raise CommandError(f"{path}: not a readable audio file ({error})") from None
    except ValueError as error:
        raise CommandError(f"{path}: {error}") from None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # the formats that carry the spectrogram's EXIF
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".aiff")  # soundfile writes each from its name alone


def _check_output(path: Path, suffixes) -> None:
    """Before any work: a file name of a kind the command writes, in a folder that exists and is writable."""
    if path.suffix.lower() not in suffixes:
        raise CommandError(f"{path}: the output must end in one of {', '.join(suffixes)}")
    folder = path.parent
    if not folder.is_dir():
        raise CommandError(f"{path}: no such folder {folder}")
    if path.is_dir():
        raise CommandError(f"{path}: is a folder")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CommandError(f"{path}: not writable")


def _check_audio_output(path: Path) -> None:
    _check_output(path, AUDIO_SUFFIXES)


def _write_together(writes: dict[Path, object]) -> None:
    """Write each file beside its destination, then rename them all into place: a failure leaves none."""
    staged = {}
    try:
        for path, write in writes.items():
            staging = path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix}")
            staged[staging] = path
            write(staging)
        for staging, path in staged.items():
            os.replace(staging, path)
    finally:
        for staging in staged:
            staging.unlink(missing_ok=True)


def _pipeline(args):
    return ModelOptions.from_args(args).load(progress=True)


def _save_image_and_audio(image: Image.Image, out: Path) -> None:
    """The audio and its image beside it as .png, both or neither."""
    from riffusion.audio import image_to_audio, write_audio
    from riffusion.image import save_image

    audio, sample_rate = image_to_audio(image)
    _write_together({out: lambda path: write_audio(path, audio, sample_rate, format=out.suffix[1:]),
                     out.with_suffix(".png"): lambda path: save_image(image, path, format="PNG")})
    print(f"wrote {out} ({audio.shape[-1] / sample_rate:.2f} s) and {out.with_suffix('.png')}")


def _save_image(image: Image.Image, out: Path) -> None:
    from riffusion.image import save_image

    _write_together({out: lambda path: save_image(image, path, format=Image.registered_extensions()[out.suffix.lower()])})


def audio_to_image(args) -> None:
    from riffusion.audio import audio_to_image as convert

    _check_output(args.output, IMAGE_SUFFIXES)
    audio, sample_rate = _read_audio(args.input)
    image = convert(audio, sample_rate)
    _save_image(image, args.output)
    print(f"wrote {args.output} ({image.width}x{image.height})")


def image_to_audio(args) -> None:
    from riffusion.audio import image_to_audio as convert
    from riffusion.audio import write_audio

    _check_audio_output(args.output)
    audio, sample_rate = convert(_read_image(args.input))
    _write_together({args.output: lambda path: write_audio(path, audio, sample_rate, format=args.output.suffix[1:])})
    print(f"wrote {args.output} ({audio.shape[-1] / sample_rate:.2f} s at {sample_rate} Hz)")


def text_to_audio(args) -> None:
    _check_audio_output(args.output)
    image = _pipeline(args).text_to_image(
        args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, num_inference_steps=args.steps,
        guidance=args.guidance, width=args.width)
    _save_image_and_audio(image, args.output)


def interpolate(args) -> None:
    from riffusion import seed_images
    from riffusion.pipeline import PromptInput

    def library_image(image_id: str) -> Image.Image:
        try:
            return seed_images.load(image_id)
        except KeyError:
            raise CommandError(f"unknown seed or mask image {image_id!r} (known: "
                               f"{', '.join(seed_images.seed_ids() + seed_images.mask_ids())})") from None

    _check_audio_output(args.output)
    init = _read_image(args.seed_image) if args.seed_image.suffix else library_image(str(args.seed_image))
    mask = None if args.mask is None else (_read_image(args.mask) if args.mask.suffix else library_image(str(args.mask)))
    start = PromptInput(args.start, args.start_seed, denoising=args.denoising, guidance=args.guidance)
    end = PromptInput(args.end, args.end_seed, denoising=args.denoising, guidance=args.guidance)
    pipeline = _pipeline(args)
    image = pipeline.interpolate(start, end, args.alpha, init, mask, args.steps)
    _save_image_and_audio(image, args.output)


def make_seed_image(args) -> None:
    from riffusion.seed_images import SIZE, seed_image_from_audio

    _check_output(args.output, IMAGE_SUFFIXES)
    audio, sample_rate = _read_audio(args.input, seconds=SIZE / 100 + 0.1)  # 5.12 s and a margin
    image = seed_image_from_audio(audio, sample_rate)
    _save_image(image, args.output)
    print(f"wrote {args.output} ({image.width}x{image.height}, the first 5.12 s)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _width(text: str) -> int:
    value = _positive_int(text)
    if value % 8 or value > MAX_WIDTH:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 up to {MAX_WIDTH}, got {value}")
    return value


PROMPT_HELP = ("weights as in riffusion-app: \"(caribbean:1.5) (jazz:0.3)\", (x) = 1.1, [x] = 1/1.1; "
               "up to 225 tokens (riffusion.prompts)")
MAX_WIDTH = 6000  # columns: 60 s, the longest spectrogram decoded to audio (riffusion.spectrogram.MAX_STFT_CELLS)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m riffusion", description=__doc__.split(": ", 1)[1])
    add_version(p)
    commands = p.add_subparsers(dest="command", required=True)

    c = commands.add_parser("audio-to-image", formatter_class=HelpFormatter, help="spectrogram image of an audio file")
    c.add_argument("input", type=Path)
    c.add_argument("output", type=Path)
    c.set_defaults(run=audio_to_image)

    c = commands.add_parser("image-to-audio", formatter_class=HelpFormatter, help="audio of a spectrogram image")
    c.add_argument("input", type=Path)
    c.add_argument("output", type=Path, help=", ".join(AUDIO_SUFFIXES))
    c.set_defaults(run=image_to_audio)

    c = commands.add_parser("text-to-audio", formatter_class=HelpFormatter, help="a prompt to a spectrogram image and its audio")
    c.add_argument("prompt", help=PROMPT_HELP)
    c.add_argument("output", type=Path, help="audio file; the image is written beside it as .png")
    add_model_options(c)
    c.add_argument("--negative-prompt", help="what the image should not hold")
    c.add_argument("--seed", type=int, default=0, help="random seed of the initial noise")
    c.add_argument("--steps", type=_positive_int, default=50, help="denoising steps")
    c.add_argument("--guidance", type=finite, default=7.0, help="classifier-free guidance scale")
    c.add_argument("--width", type=_width, default=512, help=f"multiple of 8 up to {MAX_WIDTH}; 512 is 5.12 s")
    c.set_defaults(run=text_to_audio)

    c = commands.add_parser("interpolate", formatter_class=HelpFormatter, help="between two prompts/seeds at --alpha, from a seed image")
    c.add_argument("start", help=PROMPT_HELP)
    c.add_argument("end")
    c.add_argument("output", type=Path, help="audio file; the image is written beside it as .png")
    add_model_options(c)
    c.add_argument("--alpha", type=_fraction, default=0.5, help="0 is the start prompt and seed, 1 the end")
    c.add_argument("--start-seed", type=int, default=0, help="noise seed of the start")
    c.add_argument("--end-seed", type=int, default=1, help="noise seed of the end")
    c.add_argument("--seed-image", type=Path, default=Path("og_beat"), help="a library id (og_beat, ...) or an image file")
    c.add_argument("--mask", type=Path, help="a library mask id or an image file")
    c.add_argument("--denoising", type=_fraction, default=0.75, help="how much of the seed image is repainted")
    c.add_argument("--guidance", type=finite, default=7.0, help="classifier-free guidance scale")
    c.add_argument("--steps", type=_positive_int, default=50, help="denoising steps")
    c.set_defaults(run=interpolate)

    c = commands.add_parser("make-seed-image", formatter_class=HelpFormatter, help="a 512x512 seed image from the first 5.12 s of an audio file")
    c.add_argument("input", type=Path)
    c.add_argument("output", type=Path)
    c.set_defaults(run=make_seed_image)
    return p


@command
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_third_party()
    tune_cpu_runtime()
    try:
        args.run(args)
    except ValueError as error:
        raise InputError(str(error)) from None
    except OSError as error:  # disk full, permissions changed while working
        raise InputError(f"{error.filename or ''}: {error.strerror or error}") from None
    return 0
