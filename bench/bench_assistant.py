"""The shipped assistant's chat latency on this CPU: start-up, first streamed piece, whole answers, 30-token decodes.

What an operator waits for with the offline default preset (SmolLM2-135M + the trained LoRA, prompt learner and
projection): building the assistant, indexing 4 good odd-numbered ELPV cells, showing a defective odd-numbered
cell (inspection + the one image encoding), then per question the time to the first streamed piece and to the
whole answer (the grounded opening, the model's continuation, the claim checker). Questions after the first are
follow-ups: they reuse the cached inspection, embeddings and, with kv_cache, the keys/values of the prompt so far.

"decode30" isolates the language model: a follow-up question's prompt (system + facts + one earlier turn) and
exactly 30 new tokens, without and with the earlier turn's keys/values reused. Each timing is repeated
(--rounds) and reported with the 1-minute load average at the time, since other processes share the CPU.
Variants: the shipped float32 model, with the key/value cache off and on; dynamic int8 linear layers; bfloat16.
A variant's answers are compared with the float32 ones (the same text, and conflicts found by the checker).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_assistant.py --out runs/bench_assistant.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalygpt.io import write_json_atomic

QUESTIONS = (
    "Is there a defect in this cell?",
    "Where is it?",
    "How large is the biggest one?",
    "Why do you think so?",
    "What kind of defect could it be?",
    "What should I inspect more closely?",
)
VARIANTS = {  # name -> (llm dtype, llm quantize, kv cache)
    "float32 without kv cache": ("float32", "", False),
    "float32 (shipped)": ("float32", "", True),
    "int8 dynamic": ("float32", "int8", True),
    "bfloat16": ("bfloat16", "", True),
}
DECODE_TOKENS = 30


def odd_cells(cell_type: str, seed: int) -> tuple[list[Path], Path]:
    """4 good odd-numbered references and one defective odd-numbered query (ELPV's development half)."""
    from eval.datasets import load_split

    split = load_split("elpv", None, cell_type)
    odd = [p for p in sorted(split.reference_pool) if int(re.findall(r"\d+", p.stem)[-1]) % 2 == 1]
    defective = [s.path for s in split.test if int(re.findall(r"\d+", s.path.stem)[-1]) % 2 == 1]
    rng = np.random.default_rng(seed)
    references = [odd[i] for i in rng.permutation(len(odd))[:4]]
    return references, defective[int(rng.integers(len(defective)))]


def build(preset_name: str, dtype: str, quantize: str, kv_cache: bool) -> Any:
    from anomalygpt.assistant import build_assistant
    from anomalygpt.config import load_preset

    preset = load_preset(preset_name)
    preset = dataclasses.replace(
        preset,
        llm=dataclasses.replace(preset.llm, dtype=dtype, quantize=quantize),
        assistant=dataclasses.replace(preset.assistant, kv_cache=kv_cache),
    )
    return build_assistant(preset, inference=True)


def chat_round(assistant: Any, query: Path, fitted: Any) -> list[dict[str, Any]]:
    """One chat about the query: every question's first piece, whole answer, tokens and load average."""
    from anomalygpt.assistant import ChatSession

    session = ChatSession(assistant, class_name="solar cell")
    session.references = fitted
    session.show(query)
    turns = []
    for question in QUESTIONS:
        load = os.getloadavg()[0]
        watch, first, pieces = time.perf_counter(), None, []
        for piece in session.stream(question):
            first = time.perf_counter() - watch if first is None else first
            pieces.append(piece)
        answer = "".join(pieces).strip()
        report = session.history[-1].checks
        turns.append({
            "question": question,
            "answer": answer,
            "tokens": len(assistant.tokenizer.encode(answer, add_special_tokens=False)),
            "first_piece_s": first,
            "answer_s": time.perf_counter() - watch,
            "load_average": load,
            "repairs": dict(report.paths()) if report is not None else {},
        })  # fmt: skip
    return turns


@torch.inference_mode()
def decode30(assistant: Any, session_prompt: tuple[list[int], list[int]], visual: torch.Tensor, cached: bool) -> float:
    """Seconds for the model to take a follow-up prompt and generate exactly DECODE_TOKENS tokens; with `cached`,
    the earlier turn's keys/values are reused (computed beforehand, as the previous answer would have)."""
    from transformers import DynamicCache

    earlier, prompt = session_prompt
    embeds = assistant.input_embeddings(torch.tensor([prompt]), visual[None])  # (1, L, hidden)
    cache = DynamicCache()
    if cached:
        assistant.llm(inputs_embeds=embeds[:, : len(earlier)], cache=cache, use_cache=True)
    pad = assistant.tokenizer.eos_token_id
    watch = time.perf_counter()
    assistant.llm.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        max_new_tokens=DECODE_TOKENS,
        min_new_tokens=DECODE_TOKENS,
        do_sample=False,
        pad_token_id=pad,
        cache=cache,
    )
    return time.perf_counter() - watch


