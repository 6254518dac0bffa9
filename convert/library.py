"""torch diffusers repo -> ppdiffusers library, one tensor at a time, every tensor accounted for."""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from convert import configs
from convert.components import PARTS, PIPELINES, SCHEDULER_CONFIG, Part
from convert.errors import ConversionError
from convert.hashing import Hasher
from convert.ldm import SingleFileSource
from riffusion.files import (atomic_folder, check_apart, check_destination, copy_plain, is_present, model_root, plain_file,
                             read_json)
from convert.source import part_folder, resolve, weight_files
from convert.target import check_scale, expected_tensors
from convert.tensorfile import SourceTensor, TensorFile
from convert.writer import StreamingSafetensorsWriter

DTYPES = {"float32": torch.float32, "float16": torch.float16}
REPORT_NAME = "conversion_report.json"


@dataclass
class Move:
    source: SourceTensor
    target_name: str
    linear: bool  # a linear weight: [out, in] in torch, [in, out] in Paddle

    @property
    def transpose(self) -> bool:
        """Whether carrying the source into Paddle layout transposes it."""
        return self.linear and not self.source.paddle_layout


@dataclass
class PartPlan:
    name: str
    part: Part
    config: dict
    files: list[TensorFile]
    moves: list[Move] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def nbytes(self, dtype: torch.dtype) -> int:
        return sum(dtype.itemsize * _numel(m.source.shape) for m in self.moves)


def read_pipeline(folder: Path) -> tuple[str, dict[str, Part | None]]:
    """The pipeline class and, per part folder, its Paddle part (None where the repo leaves it out)."""
    index = read_json(folder / "model_index.json", model_root(folder))
    pipeline = index.get("_class_name")
    if not isinstance(pipeline, str) or pipeline not in PIPELINES:
        raise ConversionError(f"{folder / 'model_index.json'}: unknown model type {pipeline!r} (supported: {', '.join(PIPELINES)})")
    expected = PIPELINES[pipeline]
    parts: dict[str, Part | None] = {}
    for name in expected["required"] + expected["optional"]:
        entry = index.get(name)
        if entry is None or entry == [None, None]:
            if name in expected["required"]:
                raise ConversionError(f"{folder / 'model_index.json'}: required part {name!r} missing")
            if entry is not None:
                parts[name] = None
            continue
        parts[name] = _paddle_part(folder, name, entry)
    unknown = [key for key in index if not key.startswith("_") and key not in parts and key not in ("requires_safety_checker",)]
    if unknown:
        raise ConversionError(f"{folder / 'model_index.json'}: unknown part {unknown[0]!r} for {pipeline}")
    return pipeline, parts


def _paddle_part(folder: Path, name: str, entry) -> Part:
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(item, str) for item in entry)):
        raise ConversionError(f"{folder / 'model_index.json'}: entry {name!r} should be [library, class], got {entry!r:.80}")
    library, cls = entry
    if name == "scheduler" and library in ("diffusers", "ppdiffusers"):
        import ppdiffusers

        scheduler = getattr(ppdiffusers, cls, None)
        if isinstance(scheduler, type) and issubclass(scheduler, ppdiffusers.SchedulerMixin):
            return Part("ppdiffusers", cls, config_file=SCHEDULER_CONFIG)
        raise ConversionError(f"{folder / 'model_index.json'}: scheduler {library}.{cls} is not a scheduler class")
    part = PARTS.get((library, cls))
    if part is None:
        raise ConversionError(f"{folder / 'model_index.json'}: unknown model type {library}.{cls} for part {name!r}")
    return part


def folder_tensors(folder: Path, part: Part, root: Path | None = None) -> tuple[list[TensorFile], list[SourceTensor]]:
    """The weights of one part of a diffusers folder (files inside `root`, default the model folder)."""
    files = [TensorFile(path) for path in weight_files(folder, part.weights_family, root)]
    return files, [SourceTensor(file, name, name) for file in files for name in file.shapes]


def plan_part(name: str, part: Part, config_path: Path, files: list[TensorFile], tensors: list[SourceTensor],
              root: Path | None = None) -> PartPlan:
    """Map every source tensor of one part onto the Paddle model, or fail naming the tensor."""
    config = read_json(config_path, model_root(config_path.parent.parent) if root is None else root)
    check_scale(config, len(tensors), sum(_numel(tensor.shape) for tensor in tensors), str(config_path))
    expected = expected_tensors(part, config, str(config_path))
    plan = PartPlan(name, part, config, files)
    sources: dict[str, str] = {}
    for tensor in tensors:
        if any(re.search(pattern, tensor.name) for pattern in part.drops):
            plan.dropped.append(tensor.file_name)
            continue
        target_name = _rename(tensor.name, part.renames)
        target = expected.get(target_name)
        if target is None:
            raise ConversionError(f"{tensor.where}: unknown tensor, {part.paddle_class} has no {target_name!r}")
        if target_name in sources:
            raise ConversionError(f"{tensor.where}: maps to {target_name!r}, already given by {sources[target_name]!r}")
        dtype = tensor.file.dtypes[tensor.file_name]
        if not (dtype and dtype.is_floating_point):
            raise ConversionError(f"{tensor.where}: dtype {dtype} is not a floating point weight")
        linear = target.linear_weight and len(tensor.shape) == 2
        transpose = linear and not tensor.paddle_layout
        got = tuple(reversed(tensor.shape)) if transpose else tensor.shape
        if got != target.shape:
            raise ConversionError(
                f"{tensor.where}: shape {list(tensor.file.shapes[tensor.file_name])} disagrees with "
                f"{config_path.parent.name}/{config_path.name}, which gives {target_name} shape "
                f"{list(reversed(target.shape)) if transpose else list(target.shape)}"
            )
        sources[target_name] = tensor.file_name
        plan.moves.append(Move(tensor, target_name, linear))
    missing = [name for name in expected if name not in sources]
    if missing:
        raise ConversionError(f"{config_path.parent}: {len(missing)} tensor(s) missing from the weights, first {missing[0]!r}")
    return plan


