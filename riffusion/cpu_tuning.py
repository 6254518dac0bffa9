"""Process-wide CPU runtime settings for Paddle, applied by every riffusion command before Paddle loads.

Measured on the 2-core AMD EPYC (AVX512) here:
- Paddle's MKL (mklml) takes a slow generic code path on AMD CPUs: a 1024x1280x5120 matmul ran at 37
  GFLOPS, torch's at 80. MKL_DEBUG_CPU_TYPE=5 (with MKL_ENABLE_INSTRUCTIONS=AVX512 where the CPU has it)
  gives 95 GFLOPS; convolutions gain alike. Only set on AMD: on Intel MKL already picks its best path.
- glibc maps every allocation above 32 MB anew and unmaps it on free, so each big tensor's pages fault
  in again, which costs more than the arithmetic here (an exp over 134M floats: 0.41 s in fresh memory,
  0.14 s in reused); mallopt raises the mmap and trim thresholds so freed memory is reused.
- MKL's AVX-512 GEMMs round differently with the alignment of their buffers, so with the fast path above
  the first request after loading gave other bytes than the same request later (another JPEG, other MP3).
  MKL_CBWR=AUTO,STRICT makes every result independent of alignment (the same request gives the same bytes
  in every process, every time) at no measured cost (1024x1280x5120 matmul 145 ms without, 140 ms with).
- ppdiffusers imports torch whenever it is installed, and with torch loaded those faults come back:
  USE_TORCH=0 keeps it out (the Paddle side never needs torch).
A LoRA training step went from 3.76x to 1.47x torch's time with them; README "Precision and speed" has
what they do for inference (scripts/bench_cpu_tuning.py).

The user's own settings win: a variable already in the environment is never changed, and
RIFFUSION_CPU_TUNING=0 turns all of this off.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

SWITCH = "RIFFUSION_CPU_TUNING"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
HEAP_REUSE_BYTES = 1 << 30


def tune_cpu_runtime() -> None:
    """Call before Paddle is imported (MKL reads its variables when it loads); idempotent."""
    if os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    for name, value in settings().items():
        os.environ.setdefault(name, value)
    reuse_freed_memory()


def settings() -> dict[str, str]:
    """The environment variables tune_cpu_runtime sets where the user has not (MKL's only before Paddle loads)."""
    wanted = {"USE_TORCH": "0"}
    if "paddle" not in sys.modules:
        wanted.update(mkl_settings())
    return wanted


def mkl_settings() -> dict[str, str]:
    """MKL's variables (read once, when Paddle loads MKL): reproducible results everywhere, the fast path on AMD."""
    wanted = {"MKL_CBWR": "AUTO,STRICT"}
    if cpu_vendor() == "AuthenticAMD":
        wanted["MKL_DEBUG_CPU_TYPE"] = "5"
        if "avx512f" in cpu_flags():
            wanted["MKL_ENABLE_INSTRUCTIONS"] = "AVX512"
    return wanted


def reuse_freed_memory() -> None:
    """Keep freed blocks up to HEAP_REUSE_BYTES in the heap instead of unmapping them (glibc only)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_REUSE_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, HEAP_REUSE_BYTES)
    except (OSError, AttributeError):  # not glibc: leave the allocator alone
        pass


def _cpuinfo(field_name: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(field_name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    return _cpuinfo("vendor_id")


def cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())
