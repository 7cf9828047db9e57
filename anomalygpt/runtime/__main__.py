"""`python -m anomalygpt.runtime DIR QUERY...`: inspect images with an exported runtime folder, no torch; prints
the JSON records `anomalygpt detect --json` prints for the same profile."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from anomalygpt.cli import check_sensitivity
from anomalygpt.io import list_images, safe_text
from anomalygpt.runtime.inspector import RuntimeInspector

PROG = "python -m anomalygpt.runtime"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect QUERY images with a runtime folder written by anomalygpt export."
    )
    parser.add_argument("folder", metavar="DIR", help="the runtime folder (anomalygpt export --out)")
    parser.add_argument("queries", nargs="+", metavar="QUERY", help="image files or folders")
    parser.add_argument("--sensitivity", type=float, default=0.0, help="lower the thresholds by this many spreads")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the engine (default: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 0
    try:
        check_sensitivity(args.sensitivity)  # detect's bounds and message (a UsageError is a ValueError)
        queries = list_images(args.queries)
        runtime = RuntimeInspector.open(args.folder, args.threads)
        inspections = runtime.inspect_many(queries, sources=[str(p) for p in queries], sensitivity=args.sensitivity)
        records = [inspection.to_dict() for inspection in inspections]
    except (ValueError, OSError) as error:  # RuntimeBundleError, RuntimeInspectionError, ImageError
        print(f"{PROG}: error: {safe_text(error)}", file=sys.stderr)
        return 2
    print(json.dumps(records, indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
