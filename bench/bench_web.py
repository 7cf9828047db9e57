"""Web app latency: page ready after `anomalygpt ui` starts, and question -> first streamed token in the page.

Part 1 launches `anomalygpt ui` (the real command, default answerer choice) as a child process and times, from
the launch, when it prints that it serves (models loaded) and when headless Chromium has the page ready.
Part 2 serves the app in this process and, per answerer, asks the same questions in the page and directly,
alternating the two so that load from other jobs hits both alike. "In the page" runs from the Enter keydown to
the first non-empty text of the answer in the DOM (both clocks in the page); "direct" from calling
`answerer.stream(...)` to its first non-empty piece. The chat is cleared before each question, so both see an
empty history. Answerers: the grounded templates; SmolLM2-135M answering from the Inspection's facts text (a
plain LLM with a real first-token latency; --no-llm skips it); and with --assistant the project's assistant
(anomalygpt.assistant: SmolLM2 + LoRA + visual tokens + guard, untrained parts unless the preset names weights)
behind anomalygpt.answerers.AssistantAnswerer.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_web.py
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import gradio as gr
import numpy as np
import skimage.data
import torch
from PIL import Image
from playwright.sync_api import Page, sync_playwright

from anomalygpt.answerers import Answerer, AssistantAnswerer, GroundedAnswerer, Turn
from anomalygpt.config import load_preset
from anomalygpt.inspection import Inspection, build_inspector
from anomalygpt.io import load_image
from chat.web import WebApp, build_blocks, serve

CHROMIUM = "/usr/bin/chromium"
QUESTIONS = (
    "Is there an anomaly in this image?",
    "Where is the defect?",
    "How big is it?",
    "How confident are you?",
    "What should I check next?",
    "How many defects do you see?",
    "What does the anomaly look like?",
    "Is it near the edge?",
)
LLM_TOKENS = 24
LLM_SYSTEM = "You are an industrial inspection assistant. Answer in one sentence, using only these facts:\n"
SIDE = 256
# Installs a watcher that resolves with the ms from the Enter keydown to the answer's first text.
FIRST_TOKEN_JS = """() => {
  const bots = () => document.querySelectorAll('#chat [data-testid=bot]');
  const box = document.querySelector('#question textarea');
  window.__firstToken = new Promise(resolve => {
    let start = null;
    box.addEventListener('keydown', e => { if (e.key === 'Enter') start = performance.now(); },
                         {capture: true, once: true});
    const observer = new MutationObserver(() => {
      const all = bots();
      if (start !== null && all.length > 0 && all[all.length - 1].innerText.trim().length > 0) {
        observer.disconnect();
        resolve(performance.now() - start);
      }
    });
    observer.observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true});
  });
}"""


class Recorded:
    """An answerer that signals when each answer has been streamed to its end."""

    def __init__(self, inner: Answerer) -> None:
        self.inner, self.done = inner, threading.Event()

    def stream(
        self, question: str, history: Sequence[Turn], inspection: Inspection, image: np.ndarray
    ) -> Iterator[str]:
        try:
            yield from self.inner.stream(question, history, inspection, image)
        finally:
            self.done.set()


class FactsLLM:
    """SmolLM2 answering from the Inspection's facts text: a stand-in for the assistant's first-token latency."""

    def __init__(self) -> None:
        from anomalygpt import llm

        self.llm, self.loaded = llm, llm.load_llm(llm.LLMConfig())

    def stream(
        self, question: str, history: Sequence[Turn], inspection: Inspection, image: np.ndarray
    ) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        messages = [{"role": "system", "content": LLM_SYSTEM + inspection.facts()}]
        for asked, answered in history:
            messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
        messages.append({"role": "user", "content": question})
        streamer = TextIteratorStreamer(self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(
            target=self.llm.generate_ids, args=(self.loaded, messages, LLM_TOKENS, streamer), daemon=True
        )
        worker.start()
        yield from (text for text in streamer if text)
        worker.join()


def scene(folder: Path) -> tuple[Path, list[Path]]:
    """A grass crop with a dark blob, and two good crops."""
    grass = skimage.data.grass()
    query = np.ascontiguousarray(grass[200 : 200 + SIDE, 250 : 250 + SIDE])
    cv2.circle(query, (80, 128), 30, 20, thickness=-1)
    refs = [folder / "ref0.png", folder / "ref1.png"]
    Image.fromarray(np.ascontiguousarray(grass[:SIDE, :SIDE])).save(refs[0])
    Image.fromarray(np.ascontiguousarray(grass[:SIDE, 256 : 256 + SIDE])).save(refs[1])
    Image.fromarray(query).save(folder / "query.png")
    return folder / "query.png", refs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ready_after_launch(browser: Any, preset: str) -> dict[str, float]:
    """Seconds from launching `anomalygpt ui` to its 'Serving on' line and to a ready page."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "anomalygpt"), "ui", "--preset", preset, "--port", str(port)]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    serving: dict[str, float] = {}

    def watch() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("Serving on") and "s" not in serving:
                serving["s"] = time.perf_counter() - start
                serving["answerer"] = line.split(" with ")[-1].split()[0]  # type: ignore[assignment]

    threading.Thread(target=watch, daemon=True).start()
    page = browser.new_page()
    try:
        while True:
            try:
                page.goto(f"http://127.0.0.1:{port}/", timeout=5000)
                page.wait_for_selector("#question textarea", timeout=30000)
                break
            except Exception:
                if child.poll() is not None:
                    raise SystemExit(f"`{shlex.join(command)}` exited with {child.returncode}") from None
                time.sleep(0.2)
        ready = time.perf_counter() - start
    finally:
        page.close()
        child.terminate()
        child.wait(timeout=30)
    return {"serving_s": serving.get("s", float("nan")), "ready_s": ready, "answerer": serving.get("answerer", "?")}


