"""A saved static program -> model.onnx with paddle2onnx, weights attached by us.

paddle2onnx 2.1.0 serialises the whole model, weights included, into one protobuf, and protobuf
stops at 2 GB: the fp32 SD UNet (3.4 GB) fails with `onnx.ModelProto exceeded maximum protobuf size
of 2GB` (its external-data branch exists only on the legacy, pre-PIR path). So we convert a
weight-free twin of the program, in which every parameter is an input, and then turn those inputs
into initializers ourselves: inline when the model stays under 2 GB, else streamed into
`model.onnx.data` beside it (ONNX external data, one file, offsets 64-byte aligned).
The twin also carries the float attributes paddle2onnx expects (see FLOAT_ATTRIBUTES).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from export.errors import ExportError

ONNX_MODEL = "model.onnx"
EXTERNAL_DATA = "model.onnx.data"
PROTOBUF_LIMIT = 2_000_000_000  # bytes; protobuf's hard limit is 2 GiB, keep a margin for the graph
OPSET = 17
PIR_JSON_VERSION = 4  # the serialised-program version jit.save writes in Paddle 3.x
PIR_DTYPES = {"0.t_f32": "float32", "0.t_f16": "float16", "0.t_bf16": "bfloat16", "0.t_f64": "float64",
              "0.t_i64": "int64", "0.t_i32": "int32"}


def weight_free_program(program: Path, out: Path) -> list[str]:
    """Write a copy of the PIR program `program` in which each parameter op is a data op (an input)
    with the parameter's name, shape and dtype; return the parameter names in program order."""
    data = json.loads(Path(program).read_text(encoding="utf-8"))
    version = data.get("base_code", {}).get("version")
    if version != PIR_JSON_VERSION:
        raise ExportError(f"{program}: serialised program version {version}, the ONNX export reads version "
                          f"{PIR_JSON_VERSION} (Paddle 3.x)")
    names = []
    for region in data["program"]["regions"]:
        for block in region["blocks"]:
            ops = block["ops"]
            for index, op in enumerate(ops):
                _float32_attributes(op)
                if op.get("#") != "p":
                    continue
                name = op["A"][3]
                value_type = op["O"]["TT"]["D"]
                dtype = PIR_DTYPES.get(value_type[0]["#"])
                if dtype is None:
                    raise ExportError(f"{program}: parameter {name!r} has dtype {value_type[0]['#']}, not supported")
                shape = value_type[1]
                ops[index] = {
                    "#": "1.data",
                    "A": [{"AT": {"#": "0.a_str", "D": name}, "N": "name"},
                          {"AT": {"#": "1.a_intarray", "D": shape}, "N": "shape"},
                          {"AT": {"#": "1.a_dtype", "D": dtype}, "N": "dtype"},
                          {"AT": {"#": "1.a_place", "D": [0, 0, ""]}, "N": "place"}],
                    "I": [],
                    "O": [op["O"]],
                    "OA": [{"AT": {"#": "0.a_array", "D": [{"#": "0.a_bool", "D": True}]}, "N": "stop_gradient"}],
                }
                names.append(name)
    Path(out).write_text(json.dumps(data), encoding="utf-8")
    return names


# Attributes paddle2onnx 2.1.0 reads as float that Paddle 3.3 writes as double: given a double, it
# leaves its float uninitialised (group_norm's InstanceNormalization got epsilon 0 or garbage, NaN at
# times; pad3d padded with garbage). The twin gives it the float it reads.
FLOAT_ATTRIBUTES = {"1.group_norm": ("epsilon",), "1.pad3d": ("pad_value",)}


def _float32_attributes(op: dict) -> None:
    for attribute in op.get("A", ()) if op.get("#") in FLOAT_ATTRIBUTES else ():
        if attribute.get("N") in FLOAT_ATTRIBUTES[op["#"]] and attribute["AT"].get("#") == "0.a_f64":
            attribute["AT"] = {"#": "0.a_f32", "D": attribute["AT"]["D"]}


