"""A safetensors file written one tensor at a time.

safetensors' own `save_file` needs every tensor in memory at once; the format itself only needs the
names, dtypes and shapes up front (the header), so the header is written first and the data streamed
after it. The result is re-opened with `safe_open` to prove the library reads it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from safetensors import safe_open

DTYPE_NAMES = {
    np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16",
    np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16", np.dtype("int8"): "I8",
    np.dtype("uint8"): "U8", np.dtype("bool"): "BOOL",
}


class StreamingSafetensorsWriter:
    """Write tensors in the order given by `layout`: a list of (name, numpy dtype, shape)."""

    def __init__(self, path: Path, layout: list[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        self.path = Path(path)
        self._pending = []
        header: dict = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape in layout:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._pending.append((name, np.dtype(dtype), tuple(shape)))
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        expected_name, dtype, shape = self._pending[self._next]
        if name != expected_name or array.dtype != dtype or tuple(array.shape) != shape:
            raise ValueError(f"{self.path}: expected {expected_name} {dtype} {shape}, got {name} {array.dtype} {array.shape}")
        self._file.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._pending):
            raise ValueError(f"{self.path}: {len(self._pending) - self._next} tensors never written")
        with safe_open(str(self.path), framework="np") as reader:
            if len(reader.keys()) != len(self._pending):
                raise ValueError(f"{self.path}: safetensors reads back {len(reader.keys())} tensors")

    def abort(self) -> None:
        self._file.close()
