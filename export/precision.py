"""Reduced precision for the exported programs: which runtime runs which precision, what the CPU must
support, the bars each precision is held to, and the int8 quantization of the ONNX UNet.

- fp32: the exported programs as they are, in Paddle Inference ("static") and onnxruntime ("onnx").
- bf16: the same static programs in Paddle Inference with oneDNN's bfloat16 kernels
  (`Config.enable_onednn_bfloat16`); inputs and outputs stay float32. Needs a CPU that reports
  AVX512-BF16 or AMX: elsewhere oneDNN emulates bfloat16 and runs slower than fp32, so it is refused.
- int8: the ONNX UNet quantized after training by onnxruntime (static QDQ, int8 per-channel weights,
  uint8 activations) on the nodes that multiply by a weight: the linear layers and the 3x3
  convolutions, calibrated on UNet inputs recorded from the pipeline's own run. Left in fp32: the
  attention's activation-by-activation MatMuls (onnxruntime has no int8 kernel for them, so their
  quantize/dequantize pairs only cost time: 5.97 s a full-size step with them, 4.71 s without), the
  1x1 convolutions (shortcuts and the transformers' projections read un-normalized activations, whose
  wide range per-tensor uint8 resolves poorly), and the first and last convolutions. Measured on the
  full-size random-weight UNet (batch 2, 64x64, onnxruntime, 2 cores): fp32 9.07 s a step; int8
  linear layers only 7.7 s (2.4% relative error); with the convolutions as above 4.89 s (7.7%).
  The other components stay fp32.

Imports numpy and riffusion.cpu_tuning only; Paddle and onnxruntime are imported where they are used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.errors import ExportError
from riffusion.cpu_tuning import cpu_flags

PRECISIONS = ("fp32", "bf16", "int8")
RUNTIME_PRECISIONS = {"static": ("fp32", "bf16"), "onnx": ("fp32", "int8")}
VARIANTS = tuple((runtime, precision) for runtime, precisions in RUNTIME_PRECISIONS.items() for precision in precisions)
INT8_MODEL = "model.int8.onnx"
INT8_DATA = "model.int8.onnx.data"
INT8_COMPONENTS = ("unet",)  # where the time goes; the others run fp32 in the int8 variant
INT8_OP_TYPES = ("MatMul", "Gemm", "Conv")

# Per-component bar against the fp32 dynamic model: max |error| / max |fp32 output|. bfloat16 keeps 8
# significant bits (relative rounding 2**-9 = 2e-3 per value); through a network the errors add up.
RELATIVE_TOLERANCE = {"bf16": 5e-2, "int8": 1e-1}
# End-to-end bar: PSNR of the final image of an interpolation against the fp32 run from the same seeds.
MIN_PSNR_DB = {"bf16": 35.0, "int8": 30.0}

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def variant_name(runtime: str, precision: str) -> str:
    return f"{runtime}-{precision}"


def owner(precision: str) -> str:
    """The runtime that holds a reduced precision (fp32: static)."""
    return next(runtime for runtime, held in RUNTIME_PRECISIONS.items() if precision in held)


def supported(precision: str) -> bool:
    """Whether this CPU runs `precision` natively."""
    if precision == "bf16":
        return bool(cpu_flags() & set(BF16_FLAGS))
    return precision in PRECISIONS


def require(precision: str) -> None:
    """ExportError naming what the CPU lacks when it cannot run `precision`."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if not supported(precision):
        raise ExportError(f"{precision} needs a CPU with AVX512-BF16 or AMX (bfloat16 instructions); this CPU reports "
                          f"neither of the flags {', '.join(BF16_FLAGS)}: use fp32 or int8")


def check_pair(runtime: str, precision: str) -> None:
    """ExportError when `runtime` has no `precision`."""
    if runtime not in RUNTIME_PRECISIONS:
        raise ExportError(f"unknown runtime {runtime!r} (choose from {', '.join(RUNTIME_PRECISIONS)})")
    if precision not in RUNTIME_PRECISIONS[runtime]:
        owners = [name for name, precisions in RUNTIME_PRECISIONS.items() if precision in precisions]
        raise ExportError(f"runtime {runtime} has no {precision} (its precisions: "
                          f"{', '.join(RUNTIME_PRECISIONS[runtime])}; {precision} runs in {', '.join(owners) or 'none'})")


def parse_precisions(text: str | None) -> tuple[str, ...]:
    """`--precision fp32,bf16,int8` -> the precisions in the order given, fp32 always first (the reference)."""
    names = [name.strip() for name in (text or "fp32").split(",") if name.strip()]
    unknown = [name for name in names if name not in PRECISIONS]
    if unknown or not names:
        raise ExportError(f"--precision: unknown precision {unknown[0] if unknown else text!r} "
                          f"(choose from {','.join(PRECISIONS)})")
    return tuple(dict.fromkeys(["fp32"] + names))


