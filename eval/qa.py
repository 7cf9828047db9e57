"""Assistant accuracy on simulated conversations: yes/no, places, counts, sizes, confidence, contradictions.

Conversations come from an `anomalygpt simulate` folder (for a fair figure, made from normals no training saw).
Each is replayed turn by turn: the answerer gets the Inspection the conversation's answers state (built as
stage-2 training builds it: train.assistant.record_inspection, with a map made from the true mask), the image,
and its own earlier answers as history. Scored per turn:
- yes/no ("anomaly" turns): the verdicts the answer states (guard.answer_claims) are exactly the true one;
- location ("where" turns on anomalous images): the set of location words stated equals the regions' set;
- count ("count" turns): the first number stated (digits or words; "no"/"none" = 0) equals the region count;
- size ("size" turns on anomalous images): every region's area is stated, as `format_pct` writes it, and no
  percentage other than those and their total;
- confidence ("confidence" turns): the confidence words stated (low, medium, high) are exactly the true one;
- contradiction (every turn): the answer states a verdict other than the Inspection's (guard.contradicts).
For an answerer with a guard, the turns the guard may prefill (GUARDED_INTENTS) are also answered unguarded, to
report the bare model's own accuracy and how often it would have contradicted the Inspection.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from anomalygpt.grounded import without_preamble
from anomalygpt.guard import answer_claims, contradicts
from anomalygpt.inspection import Inspection
from anomalygpt.io import load_image
from anomalygpt.regions import LOCATION_WORDS, NUMBER_WORDS, format_pct

# Longest first, so "top left" is read as one word and not also as "top" and "left".
LOCATION_PATTERN = re.compile(
    r"\b(" + "|".join(sorted((re.escape(w) for w in (*LOCATION_WORDS, "centre")), key=len, reverse=True)) + r")\b",
    re.IGNORECASE,
)
NUMBER_PATTERN = re.compile(r"\b(\d+|" + "|".join(NUMBER_WORDS) + r"|none|no)\b", re.IGNORECASE)
PERCENT_PATTERN = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s?%")
CONFIDENCE_PATTERN = re.compile(r"\b(low|medium|high)\b", re.IGNORECASE)
FIGURES = ("yes_no", "location", "count", "size", "confidence")
# anomalygpt.guard.expected_opening prefills these
GUARDED_INTENTS = ("anomaly", "where", "count", "size", "appearance", "confidence")

Ask = Callable[[str, Sequence[tuple[str, str]], Inspection, np.ndarray], str]  # question, history -> answer


def stated_locations(answer: str) -> set[str]:
    """The 3x3 grid words an answer names ('centre' read as 'center')."""
    return {"center" if word.lower() == "centre" else word.lower() for word in LOCATION_PATTERN.findall(answer)}


def stated_percentages(answer: str) -> set[str]:
    """The percentages an answer states, as written ('6.1%', '12%')."""
    return {f"{number}%" for number in PERCENT_PATTERN.findall(answer)}


def sizes_right(answer: str, area_pct: Sequence[float]) -> bool:
    """Every region's area stated, and no percentage but those and their total."""
    areas = {format_pct(pct) for pct in area_pct}
    stated = stated_percentages(answer)
    return areas <= stated <= areas | {format_pct(sum(area_pct))}


def stated_count(answer: str) -> int | None:
    """The first number an answer states: digits or a number word, 'no'/'none' as 0; None without one."""
    found = NUMBER_PATTERN.search(answer)
    if found is None:
        return None
    word = found.group(1).lower()
    if word.isdigit():
        return int(word)
    return 0 if word in ("none", "no") else NUMBER_WORDS.index(word)


def turn_scores(turn: dict[str, Any], answer: str) -> dict[str, bool]:
    """The figures this turn counts towards, each True when the answer is right."""
    truth, intent = turn["truth"], turn["intent"]
    scores = {}
    if intent == "anomaly":
        scores["yes_no"] = answer_claims(answer, turn["question"]) == {bool(truth["anomalous"])}
    if intent == "where" and truth["locations"]:
        scores["location"] = stated_locations(answer) == set(truth["locations"])
    if intent == "count":
        scores["count"] = stated_count(answer) == int(truth["count"])
    if intent == "size" and truth["area_pct"]:
        scores["size"] = sizes_right(answer, truth["area_pct"])
    if intent == "confidence":
        scores["confidence"] = {word.lower() for word in CONFIDENCE_PATTERN.findall(answer)} == {truth["confidence"]}
    return scores


