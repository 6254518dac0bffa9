"""A converted ppdiffusers library -> static programs (and ONNX) per component, each validated.

For each component: compute the dynamic model's outputs on example inputs at two sizes, trace the
export wrapper (export/patches.py) with `paddle.jit.to_static(full_graph=True)` and dynamic batch /
height / width / sequence, `paddle.jit.save` it, then run the saved program in Paddle Inference
with oneDNN (the CPU runtime users get) and, with `onnx=True`, the paddle2onnx model in onnxruntime,
and compare with the dynamic outputs. Any error above the component's tolerance aborts the export,
naming the component, runtime, size and error. Output goes to a staging folder beside `out`,
renamed into place at the end.
"""

from __future__ import annotations

import ctypes
import gc
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from riffusion.files import atomic_folder, check_apart, check_destination, read_json
from export import precision as precisions
from export import fidelity, runtime
from export.errors import ExportError
from export.specs import COMPONENTS, LATENT_FACTOR, SPECS, VALIDATION_SIZES, ComponentSpec

REPORT_NAME = runtime.REPORT_NAME
PADDLE_WEIGHTS = {
    "unet": ("diffusion_paddle_model.safetensors", "model_state.pdparams"),
    "vae": ("diffusion_paddle_model.safetensors", "model_state.pdparams"),
    "text_encoder": ("model.safetensors", "model_state.pdparams"),
}
TORCH_WEIGHTS = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors", "pytorch_model.bin")
LIBRARY_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}


def check_library(library: Path, components: tuple[str, ...]) -> dict[str, dict]:
    """The config of each library folder the components need, or ExportError saying what is wrong."""
    library = Path(library)
    if not library.is_dir():
        raise ExportError(f"{library}: no such folder")
    index_path = library / "model_index.json"
    if not index_path.is_file():
        raise ExportError(f"{library}: no model_index.json, not a converted library (make one with python -m convert)")
    index = read_json(index_path)
    configs = {}
    for folder in dict.fromkeys(SPECS[name].folder for name in components):
        entry = index.get(folder)
        if not entry or entry == [None, None]:
            raise ExportError(f"{index_path}: the library has no {folder}")
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] == LIBRARY_CLASSES[folder]):
            raise ExportError(f"{index_path}: {folder} is {entry!r}, expected a {LIBRARY_CLASSES[folder]}")
        part = library / folder
        has_paddle = any((part / name).is_file() for name in PADDLE_WEIGHTS[folder])
        has_torch = any((part / name).is_file() for name in TORCH_WEIGHTS)
        if entry[0] in ("diffusers", "transformers") or (has_torch and not has_paddle):
            raise ExportError(f"{library}: a torch diffusers repo, not a converted library "
                              f"(convert it first: python -m convert --src {library} --out LIBRARY)")
        if not part.is_dir():
            raise ExportError(f"{part}: missing (model_index.json lists a {LIBRARY_CLASSES[folder]} there)")
        if not has_paddle:
            raise ExportError(f"{part}: missing its weights ({PADDLE_WEIGHTS[folder][0]})")
        configs[folder] = read_json(library / folder / "config.json")
    return configs


def parse_components(text: str | None) -> tuple[str, ...]:
    if not text:
        return COMPONENTS
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in SPECS]
    if unknown or not names:
        raise ExportError(f"--components: unknown component {unknown[0] if unknown else text!r} "
                          f"(choose from {','.join(COMPONENTS)})")
    return names


def validation_sizes(height: int | None, width: int | None) -> tuple[tuple[int, int, int], ...]:
    """(batch, height, width) image sizes to validate at; --height/--width replace the first one."""
    if height is None and width is None:
        return VALIDATION_SIZES
    height = height or width
    width = width or height
    for flag, value in (("--height", height), ("--width", width)):
        if value <= 0 or value % LATENT_FACTOR:
            raise ExportError(f"{flag} {value}: unsupported image size, must be a positive multiple of {LATENT_FACTOR} "
                              f"(the VAE's downscale factor)")
    return ((VALIDATION_SIZES[0][0], height, width),) + VALIDATION_SIZES[1:]