def export_onnx(program: Path, weights: dict, folder: Path, input_names: tuple[str, ...],
                output_names: tuple[str, ...], dynamic_axes: dict[str, dict[int, str]] | None = None,
                quiet: bool = True) -> dict:
    """Convert the saved program `program` (inference.json) into `folder`/model.onnx. `weights` maps each
    parameter's program name to its value (a paddle Tensor or numpy array, read one at a time);
    `dynamic_axes` names the inputs' dynamic dimensions ({"sample": {0: "batch"}}). Returns what was
    written."""
    import onnx
    from onnx import TensorProto, numpy_helper

    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="onnx-export-") as scratch:
        skeleton = Path(scratch) / "skeleton.json"
        names = weight_free_program(program, skeleton)
        missing = [name for name in names if name not in weights]
        if missing:
            raise ExportError(f"{program}: parameter {missing[0]!r} has no value in the model")
        serialised = _convert_in_subprocess(skeleton, Path(scratch) / "skeleton.onnx", program, quiet)
    model = onnx.load_from_string(serialised)
    graph = model.graph

    # inputs named like the spec, outputs renamed from Paddle's fetch_name_N
    graph_inputs = [item.name for item in graph.input if item.name not in weights]
    if tuple(graph_inputs) != tuple(input_names):
        raise ExportError(f"{program}: ONNX inputs {graph_inputs}, expected {list(input_names)}")
    if len(graph.output) != len(output_names):
        raise ExportError(f"{program}: {len(graph.output)} ONNX outputs, expected {len(output_names)}")
    renames = {item.name: new for item, new in zip(graph.output, output_names)}
    for node in graph.node:
        node.output[:] = [renames.get(name, name) for name in node.output]
        node.input[:] = [renames.get(name, name) for name in node.input]
    for item in graph.output:
        item.name = renames[item.name]

    # paddle2onnx leaves unused Constant nodes behind (onnxruntime warns about each when loading)
    used = {name for node in graph.node for name in node.input} | {item.name for item in graph.output}
    unused = [node for node in graph.node if node.op_type == "Constant" and not set(node.output) & used]
    for node in unused:
        graph.node.remove(node)
    for item in graph.input:
        for axis, name in (dynamic_axes or {}).get(item.name, {}).items():
            item.type.tensor_type.shape.dim[axis].dim_param = name

    # parameters: inputs -> initializers
    kept = [item for item in graph.input if item.name not in weights]
    del graph.input[:]
    graph.input.extend(kept)
    total = sum(_nbytes(weights[name]) for name in names)
    external = total + len(serialised) > PROTOBUF_LIMIT
    model_path = folder / ONNX_MODEL
    if not external:
        for name in names:
            graph.initializer.append(numpy_helper.from_array(_array(weights[name]), name))
        onnx.save_model(model, str(model_path))
        return {"file": ONNX_MODEL, "external_data": None, "bytes": model_path.stat().st_size}

    data_path = folder / EXTERNAL_DATA
    with open(data_path, "wb") as handle:
        for name in names:
            array = _array(weights[name])
            offset = handle.tell()
            padding = -offset % 64
            handle.write(b"\0" * padding)
            offset += padding
            handle.write(array.tobytes())
            tensor = TensorProto(name=name, dims=list(array.shape), data_type=_onnx_dtype(array.dtype))
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", EXTERNAL_DATA), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            graph.initializer.append(tensor)
    onnx.save_model(model, str(model_path))
    return {"file": ONNX_MODEL, "external_data": EXTERNAL_DATA,
            "bytes": model_path.stat().st_size + data_path.stat().st_size}


def _array(value) -> np.ndarray:
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()
    return np.ascontiguousarray(value)


def _nbytes(value) -> int:
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    return int(np.prod(value.shape, dtype=np.int64)) * int(value.element_size())


def _onnx_dtype(dtype: np.dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _convert_in_subprocess(skeleton: Path, target: Path, program: Path, quiet: bool) -> bytes:
    """paddle2onnx in a child process: it calls abort() on unsupported programs and prints from C++;
    a child keeps both away from the exporting process."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "export.onnx_export", str(skeleton), str(target)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    if not quiet:
        sys.stderr.writelines(line + "\n" for line in done.stdout.splitlines() if "Paddle2ONNX" in line)
    if done.returncode != 0 or not target.is_file() or target.stat().st_size == 0:
        lines = [line.strip() for line in done.stdout.splitlines()]
        reason = next((line for line in lines if "[ERROR]" in line and "unsupported features" not in line),
                      next((line for line in reversed(lines) if line), f"exit status {done.returncode}"))
        raise ExportError(f"{program}: paddle2onnx could not convert it: {reason}")
    return target.read_bytes()


def _child(skeleton: str, target: str) -> int:
    import paddle2onnx

    try:
        serialised = paddle2onnx.export(skeleton, "", save_file=None, opset_version=OPSET, auto_upgrade_opset=True,
                                        enable_onnx_checker=True, enable_optimize=True, optimize_tool=None)
    except UnboundLocalError:  # paddle2onnx logs its failure, then has nothing to return
        return 1
    if not serialised:
        return 1
    Path(target).write_bytes(serialised)
    return 0


if __name__ == "__main__":
    sys.exit(_child(*sys.argv[1:3]))
