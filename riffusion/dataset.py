"""python -m riffusion.dataset: a folder of captioned audio -> a spectrogram image dataset for training.

Every audio file under --audio (wav, flac, ogg, mp3; read by soundfile) is mixed to mono, resampled to
44.1 kHz and cut into clips of --clip-seconds (5.12 s: a 512-column image) every --hop-seconds. Each clip
becomes a spectrogram image made by the same code as `python -m riffusion audio-to-image` (the last
column, centred on the clip's end and half padding, is dropped so 5.12 s gives 512 columns). The
output is a Hugging Face `imagefolder` dataset: images under `images/` and `metadata.jsonl` with
`file_name` and `text` (plus `source` and `start_s`), which `datasets.load_dataset("imagefolder",
data_dir=OUT)` reads; `summary.json` holds the counts printed at the end.

Captions: a `.txt` beside the audio file with the same stem wins; else a `metadata.jsonl` or
`metadata.csv` in --audio with `file_name` (relative to --audio) and `text`. A trailing partial clip
is zero-padded to full length when it holds at least --min-tail-seconds of audio, else dropped (and
counted). Clips quieter than --silence-db (RMS, dB full scale) are skipped and counted. Unreadable,
empty, uncaptioned or linked files are named in the summary and skipped; no clip at all is an error
(exit 1), and a failed run leaves nothing at --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from riffusion.errors import InputError
from riffusion.files import atomic_folder
from riffusion.params import SpectrogramParams
from riffusion.console import HelpFormatter, add_version, command, quiet_third_party

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
IMAGES_FOLDER = "images"
SUMMARY_FILE = "summary.json"


@dataclass
class Summary:
    files: int = 0
    clips: int = 0
    seconds: float = 0.0
    silent_clips: int = 0
    dropped_tails: int = 0
    padded_tails: int = 0
    skipped_files: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        lines = [f"{self.files} files, {self.clips} clips ({self.seconds:.2f} s of audio); "
                 f"skipped: {self.silent_clips} near-silent clips, {self.dropped_tails} short tails "
                 f"({self.padded_tails} tails padded), {len(self.skipped_files)} files"]
        lines += [f"  skipped {name}: {why}" for name, why in sorted(self.skipped_files.items())]
        return lines


@dataclass(frozen=True)
class Slicing:
    clip_seconds: float = 5.12
    hop_seconds: float | None = None  # default: clip_seconds (no overlap)
    min_tail_seconds: float | None = None  # default: half a clip
    silence_db: float = -60.0

    def check(self) -> None:
        for name in ("clip_seconds", "hop_seconds", "min_tail_seconds", "silence_db"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise InputError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if not 0.1 <= self.clip_seconds <= 60:
            raise InputError(f"--clip-seconds must be between 0.1 and 60, got {self.clip_seconds}")
        if self.hop_seconds is not None and not 0.01 <= self.hop_seconds <= 60:
            raise InputError(f"--hop-seconds must be between 0.01 and 60, got {self.hop_seconds}")
        if self.min_tail_seconds is not None and not 0 < self.min_tail_seconds <= self.clip_seconds:
            raise InputError(f"--min-tail-seconds must be in (0, --clip-seconds], got {self.min_tail_seconds}")


def read_captions(audio_dir: Path, summary: Summary) -> dict[str, str]:
    """file_name (relative to audio_dir, '/'-separated) -> caption, from metadata.jsonl / metadata.csv."""
    captions: dict[str, str] = {}
    for name in METADATA_NAMES:
        path = audio_dir / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            summary.skipped_files[name] = "not UTF-8 text"
            continue
        try:
            rows = ([json.loads(line) for line in text.splitlines() if line.strip()] if name.endswith(".jsonl")
                    else list(csv.DictReader(text.splitlines())))
        except (json.JSONDecodeError, csv.Error) as error:
            summary.skipped_files[name] = f"not valid {path.suffix[1:]} ({error})"
            continue
        for row in rows:
            if isinstance(row, dict) and isinstance(row.get("file_name"), str) and isinstance(row.get("text"), str):
                captions.setdefault(row["file_name"].replace("\\", "/"), row["text"])
    return captions


def caption_for(path: Path, relative: str, captions: dict[str, str]) -> str:
    """The file's caption; raises InputError with the reason when it has none."""
    text_file = path.with_suffix(".txt")
    if text_file.is_file():
        try:
            caption = text_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"caption {text_file.name} is not UTF-8 text") from None
    else:
        caption = captions.get(relative, "")
    caption = " ".join(caption.split())
    if not caption:
        raise InputError("no caption (a same-name .txt, or a metadata.jsonl / metadata.csv row)")
    return caption


def audio_files(audio_dir: Path, summary: Summary) -> list[Path]:
    """Audio files under audio_dir, sorted; links (to files or folders) are skipped: they may point anywhere."""
    found = []
    for root, folders, names in os.walk(audio_dir):
        root = Path(root)
        for name in folders + names:
            path = root / name
            if path.is_symlink() and (name in folders or path.suffix.lower() in AUDIO_SUFFIXES):
                summary.skipped_files[path.relative_to(audio_dir).as_posix()] = "a symbolic link"
            elif name in names and path.suffix.lower() in AUDIO_SUFFIXES and path.is_file():
                found.append(path)
    return sorted(found)


