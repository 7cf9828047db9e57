"""SmolLM2-135M-Instruct from its GGUF: cold start (convert once), warm start, greedy answer latency, peak RSS.

Converts into a fresh temp cache (or --cache-dir), checks that the converted model gives the same greedy tokens
as the GGUF-loaded one, then runs the warm path (load from the cache, answer one question) in a child process
so that its peak RSS is not inflated by the GGUF phase.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_llm.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TextIteratorStreamer

from anomalygpt import llm

QUESTION = [
    {"role": "system", "content": "You are an inspection assistant. Answer briefly."},
    {"role": "user", "content": "What does a scratch on a metal part usually look like in a photo?"},
]
ANSWER_TOKENS = 30


class TimedStreamer(TextIteratorStreamer):
    """Records when each generated token arrives (the prompt, sent first, is skipped)."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.token_times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            self.token_times.append(time.perf_counter())
        super().put(value)


def timed_answer(loaded: llm.LoadedLLM) -> dict[str, Any]:
    """Stream one greedy answer from a worker thread, as the chat UI will."""
    streamer = TimedStreamer(loaded.tokenizer)
    result: dict[str, list[int]] = {}
    start = time.perf_counter()
    worker = threading.Thread(
        target=lambda: result.update(ids=llm.generate_ids(loaded, QUESTION, ANSWER_TOKENS, streamer)), daemon=True
    )
    worker.start()
    chunks, first_text = [], None
    for chunk in streamer:
        if first_text is None and chunk:
            first_text = time.perf_counter() - start
        chunks.append(chunk)
    worker.join()
    return {
        "first_token_s": streamer.token_times[0] - start,
        "first_text_s": first_text,
        "answer_s": time.perf_counter() - start,
        "tokens": len(result["ids"]),
        "text": "".join(chunks).strip(),
        "ids": result["ids"],
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_rss_since_exec_mib() -> float:
    """VmHWM: unlike ru_maxrss, which Linux carries over from the forking parent, it restarts at exec."""
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def warm_run(cache: Path) -> dict[str, Any]:
    """A fresh process's view: load from the cache, answer twice (first call and a repeat)."""
    start = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401  (lazy modules)

    imports_s = time.perf_counter() - start
    start = time.perf_counter()
    loaded = llm.load_llm(llm.LLMConfig(cache_dir=str(cache)))
    load_s = time.perf_counter() - start
    first, repeat = timed_answer(loaded), timed_answer(loaded)
    return {
        "imports_s": imports_s,
        "load_s": load_s,
        "first": first,
        "repeat": repeat,
        "peak_rss_mib": peak_rss_since_exec_mib(),
    }


def cold_run(cache: Path) -> dict[str, Any]:
    """GGUF load + conversion, timed separately, then greedy parity between the two models."""
    gguf = llm.gguf_file(llm.DEFAULT_LLM)
    assert gguf is not None
    start = time.perf_counter()
    gguf_model, gguf_tokenizer = llm.load_gguf(gguf)
    gguf_s = time.perf_counter() - start
    start = time.perf_counter()
    llm.convert_to_plain(gguf_model, gguf_tokenizer, cache)
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    plain = llm.load_llm(llm.LLMConfig(cache_dir=str(cache)))
    reload_s = time.perf_counter() - start
    from_gguf = llm.LoadedLLM(gguf_model.eval(), gguf_tokenizer, plain.hidden_size)
    prompt_gguf = llm.chat_prompt_ids(gguf_tokenizer, QUESTION)
    prompt_plain = llm.chat_prompt_ids(plain.tokenizer, QUESTION)
    with torch.inference_mode():
        ids = torch.tensor([prompt_plain])
        logit_diff = float((gguf_model(ids).logits - plain.model(ids).logits).abs().max())
    return {
        "gguf_s": gguf_s,
        "convert_s": convert_s,
        "reload_s": reload_s,
        "cache_mib": sum(p.stat().st_size for p in cache.iterdir()) / 2**20,
        "same_prompt_ids": prompt_gguf == prompt_plain,
        "prompt_tokens": len(prompt_plain),
        "max_logit_diff": logit_diff,
        "ids_gguf": llm.generate_ids(from_gguf, QUESTION, ANSWER_TOKENS),
        "ids_plain": llm.generate_ids(plain, QUESTION, ANSWER_TOKENS),
        "peak_rss_mib": peak_rss_mib(),
    }


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    return (
        f"{os.cpu_count()}-core {cpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}, no GPU used"
    )


def report(cold: dict[str, Any], warm: dict[str, Any]) -> str:
    first, repeat = warm["first"], warm["repeat"]
    rows = [
        ("cold start: GGUF load (transformers dequantises Q4_1)", f"{cold['gguf_s']:.1f} s"),
        ("cold start: convert + atomic save_pretrained", f"{cold['convert_s']:.1f} s"),
        ("cold start: reload from the fresh cache", f"{cold['reload_s']:.1f} s"),
        (
            "cold start total (first `load_llm` on an empty cache)",
            f"**{cold['gguf_s'] + cold['convert_s'] + cold['reload_s']:.1f} s**",
        ),
        ("warm start, new process: transformers model classes (lazy import)", f"{warm['imports_s']:.2f} s"),
        ("warm start, new process: `load_llm` (cache hit)", f"**{warm['load_s']:.2f} s**"),
        ("cache folder size", f"{cold['cache_mib']:.0f} MiB (float32 safetensors + tokenizer)"),
        ("prompt tokens (chat template)", f"{cold['prompt_tokens']}"),
        (
            "first token, first answer / repeat",
            f"{first['first_token_s'] * 1000:.0f} ms / {repeat['first_token_s'] * 1000:.0f} ms",
        ),
        (
            "first streamed text, first answer / repeat",
            f"{first['first_text_s'] * 1000:.0f} ms / {repeat['first_text_s'] * 1000:.0f} ms",
        ),
        (
            f"{first['tokens']}-token greedy answer, first / repeat",
            f"{first['answer_s']:.2f} s / {repeat['answer_s']:.2f} s",
        ),
        (
            "decode speed (repeat, after the first token)",
            f"{(repeat['tokens'] - 1) / (repeat['answer_s'] - repeat['first_token_s']):.1f} tokens/s",
        ),
        ("peak RSS, warm process (load + 2 answers; VmHWM)", f"{warm['peak_rss_mib']:.0f} MiB"),
        ("peak RSS, cold process (GGUF + converted model both held; getrusage)", f"{cold['peak_rss_mib']:.0f} MiB"),
        (
            "greedy tokens GGUF model == converted model",
            f"{cold['ids_gguf'] == cold['ids_plain']} ({len(cold['ids_plain'])} tokens)",
        ),
        ("max abs logit difference on the prompt", f"{cold['max_logit_diff']:.2e}"),
    ]
    lines = ["| measure | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    return "\n".join(lines) + f"\n\nAnswer: {first['text']!r}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="empty or absent folder; default: a temp dir")
    parser.add_argument("--warm-only", action="store_true", help="internal: the child process's part")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    if args.warm_only:
        print(json.dumps(warm_run(args.cache_dir)))
        return 0
    with tempfile.TemporaryDirectory() as temp:
        cache = args.cache_dir or Path(temp) / "smollm2-135m-instruct"
        if llm.is_converted(cache):
            raise SystemExit(f"{cache} is already converted: give an empty folder to time the cold start")
        cold = cold_run(cache)
        child = [sys.executable, __file__, "--warm-only", "--cache-dir", str(cache)]
        warm = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    load_end = os.getloadavg()[0]
    print(
        f"Machine: {machine()}; 1-min load average {load_start:.1f} at the start, {load_end:.1f} at the end\n"
        f"Command: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} .venv/bin/python bench/bench_llm.py\n"
    )
    print(report(cold, warm))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