def convert_library(src: str, out: Path, dtype: str = "float32", overwrite: bool = False, quiet: bool = False,
                    check=None, config: str | None = None, ema: bool = False) -> dict:
    """Convert `src` (diffusers folder, Hub id or single-file checkpoint) into a ppdiffusers library at
    `out`; returns the report. A single file takes its configs, tokenizer and scheduler from `config`
    (a diffusers or ppdiffusers folder or Hub id) or, without one, from the built-in SD v1 configs;
    `ema` picks its EMA UNet weights. `check(staging_folder, report)` runs before the output is moved
    into place (the parity run); it raises to abandon the output."""
    started = time.perf_counter()
    out = Path(out)
    check_destination(out.absolute(), overwrite)
    with contextlib.ExitStack() as stack:
        single = None
        if Path(src).is_file():
            single = SingleFileSource(TensorFile(Path(src)), ema)
            original = Path(src).with_suffix(".yaml")
            if config:
                folder = resolve(config)
            elif original.is_file():  # written beside it by convert.single_file, as WebUI tools keep it
                plain_file(original, Path(src).resolve().parent)
                folder = _configs_from_original(stack, original, single)
            else:
                folder = _builtin_configs(stack)
        elif config or ema:
            raise ConversionError("--config and --ema apply to single-file sources only")
        else:
            folder = resolve(src)
        check_apart(out, folder, *([single.file.path] if single else []))
        root = model_root(folder)
        pipeline, parts = read_pipeline(folder)
        if single is not None and "safety_checker" in parts:
            parts["safety_checker"] = None  # a single-file checkpoint carries no safety checker
        plans = []
        for name, part in parts.items():
            if part is None or not part.weights_family:
                continue
            config_path = folder / name / part.config_file
            if single is None:
                files, tensors = folder_tensors(part_folder(folder / name, root), part, root)
                plans.append(plan_part(name, part, config_path, files, tensors, root))
                continue
            part_config = read_json(config_path, root)
            check_scale(part_config, len(single.file.shapes), sum(map(_numel, single.file.shapes.values())),
                        str(config_path))
            try:
                plans.append(plan_part(name, part, config_path, [single.file], single.tensors(name, part_config), root))
            except ConversionError as error:
                if config:
                    raise
                raise ConversionError(f"{error}; the built-in SD v1 configs do not fit this checkpoint: pass --config "
                                      f"with the diffusers folder or Hub id it was made from") from None
        report = {
            "source": str(src),
            "source_folder": str(folder) if single is None else None,
            "config_folder": str(config) if config else (None if not single else f"{original.name} beside it"
                                                         if original.is_file() else "built-in SD v1"),
            "pipeline": pipeline,
            "dtype": dtype,
            "converter": f"riffusion-paddle convert (ppdiffusers {configs.PPDIFFUSERS_VERSION})",
            "parts": {},
        }
        if single is not None:
            report["single_file"] = {"ema": ema, "dropped": single.dropped()}
        _write_library(plans, folder, parts, out, overwrite, dtype, quiet, check, report)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


def _write_library(plans, folder, parts, out, overwrite, dtype, quiet, check, report) -> None:
    hasher = Hasher()  # sha256 of the sources for the report, on the other core while converting
    for plan in plans:
        for file in plan.files:
            hasher.submit(file.path)
    try:
        with atomic_folder(out, overwrite) as staging:
            _write_all(plans, folder, parts, staging, dtype, quiet, check, report, hasher)
    except BaseException:
        hasher.cancel()
        raise
    finally:
        hasher.close()


def _write_all(plans, folder, parts, staging, dtype, quiet, check, report, hasher: Hasher) -> None:
    target_dtype = DTYPES[dtype]
    total = sum(plan.nbytes(target_dtype) for plan in plans)
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=quiet) as progress:
        for plan in plans:
            report["parts"][plan.name] = _write_part(plan, staging, target_dtype, dtype, progress)
    for name, part in parts.items():
        if part is None or not part.weights_family:
            _copy_part(folder, staging, name, part)
    _write_json(staging / "model_index.json", _model_index(folder, parts))
    for plan in plans:
        for entry in report["parts"][plan.name]["files"]:
            entry["sha256"] = hasher.result(Path(entry["path"]))
        for file in plan.files:
            file.close()
    report["copied"] = [name for name, part in parts.items() if part is not None and not part.weights_family]
    if check is not None:
        check(staging, report)
    _write_json(staging / REPORT_NAME, report)


