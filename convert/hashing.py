"""sha256 of the source files in a background thread (hashlib releases the GIL), cancellable."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path


class Hasher:
    def __init__(self):
        self._cancelled = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._futures: dict[Path, Future] = {}

    def submit(self, path: Path) -> None:
        path = Path(path).resolve()
        if path not in self._futures:
            self._futures[path] = self._pool.submit(sha256_file, path, self._cancelled)

    def result(self, path: Path) -> str:
        self.submit(path)
        return self._futures[Path(path).resolve()].result()

    def cancel(self) -> None:
        """Stop hashing: an error should be reported now, not after gigabytes more are read."""
        self._cancelled.set()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def sha256_file(path: Path, cancelled: threading.Event | None = None) -> str | None:
    """Hex sha256 of a file; None when `cancelled` is set before the end."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * 2**20):
            if cancelled is not None and cancelled.is_set():
                return None
            digest.update(chunk)
    return digest.hexdigest()
