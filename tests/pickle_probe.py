"""A code-running pickle to plant where a checkpoint or cache is looked for: loading it with pickle (as
torch.load(weights_only=False) does) writes a marker file, so a test can prove a code path never unpickles."""

from __future__ import annotations

from pathlib import Path

import torch


class Probe:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({self.marker!r}, 'w').write('pickle ran')",)


def plant(path: Path, marker: Path) -> Path:
    """A torch.save file at path whose unpickling writes marker."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fingerprint": Probe(marker), "epoch": 0, "step": 0}, path)
    return path