def _configs_from_original(stack: contextlib.ExitStack, original: Path, single: SingleFileSource) -> Path:
    """A config folder for a single file from its original LDM config (FILE.yaml): UNet, VAE and scheduler
    from the YAML, the CLIP text encoder's sizes from its tensors (the YAML names only its class)."""
    import yaml

    from convert.ldm import configs_from_original, text_config_from_shapes

    try:
        data = yaml.safe_load(original.read_text(encoding="utf-8"))
        unet, vae, scheduler = configs_from_original(data)
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise ConversionError(f"{original}: not an original Stable Diffusion config ({type(error).__name__}: {error}); "
                              f"pass --config with the diffusers folder or Hub id the checkpoint was made from") from None
    folder = _builtin_configs(stack)
    for name, changes in (("unet/config.json", unet), ("vae/config.json", vae),
                          ("scheduler/scheduler_config.json", scheduler),
                          ("text_encoder/config.json", text_config_from_shapes(single.file))):
        _write_json(folder / name, {**read_json(folder / name), **changes})
    return folder


def _builtin_configs(stack: contextlib.ExitStack) -> Path:
    from convert.builtin import write_configs

    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sd-v1-configs-")))
    write_configs(folder, "full", safety_checker=False)
    return folder


def _write_part(plan: PartPlan, staging: Path, target_dtype: torch.dtype, dtype_name: str, progress) -> dict:
    started = time.perf_counter()
    part_out = staging / plan.name
    part_out.mkdir()
    layout = [(m.target_name, _numpy_dtype(target_dtype), _target_shape(m)) for m in plan.moves]
    writer = StreamingSafetensorsWriter(part_out / plan.part.paddle_weights, layout, {"format": plan.part.weights_format})
    try:
        for move in plan.moves:
            tensor = move.source.file.read(move.source.file_name)
            if move.source.squeeze:
                tensor = tensor[:, :, 0, 0]
            if move.transpose:
                tensor = tensor.t().contiguous()  # torch's transpose copy is about 2x numpy's here
            tensor = tensor.to(target_dtype)
            writer.write(move.target_name, tensor.numpy())
            progress.update(tensor.numel() * tensor.element_size())
    except BaseException:
        writer.abort()
        raise
    writer.close()
    is_model = plan.part.paddle_library == "ppdiffusers"
    config = configs.diffusers_config(plan.config) if is_model else configs.transformers_config(plan.config, dtype_name)
    _write_json(part_out / plan.part.config_file, config)
    return {
        "files": [{"path": str(file.path), "bytes": file.path.stat().st_size} for file in plan.files],
        "output": f"{plan.name}/{plan.part.paddle_weights}",
        "tensors_in": sum(len(file.shapes) for file in plan.files),
        "mapped": len(plan.moves),
        "transposed": sum(m.transpose for m in plan.moves),
        "renamed": sum(m.source.file_name != m.target_name for m in plan.moves),
        "dropped": plan.dropped,
        "bytes_written": (part_out / plan.part.paddle_weights).stat().st_size,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _copy_part(folder: Path, staging: Path, name: str, part: Part | None) -> None:
    """A weightless part: its config rewritten and the files it needs copied; nothing else in its folder."""
    if part is None:
        return
    root = model_root(folder)
    source = part_folder(folder / name, root)
    config = read_json(source / part.config_file, root)
    (staging / name).mkdir()
    for file_name in part.files + tuple(n for n in part.optional_files if is_present(source / n)):
        copy_plain(source / file_name, root, staging / name / file_name)
    if name == "scheduler":
        config = configs.diffusers_config(config)
    elif part.paddle_class == "CLIPImageProcessor":
        config = configs.image_processor_config(config)
    elif part.paddle_class == "CLIPTokenizer":
        special_tokens = source / "special_tokens_map.json"
        if is_present(special_tokens):
            _write_json(staging / name / special_tokens.name, configs.special_tokens_map(read_json(special_tokens, root)))
    _write_json(staging / name / part.config_file, config)


def _model_index(folder: Path, parts: dict[str, Part | None]) -> dict:
    index = configs.diffusers_config(read_json(folder / "model_index.json", model_root(folder)))
    for name, part in parts.items():
        index[name] = [None, None] if part is None else [part.paddle_library, part.paddle_class]
    if parts.get("safety_checker", "absent") is None:
        index["requires_safety_checker"] = False
    return index


def _rename(name: str, renames) -> str:
    for pattern, replacement in renames:
        renamed, count = re.subn(pattern, replacement, name)
        if count:
            return renamed
    return name


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def _target_shape(move: Move) -> tuple[int, ...]:
    return tuple(reversed(move.source.shape)) if move.transpose else move.source.shape


def _numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