def export_library(library: str | Path, out: str | Path, components: tuple[str, ...] = COMPONENTS, onnx: bool = False,
                   height: int | None = None, width: int | None = None, overwrite: bool = False, quiet: bool = False,
                   threads: int | None = None, precision: tuple[str, ...] = ("fp32",),
                   fidelity_steps: int = 50) -> dict:
    """Export `components` of the converted library into `out`; returns the report (also written to
    out/export_report.json). Raises ExportError on bad input or a failed validation, leaving no `out`.

    `precision`: fp32 and any of bf16 (Paddle Inference, oneDNN bfloat16; refused on CPUs without
    AVX512-BF16/AMX) and int8 (onnxruntime, quantized UNet; implies `onnx`). When the export holds more
    than one variant, each runs one `fidelity_steps`-step interpolation from the same seeds: its timing
    goes into the report's `variants` (the runtime runs the fastest by default) with, for bf16 and int8,
    the image PSNR and audio spectral convergence against fp32. A variant below its PSNR bar is
    recorded with the reason and not kept (int8's files are removed)."""
    started = time.perf_counter()
    library, out = Path(library), Path(out)
    unknown = [name for name in components if name not in SPECS]
    if unknown:
        raise ExportError(f"unknown component {unknown[0]!r} (choose from {','.join(COMPONENTS)})")
    precision = precisions.parse_precisions(",".join(precision))
    for name in precision:
        precisions.require(name)
    if "int8" in precision:
        if "unet" not in components:
            raise ExportError("--precision int8 quantizes the UNet: add unet to --components")
        onnx = True
    if not isinstance(fidelity_steps, int) or not 1 <= fidelity_steps <= 1000:
        raise ExportError(f"--fidelity-steps {fidelity_steps}: must be an integer from 1 to 1000")
    sizes = validation_sizes(height, width)
    configs = check_library(library, components)
    check_destination(out.absolute(), overwrite)
    check_apart(out, library)

    import paddle

    _quiet_libraries()
    report = {
        "library": str(library),
        "components": {},
        "validation_sizes": [list(size) for size in sizes],
        "precisions": list(precision),
        "versions": _versions(onnx),
    }
    runtime.use_all_cores(threads)  # the dynamic reference runs
    with atomic_folder(out, overwrite) as staging:
        with paddle.no_grad():
            for folder in dict.fromkeys(SPECS[name].folder for name in components):
                model = _load(library, folder)
                traced = []
                for name in [name for name in components if SPECS[name].folder == folder]:
                    _progress(quiet, f"{name}: tracing")
                    traced.append(_trace(SPECS[name], model, configs[folder], staging / name, sizes, onnx, quiet))
                del model  # validation runs without the dynamic model in memory
                _release_memory()
                for spec, entry, examples, references in traced:
                    _validate(spec, staging / spec.name, entry, sizes, examples, references, onnx, quiet, threads)
                    if "bf16" in precision:
                        _validate_precision(spec, staging / spec.name, entry, "static", "bf16", examples, references,
                                            quiet, threads)
                    report["components"][spec.name] = entry
            _release_memory()
            variants = [pair for pair in precisions.VARIANTS if pair[1] in precision and (pair[0] == "static" or onnx)]
            if len(variants) > 1:
                report["variants"] = _variants(library, staging, components, variants, report["components"],
                                               fidelity_steps, quiet, threads)
                report["fidelity"] = {"steps": fidelity_steps, "alpha": fidelity.ALPHA, "seed_image": fidelity.SEED_IMAGE,
                                      "start": fidelity.START, "end": fidelity.END, "reference": "static-fp32"}
        report["seconds"] = round(time.perf_counter() - started, 3)
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _trace(spec: ComponentSpec, model, config: dict, folder: Path, sizes, onnx: bool, quiet: bool):
    """Save the static program (and ONNX) of one component; return its report entry and the dynamic
    model's outputs on the validation examples."""
    import paddle
    from paddle.static import InputSpec

    from export.patches import export_patches

    started = time.perf_counter()
    folder.mkdir()
    examples = [spec.example(config, *size, seed=i) for i, size in enumerate(sizes)]
    references = [_reference(spec.name, model, example) for example in examples]

    input_spec = [InputSpec(item.shape(config), item.dtype, item.name) for item in spec.inputs]
    with export_patches(model):
        wrapper = _wrapper(spec.name, model)
        wrapper.eval()
        static = paddle.jit.to_static(wrapper, input_spec=input_spec, full_graph=True)
        paddle.jit.save(static, str(folder / "inference"))
        weights = {param.name: param for param in wrapper.parameters()}
        weights.update({buffer.name: buffer for buffer in wrapper.buffers()})
        del static
    entry = {
        "inputs": [{"name": item.name, "dtype": item.dtype, "shape": item.shape(config),
                    "dynamic_axes": item.dynamic_axes()} for item in spec.inputs],
        "outputs": list(spec.outputs),
        "tolerance": spec.tolerance,
        "files": [runtime.STATIC_PROGRAM, runtime.STATIC_PARAMS],
        "trace_seconds": round(time.perf_counter() - started, 3),  # with the dynamic reference runs
        "validation": [],
    }
    # the config as the loaded model sees it, defaults filled in: pipelines read keys the file may omit
    full_config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    (folder / runtime.CONFIG_NAME).write_text(json.dumps(full_config, indent=2, sort_keys=True, default=_jsonable) + "\n",
                                              encoding="utf-8")

    if onnx:
        from export.onnx_export import export_onnx

        _progress(quiet, f"{spec.name}: converting to ONNX")
        onnx_started = time.perf_counter()
        written = export_onnx(folder / runtime.STATIC_PROGRAM, weights, folder, tuple(item.name for item in spec.inputs),
                              spec.outputs, {item.name: item.dynamic_axes() for item in spec.inputs}, quiet=quiet)
        entry["files"] += [written["file"]] + ([written["external_data"]] if written["external_data"] else [])
        entry["onnx_seconds"] = round(time.perf_counter() - onnx_started, 3)
    del weights
    _release_memory()
    entry["seconds"] = round(time.perf_counter() - started, 3)
    return spec, entry, examples, references