def open_inspected_page(browser: Any, url: str, query: Path, refs: list[Path]) -> Page:
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#question textarea")
    page.set_input_files("#query input[type=file]", str(query))
    page.wait_for_function("document.querySelector('#status').innerText.includes('loaded')")
    page.set_input_files("input[type=file][multiple]", [str(path) for path in refs])
    page.wait_for_function("document.querySelector('#status').innerText.includes('2 good reference(s)')")
    page.click("#inspect")
    page.wait_for_function("document.querySelector('#verdict [data-verdict]').dataset.verdict !== ''", timeout=60000)
    return page


def page_first_token_ms(page: Page, answerer: Recorded, question: str) -> float:
    page.click("#clear-chat")
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=bot]').length === 0")
    answerer.done.clear()
    page.evaluate(FIRST_TOKEN_JS)
    page.fill("#question textarea", question)
    page.press("#question textarea", "Enter")
    elapsed = float(page.evaluate("window.__firstToken"))
    if not answerer.done.wait(120):
        raise SystemExit(f"no end of the answer to {question!r} after 120 s")
    time.sleep(0.2)  # the last pieces reach the page
    return elapsed


def direct_first_token_ms(answerer: Answerer, question: str, inspection: Inspection, image: np.ndarray) -> float:
    start = time.perf_counter()
    pieces = answerer.stream(question, [], inspection, image)
    next(piece for piece in pieces if piece)
    elapsed = (time.perf_counter() - start) * 1000
    for _ in pieces:  # finish the answer, as the page does
        pass
    return elapsed


def first_tokens(browser: Any, name: str, answerer: Answerer, inspector: Any, files: tuple[Path, list[Path]]) -> dict:
    query, refs = files
    image = load_image(query)
    inspection = inspector.inspect(image, inspector.fit([load_image(path) for path in refs]), source=query.name)
    recorded = Recorded(answerer)
    blocks = build_blocks(WebApp(inspector, recorded, "bench"))
    port = free_port()
    serve(blocks, "127.0.0.1", port, block=False)
    page = open_inspected_page(browser, f"http://127.0.0.1:{port}/", query, refs)
    direct, in_page = [], []
    try:
        page_first_token_ms(page, recorded, "warm-up: is it defective?")  # first event compiles JS paths
        direct_first_token_ms(answerer, "warm-up: is it defective?", inspection, image)
        for number, question in enumerate(QUESTIONS):  # alternate which goes first
            if number % 2:
                in_page.append(page_first_token_ms(page, recorded, question))
            direct.append(direct_first_token_ms(answerer, question, inspection, image))
            if not number % 2:
                in_page.append(page_first_token_ms(page, recorded, question))
    finally:
        page.close()
        blocks.close()
    return {"name": name, "direct": direct, "page": in_page}


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    chromium = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip()
    return (
        f"{os.cpu_count()}-core {cpu}, no GPU; Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), gradio {gr.__version__}, {chromium} headless; "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )


def report(launches: list[dict[str, Any]], rows: list[dict[str, Any]], preset: str) -> str:
    lines = [
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} .venv/bin/python {shlex.join(sys.argv)}`",
        f"Machine: {machine()}",
        "",
        f"| launch of `anomalygpt ui --preset {preset}` | answerer | models loaded ('Serving on') | page ready |",
        "|---|---|---|---|",
        *(
            f"| {i + 1} | {run['answerer']} | {run['serving_s']:.1f} s | **{run['ready_s']:.1f} s** |"
            for i, run in enumerate(launches)
        ),
        "",
        "Goal (issue 7): the first token in the page within 20% of the answerer's own (page / direct <= 1.2).",
        "",
        "| answerer | questions | first token, direct (median) | first token, in the page (median) "
        "| page overhead | page / direct |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        direct, page = statistics.median(row["direct"]), statistics.median(row["page"])
        lines.append(
            f"| {row['name']} | {len(row['page'])} | {direct:.1f} ms | {page:.1f} ms | {page - direct:+.1f} ms "
            f"| **{page / direct:.2f}x** |"
        )
    lines.append("")
    for row in rows:
        lines.append(
            f"{row['name']}: direct ms {[round(v, 1) for v in row['direct']]}, "
            f"page ms {[round(v, 1) for v in row['page']]}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--launches", type=int, default=2, help="times to launch `anomalygpt ui` for part 1")
    parser.add_argument("--no-llm", action="store_true", help="skip the SmolLM2 answerer in part 2")
    parser.add_argument("--assistant", action="store_true", help="also time anomalygpt.assistant in part 2")
    args = parser.parse_args()
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as temp:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        launches = [ready_after_launch(browser, args.preset) for _ in range(args.launches)]
        inspector = build_inspector(load_preset(args.preset))
        files = scene(Path(temp))
        answerers: list[tuple[str, Any]] = [("grounded templates", GroundedAnswerer())]
        if not args.no_llm:
            answerers.append((f"SmolLM2-135M over the facts ({LLM_TOKENS} tokens)", FactsLLM()))
        if args.assistant:
            from anomalygpt.assistant import build_assistant

            preset = inspector.preset
            short = replace(preset, assistant=replace(preset.assistant, max_new_tokens=LLM_TOKENS))
            assistant = AssistantAnswerer(build_assistant(short, inspector))
            answerers.append((f"anomalygpt.assistant, untrained parts ({LLM_TOKENS} tokens)", assistant))
        rows = [first_tokens(browser, name, answerer, inspector, files) for name, answerer in answerers]
        browser.close()
    print(report(launches, rows, args.preset))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
