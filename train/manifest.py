"""weights/MANIFEST.json: what each shipped file is and exactly how it was made.

    python -m train.manifest --files weights/decoder.safetensors weights/decoder.json \
        --command "anomalygpt train decoder ..." --data "..." --seed 0
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalygpt.io import write_json_atomic
from anomalygpt.weights import file_record

MANIFEST = Path(__file__).resolve().parent.parent / "weights" / "MANIFEST.json"


def record(files: Sequence[Path], command: str, data: str, seed: int, manifest: Path = MANIFEST) -> dict[str, Any]:
    """Add or replace the entries of `files` (sha256, size, command, data, seed); other entries are kept."""
    entries = json.loads(manifest.read_text())["files"] if manifest.is_file() else {}
    for path in files:
        name = path.resolve().relative_to(manifest.parent).as_posix()
        entries[name] = {**file_record(path), "command": command, "data": data, "seed": seed}
    document = {"files": dict(sorted(entries.items()))}
    write_json_atomic(manifest, document)
    return document


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Record shipped weight files in weights/MANIFEST.json.")
    parser.add_argument("--files", type=Path, nargs="+", required=True)
    parser.add_argument("--command", required=True, help="the exact command that produced the files")
    parser.add_argument("--data", required=True, help="what the files were trained on")
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args(argv)
    record(args.files, args.command, args.data, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