def _validate(spec: ComponentSpec, folder: Path, entry: dict, sizes, examples, references, onnx: bool, quiet: bool,
              threads: int | None) -> None:
    """Run the saved program (and ONNX model) on the examples; ExportError above the tolerance."""
    started = time.perf_counter()
    for backend in ("static",) + (("onnx",) if onnx else ()):
        _progress(quiet, f"{spec.name}: validating {backend}")
        session = runtime.open_session(folder, backend, threads=threads)
        for size, example, reference in zip(sizes, examples, references):
            outputs = session.run(example)
            check = _compare(spec, backend, size, reference, outputs)
            entry["validation"].append(check)
            if not check["passed"]:
                raise ExportError(f"{spec.name} ({_backend_name(backend)}) differs from the dynamic model: max abs error "
                                  f"{check['max_abs']:.3g} > tolerance {spec.tolerance:g} at {check['where']}")
        del session
        _release_memory()
    entry["validation_seconds"] = round(time.perf_counter() - started, 3)


def _validate_precision(spec: ComponentSpec, folder: Path, entry: dict, backend: str, precision: str, examples,
                        references, quiet: bool, threads: int | None, fail: bool = True) -> bool:
    """Run one reduced-precision program on the examples and hold it to its relative bar against fp32
    outputs (the dynamic model's; for int8, its own fp32 ONNX program's on held-out pipeline inputs); record max abs/rel error in entry["precisions"]. ExportError when `fail` and above."""
    _progress(quiet, f"{spec.name}: validating {backend} {precision}")
    session = runtime.open_session(folder, backend, threads=threads, precision=precision)
    worst_abs = worst_rel = 0.0
    for example, reference in zip(examples, references):
        for ref, got in zip(reference, session.run(example)):
            error, relative = precisions.relative_error(ref, got)
            worst_abs, worst_rel = max(worst_abs, error), max(worst_rel, relative)
    del session
    _release_memory()
    tolerance = precisions.RELATIVE_TOLERANCE[precision]
    passed = bool(worst_rel <= tolerance)
    entry.setdefault("precisions", {})[precisions.variant_name(backend, precision)] = {
        "max_abs": worst_abs, "max_rel": worst_rel, "tolerance_rel": tolerance, "passed": passed}
    if fail and not passed:
        raise ExportError(f"{spec.name} ({_backend_name(backend)}, {precision}) differs from the fp32 dynamic model: max "
                          f"relative error {worst_rel:.3g} > tolerance {tolerance:g}")
    return passed


