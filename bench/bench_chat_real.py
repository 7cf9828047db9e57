"""Verified chat on real ELPV cells: operators' questions in multi-turn chats, every stated fact scored.

Cells: odd-numbered ELPV cells only (the development half), both cell types, defective (p >= 2/3) and good;
references: 4 good odd-numbered cells of the type (seeded draw; --references N for a profile-like pool, whose
conformal threshold gives every inspection a p-value), never a query. Per cell one chat of --turns
questions from eval.chat_scorer.BANK: every question kind once, then further kinds drawn at random, in a seeded
random order, each in one of its phrasings. The assistant is the preset's (SmolLM2-135M + LoRA by default) with
solar-cell defect types, answering through anomalygpt.assistant.ChatSession: grounded opening, the model's
continuation, the claim checker. Every answer is scored twice by eval.chat_scorer (written apart from the checker):
as generated (opening + the model's text, before the checker) and as shown; usefulness per kind by its rules.

--mode bare asks the same questions without the grounded opening (the model alone, still checked): how often
the model contradicts the inspection on its own and what the checker does about it. Resumable: each finished
cell's chat goes to --out/chats.jsonl (chats_bare.jsonl) at once and is skipped on a rerun; --cells limits
the cells (the first N of the seeded plan, so a small run is a prefix of a large one); --report-only re-scores.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_chat_real.py --out runs/bench_chat_real
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from anomalygpt.claims import ClaimChecker
from anomalygpt.evidence import RegionEvidence
from anomalygpt.grounded import DefectType, answer_text, chat_grounds
from anomalygpt.guard import read_question
from anomalygpt.inspection import Inspection
from anomalygpt.io import write_json_atomic
from anomalygpt.regions import Region
from eval.chat_scorer import BANK, KINDS, BankQuestion, Case, score_answer

# Solar-cell defect families, as a preset's assistant.defect_types would give them.
SOLAR_CELL_TYPES = (
    DefectType("crack", "a dark line across the cell", shapes=("elongated",), contrasts=("darker", "similar")),
    DefectType(
        "finger interruption", "a short break of a contact finger", contrasts=("darker",), sizes=("small", "medium")
    ),
    DefectType("dark area", "an inactive, darker part of the cell", ("compact",), ("darker",), ("medium", "large")),
    DefectType("edge defect", "a chipped or dark cell edge", contrasts=("darker", "brighter"), positions=("edge",)),
)
CELL_TYPES = ("mono", "poly")
WHEN = ("before checker", "after checker", "after final checker")


def cell_number(path: Path) -> int:
    return int(re.search(r"(\d+)", path.name).group(1))  # type: ignore[union-attr]


def plan(n_cells: int, seed: int, n_references: int = 4) -> list[dict[str, Any]]:
    """The cells in run order: per type, n references, then good and defective queries alternating, types too."""
    from eval.datasets import load_split

    per_type: dict[str, list[dict[str, Any]]] = {}
    for cell_type in CELL_TYPES:
        split = load_split("elpv", None, cell_type)
        good = sorted(p for p in split.reference_pool if cell_number(p) % 2 == 1)
        defective = sorted(s.path for s in split.test if cell_number(s.path) % 2 == 1)
        rng = np.random.default_rng([seed, CELL_TYPES.index(cell_type)])
        order = rng.permutation(len(good))
        references = [str(good[i]) for i in order[:n_references]]
        good_queries = [good[i] for i in order[n_references:]]
        bad_queries = [defective[i] for i in rng.permutation(len(defective))]
        chosen = [q for pair in zip(bad_queries, good_queries, strict=False) for q in pair]
        per_type[cell_type] = [
            {"cell": p.name, "path": str(p), "type": cell_type, "label": "defective" if p in defective else "good",
             "references": references}
            for p in chosen
        ]  # fmt: skip
    mixed = [cell for pair in zip(*per_type.values(), strict=False) for cell in pair]
    return mixed[:n_cells]


def chat_plan(cell: str, turns: int, seed: int) -> list[BankQuestion]:
    """Every kind once, then random kinds, shuffled; each kind in one of its phrasings."""
    rng = np.random.default_rng([seed, cell_number(Path(cell))])
    by_kind = {kind: [q for q in BANK if q.kind == kind] for kind in KINDS}
    kinds = list(KINDS) + [KINDS[int(i)] for i in rng.integers(len(KINDS), size=max(0, turns - len(KINDS)))]
    chosen = [by_kind[kind][int(rng.integers(len(by_kind[kind])))] for kind in kinds[:turns]]
    return [chosen[int(i)] for i in rng.permutation(len(chosen))]


def load_average() -> float:
    return os.getloadavg()[0]


def run_cell(session: Any, cell: dict[str, Any], turns: int, seed: int) -> dict[str, Any]:
    """One chat about one cell: every answer with its timing and the checker's report."""
    start = time.perf_counter()
    inspection = session.show(cell["path"], source=cell["cell"])
    show_s = time.perf_counter() - start
    evidence = session.evidence() or []
    answers = []
    for question in chat_plan(cell["cell"], turns, seed):
        watch, first, pieces = time.perf_counter(), None, []
        for piece in session.stream(question.text):
            first = time.perf_counter() - watch if first is None else first
            pieces.append(piece)
        turn = session.history[-1]
        report = turn.checks
        answers.append({
            **dataclasses.asdict(question),
            "answer": turn.answer,
            "raw": report.raw if report is not None else turn.answer,
            "paths": dict(report.paths()) if report is not None else {},
            "facts": dict(report.facts()) if report is not None else {},
            "repairs": [vars(r) | {"facts": list(r.facts)} for r in report.repairs] if report is not None else [],
            "first_piece_s": first,
            "answer_s": time.perf_counter() - watch,
        })  # fmt: skip
    return {
        **cell,
        "inspection": inspection.to_dict(),
        "evidence": [item.to_dict() for item in evidence],
        "show_s": show_s,
        "load_average": load_average(),
        "answers": answers,
    }


