"""The current machine's memory read bandwidth, with as many threads as the model runs with.

Decode reads every weight (and the KV cache) once per token, so its floor is bytes /
bandwidth: this number turns a measured ms/token into "how close to the roofline".
Each thread reduces its own slice of a buffer far larger than any cache; numpy's
reductions release the GIL, so the threads read memory in parallel. The best of a few
passes is reported: noise from other processes only ever slows a pass down.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from edgeattn.errors import InvalidOptionError

DEFAULT_BUFFER_BYTES = 256 * 2**20  # beyond any last-level cache of the devices in question
MIN_BUFFER_BYTES = 32 * 2**20
METHOD = "numpy bitwise-or reduction of a uint64 buffer, one slice per thread, best of {repeats} passes"


@dataclass(frozen=True)
class Bandwidth:
    gb_per_s: float
    threads: int
    buffer_bytes: int
    repeats: int

    def to_dict(self) -> dict:
        return {"gb_per_s": round(self.gb_per_s, 2), "threads": self.threads, "buffer_bytes": self.buffer_bytes,
                "method": METHOD.format(repeats=self.repeats)}


def measure_read_bandwidth(threads: int, buffer_bytes: int | None = None, repeats: int = 5) -> Bandwidth:
    """Read bandwidth in GB/s (10^9 bytes/s) with ``threads`` reader threads."""
    if threads < 1:
        raise InvalidOptionError(f"threads must be >= 1, got {threads}")
    if repeats < 1:
        raise InvalidOptionError(f"repeats must be >= 1, got {repeats}")
    size = buffer_bytes or _default_buffer_bytes()
    words = np.ones(size // 8, dtype=np.uint64)  # ones, not zeros: every page really backed by memory
    slices = np.array_split(words, threads)
    best = float("inf")
    for _ in range(repeats):
        best = min(best, _timed_pass(slices))
    return Bandwidth(words.nbytes / best / 1e9, threads, words.nbytes, repeats)


def _timed_pass(slices: list[np.ndarray]) -> float:
    """Seconds for all threads to read their slices, from a common start."""
    start = threading.Barrier(len(slices) + 1)

    def read(part: np.ndarray) -> None:
        start.wait()
        np.bitwise_or.reduce(part)

    workers = [threading.Thread(target=read, args=(part,)) for part in slices]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    return time.perf_counter() - began


def _default_buffer_bytes() -> int:
    """256 MiB, or an eighth of physical memory on a small board."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return DEFAULT_BUFFER_BYTES
    return max(MIN_BUFFER_BYTES, min(DEFAULT_BUFFER_BYTES, physical // 8))