def follow_up_prompt(assistant: Any, fitted: Any, query: Path) -> tuple[tuple[list[int], list[int]], torch.Tensor]:
    """(the ids the first turn leaves cached for the second: its prompt and answer as the second prompt repeats
    them, the second turn's prompt) and the visual tokens."""
    from anomalygpt.assistant import ChatSession, chat_messages, system_text, template_ids

    session = ChatSession(assistant, class_name="solar cell")
    session.references = fitted
    session.show(query)
    first = session.ask(QUESTIONS[0])
    system = system_text(session.inspection)
    prompt = assistant.prompt_ids(system, [(QUESTIONS[0], first)], QUESTIONS[1])
    answered = template_ids(assistant.tokenizer, chat_messages(system, [(QUESTIONS[0], first)], assistant.n_visual))
    common = next((i for i, (a, b) in enumerate(zip(answered, prompt, strict=False)) if a != b), len(answered))
    assert session.context is not None
    return (answered[: min(common, len(prompt) - 1)], prompt), session.context.visual


def run_variants(names: list[str], args: argparse.Namespace, references: list[Path], query: Path) -> dict[str, Any]:
    """Every variant built once, then timed in interleaved rounds (variant after variant within a round), so a
    change of load on the shared CPU falls on all of them alike."""
    built: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        watch = time.perf_counter()
        assistant = build(args.preset, *VARIANTS[name])
        fitted = assistant.inspector.fit(references)
        prompt, visual = follow_up_prompt(assistant, fitted, query)
        built[name] = (assistant, fitted, prompt, visual)
        results[name] = {"startup_s": time.perf_counter() - watch, "rounds": [], "prompt_tokens": len(prompt[1]),
                         "cached_prefix_tokens": len(prompt[0])}  # fmt: skip
        results[name] |= {"decode30_no_cache_s": [], "decode30_cached_s": [], "decode30_load_average": []}
    for _ in range(args.rounds):
        for name in names:
            assistant, fitted, prompt, visual = built[name]
            results[name]["rounds"].append(chat_round(assistant, query, fitted))
            for cached in (False, True):
                results[name]["decode30_load_average"].append(os.getloadavg()[0])
                key = "decode30_cached_s" if cached else "decode30_no_cache_s"
                results[name][key].append(decode30(assistant, prompt, visual, cached))
    return results


def summary(result: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Medians over rounds: first piece, whole answer, 30-token decodes; answers that differ from the baseline."""
    turns = [turn for round_ in result["rounds"] for turn in round_]
    out = {
        "first_piece_s_median": statistics.median(t["first_piece_s"] for t in turns),
        "first_piece_s_max": max(t["first_piece_s"] for t in turns),
        "answer_s_median": statistics.median(t["answer_s"] for t in turns),
        "answer_s_max": max(t["answer_s"] for t in turns),
        "follow_up_answer_s_median": statistics.median(
            t["answer_s"] for round_ in result["rounds"] for t in round_[1:]
        ),
        "decode30_no_cache_s_median": statistics.median(result["decode30_no_cache_s"]),
        "decode30_cached_s_median": statistics.median(result["decode30_cached_s"]),
        "load_average_median": statistics.median(t["load_average"] for t in turns),
        "answers_with_repairs": sum(bool(t["repairs"]) for t in turns),
    }
    if baseline is not None:
        base = [t["answer"] for t in baseline["rounds"][0]]
        mine = [t["answer"] for t in result["rounds"][0]]
        out["answers_differing_from_float32"] = sum(a != b for a, b in zip(base, mine, strict=True))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="repeats of every timing")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_assistant.json"))
    args = parser.parse_args()
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    references, query = odd_cells("mono", args.seed)
    results = run_variants(names, args, references, query)
    for name in names:
        baseline = results.get("float32 (shipped)") if name != "float32 (shipped)" else None
        results[name]["summary"] = summary(results[name], baseline)
        print(name, json.dumps(results[name]["summary"], indent=1), flush=True)
    threads = os.environ.get("OMP_NUM_THREADS")
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}, torch {torch.__version__}"
    record = {
        "machine": machine,
        "preset": args.preset,
        "query": str(query),
        "references": [str(p) for p in references],
        "variants": results,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    write_json_atomic(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