def inspection_from(data: dict[str, Any]) -> Inspection:
    fields = {f.name for f in dataclasses.fields(Inspection)}
    values = {key: value for key, value in data.items() if key in fields}
    values["regions"] = [Region.from_dict(region) for region in data["regions"]]
    values["image_size"] = tuple(data["image_size"])
    return Inspection(**values)


def evidence_from(items: list[dict[str, Any]]) -> tuple[RegionEvidence, ...]:
    return tuple(RegionEvidence(**{**item, "box": tuple(item["box"])}) for item in items)


def score(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kind: answers, contradictions before and after the checker, repair paths, usefulness."""
    rows: dict[str, Counter[str]] = defaultdict(Counter)
    failures: list[dict[str, Any]] = []
    for record in records:
        case = Case(inspection_from(record["inspection"]), evidence_from(record["evidence"]), SOLAR_CELL_TYPES)
        for turn, answer in enumerate(record["answers"]):
            kind = answer["kind"]
            shown = score_answer(answer["answer"], kind, case, answer["polarity"], answer["focus"])
            raw = score_answer(answer["raw"], kind, case, answer["polarity"], answer["focus"])
            earlier = [(a["text"], a["answer"]) for a in record["answers"][:turn]]
            final = score_answer(rechecked(answer, case, earlier), kind, case, answer["polarity"], answer["focus"])
            row = rows[kind]
            row["answers"] += 1
            row["contradicting before checker"] += bool(raw.contradictions)
            row["contradicting after checker"] += bool(shown.contradictions)
            row["contradicting after final checker"] += bool(final.contradictions)
            row["useful"] += shown.useful
            row["useful with final checker"] += final.useful
            row["model added text"] += answer["raw"].strip() != answer["answer"].strip() or bool(answer["paths"])
            row.update({f"path {path}": count for path, count in answer["paths"].items()})
            if shown.contradictions or not shown.useful:
                failures.append({"cell": record["cell"], "question": answer["text"], "answer": answer["answer"],
                                 "contradictions": shown.contradictions, "why_not": shown.why_not})  # fmt: skip
    total: Counter[str] = sum(rows.values(), Counter())
    return {"per_kind": {kind: dict(rows[kind]) for kind in KINDS}, "total": dict(total), "failures": failures}


def rechecked(answer: dict[str, Any], case: Case, earlier: list[tuple[str, str]]) -> str:
    """The answer as the current claim checker shows it, re-applied to what the model generated in the run (the
    grounded opening is rebuilt, after the chat's `earlier` answers; a cut-off last sentence was cut when the run
    dropped one as unfinished)."""
    question = read_question(answer["text"], SOLAR_CELL_TYPES)
    grounds = chat_grounds(case.inspection, case.evidence, SOLAR_CELL_TYPES, earlier)
    opening = answer_text(question, grounds)
    raw = answer["raw"]
    generated = raw[len(opening) :] if raw.startswith(opening) else raw
    checker = ClaimChecker(grounds, question)
    checker.truncated = lambda: "unfinished" in answer["paths"]
    return "".join(checker.stream([generated], opening if raw.startswith(opening) else "")).strip()


def summary_table(scored: dict[str, Any]) -> str:
    paths = ("replaced", "dropped", "off_topic", "repeat", "unfinished")
    head = "| kind | answers | contradicting before checker | after | after (final checker) | "
    head += " | ".join(paths) + " | useful | useful (final checker) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for kind, row in [*scored["per_kind"].items(), ("all", scored["total"])]:
        n = row.get("answers", 0)
        if not n:
            continue
        cells = [str(n)] + [str(row.get(f"contradicting {when}", 0)) for when in WHEN]
        cells += [str(row.get(f"path {path}", 0)) for path in paths]
        cells += [f"{row.get('useful', 0) / n:.1%}", f"{row.get('useful with final checker', 0) / n:.1%}"]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing(records: list[dict[str, Any]]) -> dict[str, Any]:
    first = [a["first_piece_s"] for r in records for a in r["answers"] if a["first_piece_s"] is not None]
    whole = [a["answer_s"] for r in records for a in r["answers"]]
    loads = [r["load_average"] for r in records]
    return {
        "first_piece_s_median": float(np.median(first)) if first else None,
        "first_piece_s_p95": float(np.percentile(first, 95)) if first else None,
        "answer_s_median": float(np.median(whole)) if whole else None,
        "answer_s_p95": float(np.percentile(whole, 95)) if whole else None,
        "load_average_median": float(np.median(loads)) if loads else None,
    }


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_assistant_for(preset_name: str, quantize: str) -> Any:
    """The preset's assistant with the solar-cell defect types, built for chat as the front ends build it."""
    from anomalygpt.assistant import build_assistant
    from anomalygpt.config import load_preset

    preset = load_preset(preset_name)
    preset = dataclasses.replace(
        preset,
        assistant=dataclasses.replace(preset.assistant, defect_types=SOLAR_CELL_TYPES),
        llm=dataclasses.replace(preset.llm, quantize=quantize),
    )
    return build_assistant(preset, inference=True)


def run(cells: list[dict[str, Any]], args: argparse.Namespace, log: Path, records: list[dict[str, Any]]) -> None:
    """Chat about every cell, one session per cell type (its references indexed once); each chat logged at once."""
    from anomalygpt.assistant import ChatSession

    assistant = build_assistant_for(args.preset, args.quantize)
    sessions: dict[str, ChatSession] = {}
    start = time.perf_counter()
    with log.open("a") as sink:
        for number, cell in enumerate(cells, start=1):
            if cell["type"] not in sessions:
                guard = args.mode == "guarded"
                sessions[cell["type"]] = ChatSession(assistant, class_name="solar cell", guard=guard, check=True)
                sessions[cell["type"]].set_references(cell["references"], cell["references"])
            record = run_cell(sessions[cell["type"]], cell, args.turns, args.seed)
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            records.append(record)
            print(f"[{number}/{len(cells)}] {cell['cell']} {cell['type']} {cell['label']}: "
                  f"{record['inspection']['verdict']}, {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_chat_real"))
    parser.add_argument("--cells", type=int, default=104, help="cells to chat about (both types, both labels)")
    parser.add_argument("--turns", type=int, default=20, help="questions per chat")
    parser.add_argument("--references", type=int, default=4, help="good cells of the type indexed as references")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="score the chats already in --out")
    parser.add_argument("--quantize", choices=("", "int8"), default="", help="the LLM's quantisation (llm.quantize)")
    parser.add_argument(
        "--mode",
        choices=("guarded", "bare"),
        default="guarded",
        help="guarded: the product (grounded opening, then the model, checked); bare: the model alone, checked",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / ("chats.jsonl" if args.mode == "guarded" else "chats_bare.jsonl")
    records = read_records(log)
    done = {record["cell"] for record in records}
    cells = [cell for cell in plan(args.cells, args.seed, args.references) if cell["cell"] not in done]
    start = time.perf_counter()
    if cells and not args.report_only:
        run(cells, args, log, records)
    scored = score(records)
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    verdicts = Counter((r["type"], r["label"], r["inspection"]["verdict"]) for r in records)
    result = {
        "command": " ".join(sys.argv),
        "machine": machine,
        "cells": len(records),
        "answers": scored["total"].get("answers", 0),
        "cells_by_type_label_verdict": {" / ".join(key): n for key, n in sorted(verdicts.items())},
        "this_run_wall_s": time.perf_counter() - start,
        "timing": timing(records),
        **scored,
    }
    write_json_atomic(args.out / f"results_{args.mode}.json", result)
    print(summary_table(scored))
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_kind", "failures")}, indent=1))
    print(f"{len(scored['failures'])} answers contradicting or not useful; see {args.out}/results_{args.mode}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