def read_mono(path: Path, params: SpectrogramParams) -> np.ndarray:
    """Mono float32 samples at params.sample_rate; InputError naming what is wrong with the file."""
    import soundfile

    from riffusion.audio import conform, read_audio

    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)")
    try:
        audio, sample_rate = read_audio(path)
    except (soundfile.LibsndfileError, RuntimeError, ValueError) as error:
        raise InputError(f"not a readable audio file ({error})") from None
    if audio.size == 0:
        raise InputError("holds no samples")
    if not np.isfinite(audio).all():
        raise InputError("holds NaN or infinite samples")
    return conform(audio, sample_rate, params)[0]


def clips_of(samples: np.ndarray, slicing: Slicing, sample_rate: int, summary: Summary):
    """(start sample, clip) pairs; the tail is padded or dropped as documented, silent clips skipped."""
    length = round(slicing.clip_seconds * sample_rate)
    hop = round((slicing.hop_seconds or slicing.clip_seconds) * sample_rate)
    min_tail = round((slicing.min_tail_seconds or slicing.clip_seconds / 2) * sample_rate)
    start = 0
    while start < len(samples):
        clip = samples[start:start + length]
        if len(clip) < length:
            if len(clip) < min_tail:
                summary.dropped_tails += 1
                break
            clip = np.pad(clip, (0, length - len(clip)))
            summary.padded_tails += 1
        rms = float(np.sqrt(np.mean(np.square(clip, dtype=np.float64))))
        if rms <= 10 ** (slicing.silence_db / 20):
            summary.silent_clips += 1
        else:
            yield start, clip
        if start + length >= len(samples):
            break
        start += hop


def image_of(clip: np.ndarray, params: SpectrogramParams):
    """The clip's spectrogram image as audio-to-image makes it, cut to clip length / step columns."""
    from riffusion.audio import audio_to_image

    image = audio_to_image(clip[None], params.sample_rate, params)
    width = round(len(clip) / params.hop_length)
    return image.crop((0, 0, width, image.height)) if width < image.width else image


def build(audio_dir: Path, out: Path, slicing: Slicing = Slicing(), overwrite: bool = False,
          quiet: bool = False) -> Summary:
    """Write the dataset at `out` (atomically) and return its summary; InputError when nothing is usable."""
    from tqdm import tqdm

    from riffusion.image import save_image

    slicing.check()
    audio_dir = Path(audio_dir)
    if not audio_dir.is_dir():
        raise InputError(f"{audio_dir}: no such folder")
    params = SpectrogramParams()
    summary = Summary()
    captions = read_captions(audio_dir, summary)
    files = audio_files(audio_dir, summary)
    with atomic_folder(out, overwrite) as staging:
        (staging / IMAGES_FOLDER).mkdir()
        rows = []
        for path in tqdm(files, desc="audio files", unit="file", disable=quiet):
            relative = path.relative_to(audio_dir).as_posix()
            try:
                caption = caption_for(path, relative, captions)
                samples = read_mono(path, params)
            except InputError as error:
                summary.skipped_files[relative] = str(error)
                continue
            summary.files += 1
            stem = relative.replace("/", "__")
            for index, (start, clip) in enumerate(clips_of(samples, slicing, params.sample_rate, summary)):
                name = f"{IMAGES_FOLDER}/{stem}.{index:04d}.png"
                save_image(image_of(clip, params), staging / name)
                rows.append({"file_name": name, "text": caption, "source": relative,
                             "start_s": round(start / params.sample_rate, 4)})
                summary.clips += 1
                summary.seconds += min(len(clip), len(samples) - start) / params.sample_rate
        if not rows:
            raise InputError(f"{audio_dir}: no clips made; " + "; ".join(summary.lines()))
        with open(staging / "metadata.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        record = {**summary.__dict__, "seconds": round(summary.seconds, 3), "slicing": slicing.__dict__}
        (staging / SUMMARY_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


def read_rows(dataset: Path) -> list[dict]:
    """metadata.jsonl of a dataset made by build(): [{"file_name", "text", ...}], each image present."""
    dataset = Path(dataset)
    path = dataset / "metadata.jsonl"
    if not path.is_file():
        raise InputError(f"{dataset}: not a dataset (no metadata.jsonl); make one with python -m riffusion.dataset")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path}:{number}: not valid JSON") from None
        if not (isinstance(row, dict) and isinstance(row.get("file_name"), str) and isinstance(row.get("text"), str)):
            raise InputError(f"{path}:{number}: needs string file_name and text")
        image = (dataset / row["file_name"]).resolve()
        if dataset.resolve() not in image.parents or not image.is_file():
            raise InputError(f"{path}:{number}: {row['file_name']} is not an image inside the dataset")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m riffusion.dataset",
                                description="captioned audio files -> spectrogram image dataset (imagefolder)",
                                formatter_class=HelpFormatter)
    add_version(p)
    p.add_argument("--audio", type=Path, required=True, help="folder of audio files and captions")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    p.add_argument("--clip-seconds", type=float, default=5.12, help="clip length (5.12 s = 512 columns)")
    p.add_argument("--hop-seconds", type=float, help="start of one clip to the next (default: --clip-seconds)")
    p.add_argument("--min-tail-seconds", type=float,
                   help="a trailing partial clip at least this long is zero-padded, a shorter one dropped "
                        "(default: half a clip)")
    p.add_argument("--silence-db", type=float, default=-60.0, help="skip clips whose RMS is at or below this (dBFS)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@command
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_third_party()
    slicing = Slicing(args.clip_seconds, args.hop_seconds, args.min_tail_seconds, args.silence_db)
    summary = build(args.audio, args.out, slicing, overwrite=args.overwrite, quiet=args.quiet)
    print("\n".join(summary.lines()))
    print(f"wrote {args.out} ({summary.clips} images and metadata.jsonl)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
