"""Find a source model: a local diffusers folder or a Hub repo id, and the weight files of each part."""

from __future__ import annotations

import re
from pathlib import Path

from convert.errors import ConversionError
from riffusion.files import is_present, model_root, plain_file, read_json

# Weight file names per naming family, most preferred first. An `.index.json` names shards.
WEIGHT_FILES = {
    "diffusers": (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.bin.index.json",
    ),
    "transformers": (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ),
}

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def hub_id_problem(text: str) -> str | None:
    """Why `text` is not a Hub model id ORG/NAME, by the Hub's own rules (huggingface_hub's validator:
    no '--' or '..', no leading or trailing '-' or '.', no '.git' ending, at most 96 characters); None if it is."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not HUB_ID.match(text):
        return "expected ORG/NAME"
    try:
        validate_repo_id(text)
    except HFValidationError as error:
        return re.sub(r":\s*'.*'\.?$", "", str(error).strip())
    return None


def resolve(src: str, revision: str | None = None) -> Path:
    """A local folder holding model_index.json, downloading `src` from the Hub if it is a repo id."""
    path = Path(src)
    if path.is_dir():
        if not is_present(path / "model_index.json"):
            raise ConversionError(f"{path}: no model_index.json, not a diffusers-format model folder")
        plain_file(path / "model_index.json", model_root(path))
        return path
    if path.exists():
        raise ConversionError(f"{path}: not a folder")
    if not HUB_ID.match(src):
        raise ConversionError(f"{src}: no such folder, and not a Hub repo id (owner/name)")
    problem = hub_id_problem(src)
    if problem:
        raise ConversionError(f"{src}: no such folder, and not a valid Hub repo id ({problem})")
    return _download(src, revision)


def part_folder(folder: Path, root: Path) -> Path:
    """A part's folder of a model, refused when it is missing or a link leading outside `root`."""
    if not folder.is_dir():
        raise ConversionError(f"{folder}: component folder missing")
    real = folder.resolve()
    if real != root and root not in real.parents:
        raise ConversionError(f"{folder}: leads outside {root} (to {real}); refusing to read it")
    return folder


def weight_files(folder: Path, family: str, root: Path | None = None) -> list[Path]:
    """The weight files of one part, in the most preferred format present; every one a regular file
    inside `root` (default: the model folder holding the part)."""
    root = model_root(folder.parent) if root is None else root
    part_folder(folder, root)
    for name in WEIGHT_FILES[family]:
        candidate = folder / name
        if not is_present(candidate):
            continue
        plain_file(candidate, root)
        if name.endswith(".index.json"):
            weight_map = read_json(candidate, root).get("weight_map", {})
            if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
                raise ConversionError(f"{candidate}: weight_map should map tensor names to file names")
            shards = sorted(set(weight_map.values()))
            if not shards:
                raise ConversionError(f"{candidate}: empty weight_map")
            missing = [shard for shard in shards if not is_present(folder / shard)]
            if missing:
                raise ConversionError(f"{candidate}: shard {missing[0]} missing")
            return [plain_file(folder / shard, root) for shard in shards]
        return [candidate]
    raise ConversionError(f"{folder}: no weight file (looked for {', '.join(WEIGHT_FILES[family])})")


def _download(repo_id: str, revision: str | None) -> Path:
    """Fetch only what conversion and the release read: JSON/tokenizer files, one weight format per part
    and the seed images. With HF_HUB_OFFLINE=1 this resolves from the local Hugging Face cache."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import constants as hub_constants
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError
    from requests.exceptions import ConnectionError, Timeout

    # seed_images/: riffusion-app's seed images and masks, which the original repo ships for the release
    patterns = ["model_index.json", "*/*.json", "*/*.txt", "seed_images/*.png", "*/*-of-*.safetensors", "*/*-of-*.bin"]
    every_format = [f"*/{name}" for names in WEIGHT_FILES.values() for name in names]
    try:
        if hub_constants.HF_HUB_OFFLINE:
            patterns += every_format
        else:
            patterns += _preferred_weights(HfApi().list_repo_files(repo_id, revision=revision))
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except LocalEntryNotFoundError:
        raise ConversionError(f"{repo_id}: not in the local Hugging Face cache and the Hub is not reachable") from None
    except HfHubHTTPError as error:
        raise ConversionError(f"{repo_id}: Hub download failed: {str(error).splitlines()[0]}") from None
    except (ConnectionError, Timeout) as error:
        try:
            snapshot_download(repo_id, revision=revision, allow_patterns=patterns + every_format, local_files_only=True)
            hint = "it is in the local Hugging Face cache: run again with HF_HUB_OFFLINE=1 to convert from there"
        except LocalEntryNotFoundError:
            hint = "and it is not in the local Hugging Face cache"
        raise ConversionError(f"{repo_id}: {hub_unreachable(error)}; {hint}") from None
    return resolve(folder)


def hub_unreachable(error: Exception) -> str:
    """One line for a failed connection: the host and the system's reason, not urllib3's nested repr."""
    from huggingface_hub import constants as hub_constants

    reason = re.search(r"\[Errno [^\]]+\] [^'\")\]]+", str(error))
    return f"cannot reach the Hub at {hub_constants.ENDPOINT} ({reason.group(0) if reason else type(error).__name__})"


def _preferred_weights(repo_files: list[str]) -> list[str]:
    chosen = []
    folders = {name.split("/")[0] for name in repo_files if name.count("/") == 1}
    for folder in sorted(folders):
        for names in WEIGHT_FILES.values():
            present = [name for name in names if f"{folder}/{name}" in repo_files]
            if present:
                chosen.append(f"{folder}/{present[0]}")
                break
    return chosen
