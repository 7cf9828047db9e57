"""A batch's images and maps in one memory-mapped file that inspect_many's worker processes open by path.

Through a process pool's pipes every 300 px image travelled three times, pickled (decoded pixels and memory input
back from the decoder, then pixels, memory input and map out to the tail, then the map back: 1.8 MB), which cost
the calling process 2.6-2.8 ms of CPU per image (bench/bench_host.py): a ceiling of ~370 images/s whatever the
device and the cores (now 0.37 ms). Here the decoder writes its arrays into the batch's file, the caller reads the
memory inputs from it and writes the maps into it, and the tail reads pixels and map from it; only small records
cross the pipes.

The files live in /dev/shm (memory) when it has room for a few batches, else in the temporary folder (the page
cache serves them there); a run makes about three, reuses each once its batch's tails are done, and removes them
at its end.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

SHM = Path("/dev/shm")
# A file's space allocated (macOS has no posix_fallocate: a sparse file there, as ftruncate makes).
reserve = getattr(os, "posix_fallocate", lambda descriptor, offset, length: os.ftruncate(descriptor, offset + length))
LIVE_BATCHES = 4  # batches alive at once in inspect_many: decoding, on the device, finishing, and one spare


@dataclass(frozen=True)
class SharedBatch:
    """`count` images of `shape` (H, W): pixels and memory inputs (H, W, 3) uint8, maps (H, W) float32."""

    path: str
    count: int
    shape: tuple[int, int]

    @staticmethod
    def nbytes_for(count: int, shape: tuple[int, int]) -> int:
        return count * shape[0] * shape[1] * (3 + 3 + 4)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pixels, memory inputs, maps) mapped from the file, writable (each process writes only its own slots).
        A process maps each file once (MAPPED): a fresh mapping faults in every page it touches again."""
        if self.path not in MAPPED:
            height, width = self.shape
            with open(self.path, "r+b") as file:
                raw = np.frombuffer(mmap.mmap(file.fileno(), self.nbytes_for(self.count, self.shape)), np.uint8)
            images = self.count * height * width * 3
            pixels = raw[:images].reshape(self.count, height, width, 3)
            inputs = raw[images : 2 * images].reshape(self.count, height, width, 3)
            maps = raw[2 * images :].view(np.float32).reshape(self.count, height, width)
            MAPPED[self.path] = pixels, inputs, maps
        return MAPPED[self.path]


MAPPED: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # this process's mappings, by file


class SharedBatches:
    """A run's SharedBatch files: a released one is handed out again (a new file's pages cost the kernel a fault
    and a zeroing each, 0.3 ms of the caller's CPU per image), and all are removed when the run ends, however it
    ends (an error, or a caller that stops reading)."""

    def __init__(self, count: int, shape: tuple[int, int]) -> None:
        self.count, self.shape = count, shape
        needed = LIVE_BATCHES * SharedBatch.nbytes_for(count, shape)
        self.folder = str(SHM) if SHM.is_dir() and shutil.disk_usage(SHM).free > 2 * needed else None
        self.made: list[SharedBatch] = []
        self.free: list[SharedBatch] = []

    def new(self) -> SharedBatch:
        if self.free:
            return self.free.pop()
        descriptor, path = tempfile.mkstemp(prefix="anomalygpt-batch-", suffix=".bin", dir=self.folder)
        size = SharedBatch.nbytes_for(self.count, self.shape)
        try:
            reserve(descriptor, 0, size)  # space reserved now: a full disk is this error, not a SIGBUS in a worker
        except OSError as error:
            Path(path).unlink()
            raise OSError(
                error.errno,
                f"worker processes: no room for a batch's shared file ({size / 1e6:.0f} MB) in "
                f"{Path(path).parent}: {error.strerror}",
            ) from error
        finally:
            os.close(descriptor)
        self.made.append(SharedBatch(path, self.count, self.shape))
        return self.made[-1]

    def release(self, batch: SharedBatch) -> None:
        """The batch is done with (its tails collected): its file may hold the next."""
        self.free.append(batch)

    def __enter__(self) -> SharedBatches:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for batch in self.made:  # arrays still held stay readable
            MAPPED.pop(batch.path, None)
            Path(batch.path).unlink(missing_ok=True)