def _variants(library: Path, staging: Path, components, variants, entries: dict, steps: int,
              quiet: bool, threads: int | None) -> dict:
    """Run the fidelity request on every variant (static fp32 first: the reference and the int8
    calibration set), quantize the int8 UNet, and decide which reduced-precision variants are kept."""
    results, reference, calibration = {}, None, []
    for backend, precision in variants:
        name = precisions.variant_name(backend, precision)
        entry = {"runtime": backend, "precision": precision, "shipped": True}
        if precision == "int8":
            # Calibrated on every other recorded UNet input and measured on the others: inputs the pipeline
            # feeds it, not random text embeddings, whose range no calibrated program is built for.
            calibration_set, held_out = calibration[0::2], calibration[1::2] or calibration
            _progress(quiet, "unet: quantizing to int8 (onnxruntime, calibrated on the recorded UNet inputs)")
            try:
                entry["quantization"] = _in_child("int8 quantization of the UNet", precisions.quantize_int8,
                                                  staging / "unet", calibration_set, quiet)
            except ExportError as error:  # the other variants are still good: keep them, say why int8 is not
                for file in (precisions.INT8_MODEL, precisions.INT8_DATA):
                    (staging / "unet" / file).unlink(missing_ok=True)
                results[name] = dict(entry, shipped=False, reason=str(error))
                _progress(quiet, f"{name}: not kept: {error}")
                continue
            entry["quantization"].update(op_types=list(precisions.INT8_OP_TYPES),
                                         calibration_samples=len(calibration_set), measured_on=len(held_out))
            references = _outputs(staging / "unet", "onnx", "fp32", held_out, threads)
            if not _validate_precision(SPECS["unet"], staging / "unet", entries["unet"], "onnx", "int8", held_out,
                                       references, quiet, threads, fail=False):
                entry.update(shipped=False, reason="the UNet's relative error is above its bar")
        _progress(quiet, f"fidelity: a {steps}-step interpolation on {name}")
        run = _in_child(f"the fidelity request on {name}", fidelity.run_in_child, library, staging, backend, precision,
                        components, steps, threads, name == "static-fp32")
        calibration.extend(run.pop("calibration"))
        entry["timing"] = fidelity.timing(run)
        if reference is None:
            reference = run
        elif precision != "fp32":
            entry.update(fidelity.compare(reference, run))
            bar = precisions.MIN_PSNR_DB[precision]
            entry["min_psnr_db"] = bar
            if entry["psnr_db"] < bar and entry["shipped"]:
                entry.update(shipped=False, reason=f"image PSNR {entry['psnr_db']:.1f} dB against fp32 is below {bar:g} dB")
        if not entry["shipped"] and precision == "int8":
            for file in entry["quantization"]["files"]:
                (staging / "unet" / file).unlink(missing_ok=True)
            entry.pop("timing")  # not held: never chosen
        elif precision == "int8":
            entries["unet"]["files"] += entry["quantization"]["files"]
        results[name] = entry
        del run
        _release_memory()
    return results


def _outputs(folder: Path, backend: str, precision: str, examples: list, threads: int | None) -> list:
    session = runtime.open_session(folder, backend, threads=threads, precision=precision)
    outputs = [session.run(example) for example in examples]
    del session
    _release_memory()
    return outputs