@dataclass
class TurnResult:
    conversation: str
    intent: str
    question: str
    answer: str
    scores: dict[str, bool]
    contradicts: bool
    unguarded_answer: str | None = None  # GUARDED_INTENTS turns, when an unguarded answerer was given
    unguarded_contradicts: bool | None = None
    unguarded_scores: dict[str, bool] = field(default_factory=dict)


@dataclass
class QAReport:
    turns: list[TurnResult] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Accuracy per figure with its count, contradiction counts and rates, time per answer."""
        out: dict[str, Any] = {}
        for figure in FIGURES:
            out[figure] = accuracy([turn.scores for turn in self.turns], figure)
        bare_scores = [turn.unguarded_scores for turn in self.turns if turn.unguarded_answer is not None]
        out["unguarded"] = {figure: accuracy(bare_scores, figure) for figure in FIGURES}
        n = len(self.turns)
        conflicts = sum(turn.contradicts for turn in self.turns)
        out["contradictions"] = {"count": conflicts, "n": n, "rate": conflicts / n if n else None}
        bare = [turn.unguarded_contradicts for turn in self.turns if turn.unguarded_contradicts is not None]
        out["unguarded_contradictions"] = {
            "count": int(sum(bare)),
            "n": len(bare),
            "rate": float(np.mean(bare)) if bare else None,
        }
        out["seconds_per_answer"] = self.seconds / max(1, n + len(bare))
        return out


def accuracy(scores: Sequence[dict[str, bool]], figure: str) -> dict[str, Any]:
    values = [score[figure] for score in scores if figure in score]
    return {"accuracy": float(np.mean(values)) if values else None, "n": len(values)}


def read_records(data: Path, limit: int = 0) -> list[dict[str, Any]]:
    """Conversations of a simulate folder, in file order; the first `limit` when limit > 0."""
    lines = (data / "conversations.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return records[:limit] if limit > 0 else records


def record_case(data: Path, record: dict[str, Any], z: float, seed: int) -> tuple[Inspection, np.ndarray]:
    """The conversation's Inspection, with an anomaly map made from its mask as for training, and its image."""
    from train.assistant import AssistantTrainConfig, record_inspection, training_map

    image = load_image(data / record["image"])
    mask = load_image(data / record["mask"])[:, :, 0] > 127  # (H, W) bool
    rng = np.random.default_rng([seed, int(record["id"])])
    inspection = record_inspection(record, (image.shape[0], image.shape[1]), z, rng)
    values = training_map(mask, AssistantTrainConfig(data=data, out=data), rng)  # 0 = typical good, 1 = threshold
    normal_mean = float(inspection.calibration["normal_mean"])
    inspection.anomaly_map = (normal_mean + values * (inspection.threshold - normal_mean)).astype(np.float32)
    return inspection, image


def replay(
    record: dict[str, Any], inspection: Inspection, image: np.ndarray, ask: Ask, unguarded: Ask | None
) -> list[TurnResult]:
    """Every turn of one conversation, with the answerer's own answers as history."""
    history: list[tuple[str, str]] = []
    results = []
    for turn in record["turns"]:
        question = turn["question"]
        answer = ask(question, history, inspection, image)
        said = without_preamble(answer, inspection)  # the trust warnings are scored as no claim
        result = TurnResult(
            record["id"], turn["intent"], question, answer, turn_scores(turn, said),
            contradicts(said, inspection, question),
        )  # fmt: skip
        if unguarded is not None and turn["intent"] in GUARDED_INTENTS:
            result.unguarded_answer = unguarded(question, history, inspection, image)
            bare = without_preamble(result.unguarded_answer, inspection)
            result.unguarded_contradicts = contradicts(bare, inspection, question)
            result.unguarded_scores = turn_scores(turn, bare)
        history.append((question, answer))
        results.append(result)
    return results


def evaluate(
    data: Path, records: Iterable[dict[str, Any]], ask: Ask, unguarded: Ask | None, z: float, seed: int = 0
) -> QAReport:
    """Replay every conversation; a progress bar counts conversations."""
    report = QAReport()
    start = time.perf_counter()
    for record in tqdm(list(records), desc="conversations", unit="conv", disable=None):
        inspection, image = record_case(data, record, z, seed)
        report.turns.extend(replay(record, inspection, image, ask, unguarded))
    report.seconds = time.perf_counter() - start
    return report


def asker(answerer: Any) -> Ask:
    """An Answerer (anomalygpt.answerers) as a plain question -> answer function."""

    def ask(question: str, history: Sequence[tuple[str, str]], inspection: Inspection, image: np.ndarray) -> str:
        return "".join(answerer.stream(question, history, inspection, image)).strip()

    return ask