def relative_error(reference: np.ndarray, output: np.ndarray) -> tuple[float, float]:
    """(max abs error, max abs error / max |reference|); inf when the output is not finite or misshaped."""
    if reference.shape != output.shape or not np.isfinite(output).all():
        return float("inf"), float("inf")
    error = float(np.max(np.abs(reference.astype(np.float64) - output.astype(np.float64)))) if reference.size else 0.0
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    return error, error / scale if scale else error


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (inf when identical)."""
    mse = float(np.mean((reference.astype(np.float64) - image.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def quantize_int8(folder: Path, calibration: list[dict[str, np.ndarray]], quiet: bool = True) -> dict:
    """Write folder/model.int8.onnx from folder/model.onnx, calibrated on `calibration` (input feeds
    recorded from the pipeline). Returns the files written, the seconds it took and how many nodes stayed fp32.

    Calibration and quantization run one after the other, so that their memory does not add up:
    `quantize_static` alone keeps its own copy of the model while it calibrates."""
    import logging
    import tempfile
    import time

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    from export.runtime import ONNX_MODEL

    if not calibration:
        raise ExportError(f"{folder}: no calibration inputs recorded for int8")
    started = time.perf_counter()
    source, target = Path(folder) / ONNX_MODEL, Path(folder) / INT8_MODEL
    external = (Path(folder) / (ONNX_MODEL + ".data")).is_file()
    if quiet:
        logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization warns through the root logger
    # Inside the folder, not /tmp: the augmented model is a full copy of the weights, and /tmp may be in RAM.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".calibration-") as scratch:
        ranges = calibrate(source, calibration, Path(scratch) / "augmented.onnx", external)
        cache = Path(scratch) / "ranges.json"
        save_tensors_data(ranges, cache)
        del ranges
        kept = kept_in_fp32(source)
        quantize_static(str(source), str(target), None, calibration_cache_path=str(cache),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=list(INT8_OP_TYPES),
                        nodes_to_exclude=kept, use_external_data_format=external)
    files = [INT8_MODEL] + ([INT8_DATA] if (Path(folder) / INT8_DATA).is_file() else [])
    return {"files": files, "seconds": round(time.perf_counter() - started, 3), "nodes_kept_fp32": len(kept)}


def kept_in_fp32(model: Path) -> list[str]:
    """The names of the INT8_OP_TYPES nodes of `model` that the int8 UNet keeps in fp32 (see the module
    docstring): those without a weight initializer, the 1x1 convolutions, the first and last ones."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    weight_dims = {initializer.name: list(initializer.dims) for initializer in graph.initializer}
    convolutions = [node for node in graph.node if node.op_type == "Conv"]
    kept = {convolutions[0].name, convolutions[-1].name} if convolutions else set()
    for node in graph.node:
        if node.op_type not in INT8_OP_TYPES:
            continue
        dims = weight_dims.get(node.input[1]) if len(node.input) > 1 else None
        if dims is None or (node.op_type == "Conv" and dims[2:] == [1, 1]):
            kept.add(node.name)
    return sorted(kept)


def calibrate(source: Path, calibration: list[dict[str, np.ndarray]], augmented: Path, external: bool):
    """The activation ranges of the tensors INT8_OP_TYPES read, over the recorded feeds (onnxruntime's
    MinMax calibrator, ranges averaged over the feeds).

    Two changes to onnxruntime's own session keep the full-size UNet's calibration within 6 GB instead
    of past 22 GB: the calibrator drops its in-memory copy of the model once the augmented one is on
    disk, and the session runs in priority order. In the default order each tensor's ReduceMin/ReduceMax
    ran after the whole network, so every calibrated activation stayed alive to the end."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibrationDataReader, MinMaxCalibrater

    class Recorded(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(calibration)

        def get_next(self):
            return next(self.feeds, None)

    class LeanCalibrater(MinMaxCalibrater):
        def create_inference_session(self):
            self.model = None
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
            options.enable_cpu_mem_arena = False
            self.infer_session = ort.InferenceSession(str(self.augmented_model_path), options,
                                                      providers=self.execution_providers)

    calibrator = LeanCalibrater(source, list(INT8_OP_TYPES), str(augmented), use_external_data_format=external,
                                moving_average=True)
    calibrator.augment_graph()
    calibrator.create_inference_session()
    calibrator.collect_data(Recorded())
    return calibrator.compute_data()
