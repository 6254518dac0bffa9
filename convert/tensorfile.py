"""Lazy, bounded-memory reading of one torch weight file (.safetensors, or a .bin zip pickle).

Both formats are read through a memory map, and pages of a map that have been touched count towards
the process's resident memory until they are released. For a .bin (torch's map is ours to reach)
the pages of each tensor are released once the next tensor is asked for; a safetensors file (its
map lives inside the library) is re-opened after every `remap_bytes` read. Either way peak memory
stays near one tensor, whatever the file size.
"""

from __future__ import annotations

import collections
import ctypes
import io
import mmap
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from convert.errors import ConversionError

REMAP_BYTES = 64 * 2**20
MADV_DONTNEED = 4  # Linux
MADV_POPULATE_READ = 22  # Linux 5.14+: map a range in one call instead of one page fault per 4 KiB
# Elsewhere the advice is skipped: reading still works, only without the memory bound.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorFile:
    def __init__(self, path: Path, remap_bytes: int = REMAP_BYTES):
        self.path = Path(path)
        self.remap_bytes = remap_bytes
        self._read_since_open = 0
        self._last: torch.Tensor | None = None
        self._handle = _open_safetensors(self.path) if self.is_safetensors else _open_pickle(self.path)
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
        """The tensor's data: for a .bin a view into the map, valid until the next read."""
        if self.is_safetensors:
            if self._read_since_open > self.remap_bytes:
                self._handle = None  # unmap before mapping again
                self._handle = _open_safetensors(self.path)
                self._read_since_open = 0
            tensor = self._handle.get_tensor(name)
            self._read_since_open += tensor.numel() * tensor.element_size()
            return tensor
        self._release_last()
        self._last = self._handle[name]
        self._advise(self._last, MADV_POPULATE_READ)  # best effort: older kernels refuse, faults still work
        return self._last

    def close(self) -> None:
        self._release_last()
        self._handle = None

    def _release_last(self) -> None:
        """Drop the pages of the last tensor read from our resident set. The map is private and never
        written, so the kernel just reads them from the file again if anything touches them."""
        if self._last is not None:
            self._advise(self._last, MADV_DONTNEED)
            self._last = None

    @staticmethod
    def _advise(tensor: torch.Tensor, advice: int) -> None:
        if _LIBC is None or tensor.numel() == 0:
            return
        start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
        end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)


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
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise ConversionError(f"{path}: not a readable torch file (truncated or corrupted?): {reason}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint (.ckpt): {"state_dict": ..., "global_step": ...}
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise ConversionError(f"{path}: expected a flat mapping of tensor names to tensors")
    # The map reads each storage's bytes from the file at its record's offset, trusting the pickle for the
    # size and never decompressing: check every record the tensors use before any tensor is read.
    check_records(path, list(state))
    return state


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the source as diffusers names it, and where its data lies."""

    file: TensorFile
    file_name: str  # its name inside `file`
    name: str  # its diffusers name
    squeeze: bool = False  # stored as a 1x1 conv [C, C, 1, 1] for a linear [C, C] (LDM VAE attention)
    paddle_layout: bool = False  # linear weights already [in, out] (a converted library)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.file.shapes[self.file_name]
        return shape[:2] if self.squeeze else shape

    @property
    def where(self) -> str:
        return f"{self.file.path}: tensor {self.file_name!r}"


@dataclass(frozen=True)
class _Storage:
    key: str
    nbytes: int
    element_size: int


@dataclass(frozen=True)
class _TensorRecord:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


# torch's storage classes as the pickle names them (their .dtype would warn that TypedStorage is deprecated)
_STORAGE_ELEMENT_SIZES = {
    "UntypedStorage": 1, "ByteStorage": 1, "CharStorage": 1, "BoolStorage": 1, "ShortStorage": 2, "HalfStorage": 2,
    "BFloat16Storage": 2, "IntStorage": 4, "FloatStorage": 4, "LongStorage": 8, "DoubleStorage": 8,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16,
}


class _RecordReader(pickle.Unpickler):
    """Reads a torch zip pickle (already accepted by torch's weights-only loader) into _TensorRecords:
    which storage record each tensor uses, where in it, and the storage's declared size. No global the
    pickle names is ever imported or called: each is replaced by a stub below."""

    def find_class(self, module: str, name: str):
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return lambda storage, offset, shape, stride, *rest: _TensorRecord(storage, offset, tuple(shape), tuple(stride))
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *rest: data
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        return lambda *args, **kwargs: None

    def persistent_load(self, saved_id):
        kind, storage_type, key, _location, numel = saved_id
        size = _STORAGE_ELEMENT_SIZES.get(storage_type)
        if size is None:
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
        return _Storage(str(key), int(numel) * size, size)


def check_records(path: Path, names: list[str]) -> None:
    """Every tensor in `names` must use a stored (uncompressed) record of the archive at least as long as
    the storage the pickle declares. (Records reaching outside the file and tensors reaching outside their
    storage are refused by torch's own reader.)"""
    with zipfile.ZipFile(path) as archive:
        pickle_name = next(info.filename for info in archive.infolist() if info.filename.endswith("data.pkl"))
        try:
            state = _RecordReader(io.BytesIO(archive.read(pickle_name))).load()
        except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, EOFError, zipfile.BadZipFile) as error:
            raise ConversionError(f"{path}: not a readable torch file (truncated or corrupted?): {error}") from None
        records = _data_records(path, archive)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    prefix = pickle_name[: -len("data.pkl")]
    for name in names:
        where = f"{path}: tensor {name!r}"
        tensor = state.get(name)
        record = records.get(f"{prefix}data/{tensor.storage.key}") if isinstance(tensor, _TensorRecord) else None
        if record is None:
            raise ConversionError(f"{where}: its storage is no record of the archive (corrupted file)")
        record_name, method, stored_size, size = record
        if method != zipfile.ZIP_STORED or stored_size != size:
            raise ConversionError(f"{where}: record {record_name} is compressed; a memory-mapped read needs stored "
                                  "records (re-save the file with torch.save, or as .safetensors)")
        if tensor.storage.nbytes > size:
            raise ConversionError(f"{where}: record {record_name} holds {size} bytes, the tensor's storage needs "
                                  f"{tensor.storage.nbytes} (truncated or corrupted file)")


_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


def _data_records(path: Path, archive: zipfile.ZipFile) -> dict[str, tuple[str, int, int, int]]:
    """{record name: (name, compression method, stored size, size)}, the method as both the central
    directory and the record's own header give it."""
    records = {}
    with open(path, "rb") as handle:
        for info in archive.infolist():
            handle.seek(info.header_offset)
            header = handle.read(_LOCAL_HEADER.size)
            if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                raise ConversionError(f"{path}: record {info.filename} has no valid header (truncated or corrupted file)")
            method = _LOCAL_HEADER.unpack(header)[3] or info.compress_type
            records[info.filename] = (info.filename, method, info.compress_size, info.file_size)
    return records
