"""The streaming safetensors writer produces files the safetensors library reads back exactly."""

import numpy as np
import pytest
from safetensors import safe_open

from convert.writer import StreamingSafetensorsWriter


def test_round_trip_mixed_dtypes_and_odd_sizes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "b.bias": rng.standard_normal(7).astype(np.float16),  # 14 bytes: later offsets are unaligned
        "c.scalar": np.array(2.5, dtype=np.float32),
        "d.ids": np.arange(9, dtype=np.int64).reshape(3, 3),
    }
    path = tmp_path / "t.safetensors"
    writer = StreamingSafetensorsWriter(path, [(n, t.dtype, t.shape) for n, t in tensors.items()], {"format": "pd"})
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    with safe_open(str(path), framework="np") as handle:
        assert handle.metadata() == {"format": "pd"}
        for name, tensor in tensors.items():
            assert np.array_equal(handle.get_tensor(name), tensor)
            assert handle.get_tensor(name).dtype == tensor.dtype


def test_refuses_tensors_out_of_order_or_missing(tmp_path):
    layout = [("a", np.dtype("float32"), (2,)), ("b", np.dtype("float32"), (2,))]
    writer = StreamingSafetensorsWriter(tmp_path / "t.safetensors", layout, {})
    with pytest.raises(ValueError, match="expected a"):
        writer.write("b", np.zeros(2, np.float32))
    writer.write("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="1 tensors never written"):
        writer.close()