def _release_memory() -> None:
    """Collect garbage and give the heap's free pages back to the system: glibc keeps what Paddle frees
    (1.3 GB of 2 GB after a full-size UNet here), and the children that run the variants need it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _in_child(what: str, function, *args):
    """`function(*args)` in a fresh process, so that what one variant's runtimes hold (a full-size request
    in Paddle Inference and onnxruntime needs several GB, not all given back on release) is freed before
    the next: the full-size export with every precision ran out of 24 GB in one process."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(function, *args).result()
        except BrokenProcessPool:
            raise ExportError(f"{what} stopped without an answer (killed, likely for lack of memory)") from None


def _compare(spec: ComponentSpec, backend: str, size, reference: list[np.ndarray], outputs: list[np.ndarray]) -> dict:
    batch, height, width = size
    where = f"batch {batch}, " + (f"{reference[0].shape[1]} tokens" if spec.name == "text_encoder" else f"{height}x{width} px")
    worst, shapes_ok = 0.0, len(outputs) == len(reference)
    for name, ref, got in zip(spec.outputs, reference, outputs):
        if ref.shape != got.shape:
            shapes_ok = False
            where += f", {name} shape {list(got.shape)} != {list(ref.shape)}"
            continue
        error = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64)))) if ref.size else 0.0
        if not np.isfinite(got).all():
            error = float("inf")
        worst = max(worst, error)
    if not shapes_ok:
        worst = float("inf")
    return {"runtime": backend, "batch": batch, "height": height, "width": width, "where": where,
            "max_abs": worst, "tolerance": spec.tolerance, "passed": bool(worst <= spec.tolerance)}


def _backend_name(backend: str) -> str:
    return {"static": "Paddle Inference, oneDNN", "onnx": "onnxruntime"}[backend]


def _load(library: Path, folder: str):
    import paddle
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextModel

    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[folder]
    try:
        # low_cpu_mem_usage: no random init before the weights load (full UNet: 4.4 s and 7.5 GB peak
        # instead of 23.8 s and 10.9 GB)
        model = cls.from_pretrained(str(library / folder), paddle_dtype=paddle.float32, low_cpu_mem_usage=True)
    except Exception as error:  # noqa: BLE001 - ppdiffusers raises many kinds; name the folder and the reason
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"{library / folder}: cannot load it with ppdiffusers: {reason}") from None
    model.eval()
    return model


def _wrapper(name: str, model):
    from export import patches

    return {
        "unet": patches.UNetForExport,
        "text_encoder": patches.TextEncoderForExport,
        "vae_encoder": patches.VaeEncoderForExport,
        "vae_decoder": patches.VaeDecoderForExport,
    }[name](model)


def _reference(name: str, model, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The dynamic model's own outputs, called the way pipelines call it."""
    import paddle

    tensors = {key: paddle.to_tensor(value) for key, value in inputs.items()}
    if name == "unet":
        out = model(tensors["sample"], tensors["timestep"], encoder_hidden_states=tensors["encoder_hidden_states"])
        return [out.sample.numpy()]
    if name == "text_encoder":
        out = model(tensors["input_ids"])
        return [out[0].numpy(), out[1].numpy()]
    if name == "vae_encoder":
        return [model.encode(tensors["sample"]).latent_dist.parameters.numpy()]
    if name == "vae_decoder":
        return [model.decode(tensors["latent_sample"]).sample.numpy()]
    raise KeyError(name)


def _progress(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("paddle").setLevel(logging.ERROR)
    try:
        import ppdiffusers
        from paddlenlp.utils.log import logger as paddlenlp_logger

        ppdiffusers.utils.logging.set_verbosity(logging.ERROR)
        ppdiffusers.utils.logging.disable_progress_bar()
        paddlenlp_logger.set_level("ERROR")
    except ImportError:
        pass


def _versions(onnx: bool) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    names = ["paddlepaddle", "paddlepaddle-gpu", "ppdiffusers"] + (["paddle2onnx", "onnx", "onnxruntime", "onnxruntime-gpu"] if onnx else [])
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _jsonable(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)

