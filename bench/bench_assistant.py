"""The shipped assistant's chat latency on this CPU: start-up, first token, a follow-up answer, peak RSS.

What an operator waits for with the offline default preset (SmolLM2-135M + the trained LoRA, prompt learner and
projection): building the assistant (LLM from its converted cache, trained parts, Inspector), indexing 4 good
ELPV cells, showing a defective cell (inspection + the one image encoding), then per question the time to the
first streamed piece and to the whole answer. Questions after the first are follow-ups: they reuse the cached
inspection and embeddings. Every answer's token count is reported beside its time.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_assistant.py --out runs/bench_assistant.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from anomalygpt.io import write_json_atomic

QUESTIONS = (
    "Is there a defect in this cell?",
    "Describe what you see.",
    "Where is it, and how large?",
    "What should I inspect more closely?",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_assistant.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    from anomalygpt.assistant import ChatSession, build_assistant
    from eval.datasets import draw_shots, load_split

    assistant = build_assistant(args.preset)
    startup_s = time.perf_counter() - start
    references, test = draw_shots(load_split("elpv", None, "mono"), 4, args.seed)
    defective = [sample for sample in test if sample.label == 1]
    query = defective[int(np.random.default_rng(args.seed).integers(len(defective)))]
    session = ChatSession(assistant, class_name="solar cell")
    watch = time.perf_counter()
    session.set_references(references)
    index_s = time.perf_counter() - watch
    watch = time.perf_counter()
    inspection = session.show(query.path)
    show_s = time.perf_counter() - watch
    turns: list[dict[str, Any]] = []
    for question in QUESTIONS:
        watch, first, pieces = time.perf_counter(), None, []
        for piece in session.stream(question):
            first = time.perf_counter() - watch if first is None else first
            pieces.append(piece)
        answer = "".join(pieces).strip()
        tokens = len(assistant.tokenizer.encode(answer, add_special_tokens=False))
        turn = {"question": question, "answer": answer, "tokens": tokens, "guarded": session.history[-1].guarded}
        turns.append(turn | {"first_piece_s": first, "answer_s": time.perf_counter() - watch})
        print(f"{turns[-1]['first_piece_s']:.2f} s / {turns[-1]['answer_s']:.2f} s, {tokens} tokens: {answer}")
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        "preset": args.preset,
        "weights": assistant.preset.assistant.weights,
        "query": str(query.path),
        "verdict": inspection.verdict,
        "startup_s": startup_s,
        "index_4_references_s": index_s,
        "show_image_s": show_s,
        "turns": turns,
        "peak_rss_mb": peak_kb / 1024,
    }
    write_json_atomic(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "turns"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
