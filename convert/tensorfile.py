"""Lazy, bounded-memory reading of one torch weight file (.safetensors, or a .bin zip pickle).

Both formats are read through a memory map. Pages of a map that have been touched count towards
the process's resident memory until the map is closed, so the file is re-opened after every
`remap_bytes` read: peak memory stays near one tensor plus that budget, whatever the file size.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from convert.errors import ConversionError

REMAP_BYTES = 256 * 2**20

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorFile:
    def __init__(self, path: Path, remap_bytes: int = REMAP_BYTES):
        self.path = Path(path)
        self.remap_bytes = remap_bytes
        self._handle = None
        self._read_since_open = 0
        self._open()
        self.shapes, self.dtypes = {}, {}
        for name in self._handle.keys():
            if self.is_safetensors:
                view = self._handle.get_slice(name)
                self.shapes[name] = tuple(view.get_shape())
                self.dtypes[name] = _SAFETENSORS_DTYPES.get(view.get_dtype())
            else:
                self.shapes[name] = tuple(self._handle[name].shape)
                self.dtypes[name] = self._handle[name].dtype

    @property
    def is_safetensors(self) -> bool:
        return self.path.suffix == ".safetensors"

    def read(self, name: str) -> torch.Tensor:
        """The tensor's data; a view into the map, valid until the next read."""
        if self._read_since_open > self.remap_bytes:
            self._open()
        tensor = self._tensor(name)
        self._read_since_open += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        self._handle = None

    def _open(self) -> None:
        self._handle = None  # drop the old map first
        self._read_since_open = 0
        self._handle = _open_safetensors(self.path) if self.is_safetensors else _open_pickle(self.path)

    def _tensor(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name) if self.is_safetensors else self._handle[name]


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as error:
        raise ConversionError(f"{path}: not a readable safetensors file (truncated or corrupted?): {error}") from None


def _open_pickle(path: Path) -> dict[str, torch.Tensor]:
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            if handle.read(1) == b"\x80":  # a pickle protocol header: torch.save before torch 1.6
                raise ConversionError(
                    f"{path}: legacy (pre-zip) torch pickle cannot be memory-mapped; re-save it with a "
                    "current torch.save or as .safetensors"
                )
        raise ConversionError(f"{path}: not a readable torch file (truncated or corrupted?): not a zip archive")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise ConversionError(f"{path}: refused to unpickle, the file holds more than tensors ({reason})") from None
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0]
        raise ConversionError(f"{path}: not a readable torch file (truncated or corrupted?): {reason}") from None
    except (OSError, EOFError, ValueError) as error:
        raise ConversionError(f"{path}: not a readable torch file (truncated or corrupted?): {error}") from None
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise ConversionError(f"{path}: expected a flat mapping of tensor names to tensors")
    return state
