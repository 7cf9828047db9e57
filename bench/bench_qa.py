"""Assistant QA accuracy on held-out simulated conversations, and yes/no agreement with ELPV's real labels.

1. Normals that no training saw (simulation.normals.VALIDATION_PICTURES crops) -> `anomalygpt simulate` folder.
2. eval.qa replays every conversation with the grounded template answerer (a check of the scorer: it should be
   perfect) and the first --llm-conversations with the preset's LLM assistant, guarded (grounded opening and
   claim checker) and unguarded (the model alone: no opening, no checker).
3. ELPV: --elpv test cells per cell type, 4 references each (seeded draw); "Is there a defect?" answered by
   the assistant (guarded and unguarded) beside the detector's own verdict, all against the real labels.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_qa.py --out runs/bench_qa
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from anomalygpt.answerers import AssistantAnswerer, GroundedAnswerer
from anomalygpt.config import load_preset
from anomalygpt.guard import answer_claims
from anomalygpt.io import load_image, write_json_atomic
from eval.qa import asker, evaluate, read_records
from simulation.normals import VALIDATION_PICTURES, write_normals
from simulation.writer import write_dataset

SIZE = 256
N_NORMALS = 48
ELPV_QUESTION = "Is there a defect in this cell?"


def held_out_conversations(out: Path, n: int, seed: int) -> Path:
    """An `anomalygpt simulate` folder from normals of the validation pictures (resumed when it exists)."""
    normals = write_normals(VALIDATION_PICTURES, N_NORMALS, SIZE, seed, out / "normals")
    write_dataset(normals, out / "conversations", n, seed, None, size=SIZE)
    return out / "conversations"


def elpv_agreement(assistant: Any, n_per_type: int, seed: int) -> dict[str, Any]:
    """Per cell type: detector verdict accuracy and the guarded / unguarded answers' agreement with the labels."""
    from eval.datasets import draw_shots, load_split

    guarded = asker(AssistantAnswerer(assistant, guard=True))
    bare = asker(AssistantAnswerer(assistant, guard=False, check=False))
    out: dict[str, Any] = {}
    for cell_type in ("mono", "poly"):
        references, test = draw_shots(load_split("elpv", None, cell_type), 4, seed)
        chosen = np.random.default_rng(seed).choice(len(test), size=min(n_per_type, len(test)), replace=False)
        fitted = assistant.inspector.fit(references)
        rows = []
        for index in chosen:
            sample = test[int(index)]
            image = load_image(sample.path)
            inspection = assistant.inspector.inspect(image, fitted, source=str(sample.path))
            truth = bool(sample.label)
            answers = [ask(ELPV_QUESTION, [], inspection, image) for ask in (guarded, bare)]
            claims = [answer_claims(answer, ELPV_QUESTION) for answer in answers]
            rows.append((inspection.is_anomalous == truth, claims[0] == {truth}, claims[1] == {truth}))
        detector, with_guard, without = (float(np.mean(column)) for column in zip(*rows, strict=True))
        out[cell_type] = {"n": len(rows), "detector": detector, "guarded": with_guard, "unguarded": without}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_qa"))
    parser.add_argument("--conversations", type=int, default=200, help="held-out conversations to simulate")
    parser.add_argument("--llm-conversations", type=int, default=60, help="of those, how many the LLM answers")
    parser.add_argument("--elpv", type=int, default=50, help="ELPV test cells per cell type (0: skip)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = held_out_conversations(args.out, args.conversations, args.seed + 101)
    records = read_records(data)
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    results: dict[str, Any] = {"command": " ".join(sys.argv), "machine": machine}
    z = load_preset(args.preset).calibration.z
    grounded = evaluate(data, records, asker(GroundedAnswerer()), None, z, args.seed)
    results["grounded"] = grounded.summary()
    if args.llm_conversations > 0 or args.elpv > 0:
        from anomalygpt.assistant import build_assistant

        start = time.perf_counter()
        assistant = build_assistant(args.preset)
        results["assistant_weights"] = assistant.preset.assistant.weights or None  # None: untrained parts
        results["assistant_load_seconds"] = time.perf_counter() - start
        if args.llm_conversations > 0:
            guarded = AssistantAnswerer(assistant, guard=True)
            bare = AssistantAnswerer(assistant, guard=False, check=False)  # the model alone: no opening, no checker
            report = evaluate(data, records[: args.llm_conversations], asker(guarded), asker(bare), z, args.seed)
            results["assistant"] = report.summary()
            results["assistant_examples"] = [vars(turn) for turn in report.turns[:12]]
            failed = [turn for turn in report.turns if turn.contradicts or not all(turn.scores.values())]
            results["assistant_failures"] = [vars(turn) for turn in failed]
        if args.elpv > 0:
            results["elpv"] = elpv_agreement(assistant, args.elpv, args.seed)
    write_json_atomic(args.out / "bench_qa.json", results)
    shown = {k: v for k, v in results.items() if k not in ("assistant_examples", "assistant_failures")}
    print(json.dumps(shown, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
