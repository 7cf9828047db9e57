"""Tests for simulation.conversations: every answer checked against its mask, computed independently here."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import skimage.data
from scipy import ndimage

from anomalygpt.regions import EDGE_MARGIN_FRACTION, WIDESPREAD
from simulation.anomalies import load_params
from simulation.conversations import (
    ANSWERS,
    INTENTS,
    LOCATION_PHRASES,
    QUESTIONS,
    conversation_for,
    facts_for,
    near_edge_answer,
    near_edge_truth,
    region_mask,
    where_exactly_answer,
    where_phrase,
)
from simulation.writer import Sample, draw_sample

SIDE = 64
SAMPLES = 1000
SEED = 11
GRID = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
LOCATION_RE = re.compile(r"\b(top left|top right|bottom left|bottom right|top|bottom|left|right|center)\b", re.I)
SIZE_RE = re.compile(r"\b(small|medium|large)\b", re.I)
CONFIDENCE_RE = re.compile(r"\b(low|medium|high)\b", re.I)
TEXTURES = ("brick", "grass", "gravel", "camera", "coins", "astronaut", "chelsea", "coffee")


@dataclass(frozen=True)
class Component:
    """One 8-connected component of a mask, measured here without anomalygpt.regions."""

    word: str
    area_pct: float
    near_edge: bool


def texture_pool() -> dict[Path, np.ndarray]:
    """16 (SIDE, SIDE, 3) uint8 normals: two crops (one flipped) of each bundled picture, keyed by a fake path."""
    pool = {}
    for name in TEXTURES:
        picture = getattr(skimage.data, name)()
        rgb = picture if picture.ndim == 3 else np.repeat(picture[..., None], 3, axis=2)
        for crop, view in enumerate((rgb[:256, :256], rgb[-256:, -256:, :][:, ::-1])):
            pool[Path(f"{name}{crop}.png")] = cv2.resize(np.ascontiguousarray(view), (SIDE, SIDE), cv2.INTER_AREA)
    return pool


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    """SAMPLES samples drawn exactly as the dataset writer draws them: 40% normal, families mixed."""
    pool = texture_pool()
    params = load_params(None)
    return [draw_sample(list(pool), index, SEED, params, 0.6, pool.__getitem__) for index in range(SAMPLES)]


def components(mask: np.ndarray) -> list[Component]:
    """Components of the mask with their grid word (centroid of pixel centres), % area and border contact."""
    height, width = mask.shape
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    margin = max(1, round(EDGE_MARGIN_FRACTION * min(height, width)))
    found = []
    for label in range(1, count + 1):
        rows, cols = np.nonzero(labels == label)
        cx, cy = cols.mean() + 0.5, rows.mean() + 0.5
        word = GRID[int(cy >= height / 3) + int(cy >= 2 * height / 3)][int(cx >= width / 3) + int(cx >= 2 * width / 3)]
        gaps = (rows.min(), cols.min(), height - 1 - rows.max(), width - 1 - cols.max())
        found.append(Component(word, 100.0 * rows.size / mask.size, min(gaps) <= margin))
    return found


def size_of(area_pct: float) -> str:
    """Size word by the documented bounds: < 0.5% small, < 3% medium, else large."""
    return "small" if area_pct < 0.5 else "medium" if area_pct < 3.0 else "large"


def yes_no(answer: str) -> bool | None:
    """True for an answer starting with Yes, False for No, None otherwise."""
    first = answer.split()[0].strip(",.;:")
    return {"Yes": True, "No": False}.get(first)


def text_problems(turn: dict[str, Any], truth: list[Component], confidence: str) -> list[str]:
    """What the answer text of one turn gets wrong about the mask."""
    intent, answer = turn["intent"], turn["answer"]
    words, true_words = {w.lower() for w in LOCATION_RE.findall(answer)}, {c.word for c in truth}
    problems = []
    if not answer.isascii():
        problems.append("non-ASCII text")
    if intent != "near_edge" and not words <= true_words:
        problems.append(f"names {sorted(words - true_words)}")
    if intent in ("where", "where_exactly") and words != true_words:
        problems.append(f"locations {sorted(words)} != {sorted(true_words)}")
    if intent == "anomaly" and yes_no(answer) != bool(truth):
        problems.append("yes/no")
    if intent == "near_edge" and yes_no(answer) != any(c.near_edge for c in truth):
        problems.append("near edge yes/no")
    if intent == "count" and [int(n) for n in re.findall(r"\d+", answer)] != [len(truth)]:
        problems.append("count")
    if intent == "size" and {w.lower() for w in SIZE_RE.findall(answer)} != {size_of(c.area_pct) for c in truth}:
        problems.append("size words")
    if intent == "confidence" and {w.lower() for w in CONFIDENCE_RE.findall(answer)} != {confidence}:
        problems.append("confidence word")
    return problems


def truth_problems(turn: dict[str, Any], truth: list[Component], regions: list[dict[str, Any]]) -> list[str]:
    """What the structured truth of one turn gets wrong about the mask."""
    fields = turn["truth"]
    problems = []
    if fields["anomalous"] != bool(truth) or fields["count"] != len(truth):
        problems.append("truth anomalous/count")
    if sorted(fields["locations"]) != sorted(c.word for c in truth):
        problems.append("truth locations")
    if fields["locations"] != [region["location"] for region in regions]:
        problems.append("truth locations not in region order")
    if turn["intent"] == "near_edge" and fields["near_edge"] != any(c.near_edge for c in truth):
        problems.append("truth near_edge")
    return problems


def disagreements(sample: Sample) -> list[str]:
    """Every way the sample's conversation disagrees with its own mask."""
    conversation, truth = sample.conversation, components(sample.mask)
    turns = conversation["turns"]
    problems = [] if 2 <= len(turns) <= 5 and turns[0]["intent"] == "anomaly" else ["turn count or order"]
    if (sample.family is None) == bool(truth):
        problems.append("family vs mask")
    for number, turn in enumerate(turns):
        found = truth_problems(turn, truth, conversation["regions"])
        found += text_problems(turn, truth, conversation["confidence"])
        problems += [f"turn {number} ({turn['intent']}): {problem}: {turn['answer']!r}" for problem in found]
    return problems


def test_every_answer_agrees_with_its_mask(samples: list[Sample]) -> None:
    found = {index: problems for index, sample in enumerate(samples) if (problems := disagreements(sample))}
    assert not found, f"{len(found)} of {SAMPLES} samples disagree, e.g. {list(found.items())[:3]}"


def test_samples_cover_normals_families_and_many_regions(samples: list[Sample]) -> None:
    families = {sample.family for sample in samples}
    counts = [len(sample.conversation["regions"]) for sample in samples]
    assert families == {None, "nsa", "cutpaste", "scratch", "spot", "stain", "missing"}
    assert 300 <= sum(sample.family is None for sample in samples) <= 500  # 40% of 1000, binomial sd 15
    assert max(counts) >= 4  # locations are never capped at 2


def test_where_answers_name_every_region_of_many(samples: list[Sample]) -> None:
    many = [s for s in samples if len(components(s.mask)) >= 3]
    where = [t for s in many for t in s.conversation["turns"] if t["intent"] == "where"]
    assert len(where) >= 10
    for sample in many:
        assert len(sample.conversation["turns"][0]["truth"]["locations"]) == len(components(sample.mask))


def test_at_least_four_phrasings_per_intent(samples: list[Sample]) -> None:
    questions, normal_answers = defaultdict(set), defaultdict(set)
    for sample in samples:
        for turn in sample.conversation["turns"]:
            questions[turn["intent"]].add(turn["question"])
            if sample.family is None and turn["intent"] != "confidence":
                normal_answers[turn["intent"]].add(turn["answer"])
    assert set(questions) == set(INTENTS)
    assert {intent: len(seen) >= 4 for intent, seen in questions.items()} == dict.fromkeys(INTENTS, True)
    assert {intent: len(seen) >= 4 for intent, seen in normal_answers.items()} == {
        intent: True for intent in INTENTS if intent != "confidence"
    }
    first = {s.conversation["turns"][0]["question"] for s in samples}
    assert first == set(QUESTIONS["anomaly"])


def test_templates_never_name_a_place_outside_a_location_phrase() -> None:
    for intent, cases in ANSWERS.items():
        for templates in cases.values():
            for template in templates:
                assert not LOCATION_RE.search(template), (intent, template)
    places = {word: phrase for word, phrase in LOCATION_PHRASES.items() if word != WIDESPREAD}  # names no cell
    assert {LOCATION_RE.findall(phrase)[0] for phrase in places.values()} == set(places)
    assert not LOCATION_RE.search(LOCATION_PHRASES[WIDESPREAD])


def test_same_seed_same_json_other_seed_differs() -> None:
    pool = texture_pool()
    params = load_params(None)

    def dump(seed: int) -> str:
        drawn = [draw_sample(list(pool), i, seed, params, 0.6, pool.__getitem__) for i in range(20)]
        return json.dumps([sample.conversation for sample in drawn])

    assert dump(5) == dump(5)
    assert dump(5) != dump(6)


def blobs_mask(boxes: list[tuple[int, int, int, int]], side: int = 90) -> np.ndarray:
    """(side, side) bool mask of filled boxes given as (x0, y0, x1, y1), x1/y1 exclusive."""
    mask = np.zeros((side, side), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


def test_where_phrase_groups_repeated_locations_by_hand() -> None:
    # 90 px: thirds at 30 and 60. Areas 64 > 36 > 25 = 25 > 16 give the region order.
    mask = blobs_mask(
        [(2, 2, 10, 10), (40, 40, 46, 46), (20, 20, 25, 25), (65, 70, 70, 75), (75, 5, 79, 9)]  # TL, C, TL, BR, TR
    )
    facts = facts_for(np.full((90, 90, 3), 128, np.uint8), mask, None, "high")
    assert [r.location for r in facts.regions] == ["top left", "center", "top left", "bottom right", "top right"]
    assert where_phrase(facts.regions) == (
        "two in the top left, one in the center, one in the bottom right and one in the top right"
    )
    assert where_phrase(facts.regions[:2]) == "in the top left and in the center"


def test_where_exactly_reports_inclusive_pixel_ranges_and_centre() -> None:
    mask = blobs_mask([(10, 5, 30, 20)])  # x 10..29, y 5..19: centroid (20.0, 12.5)
    facts = facts_for(np.full((90, 90, 3), 128, np.uint8), mask, "stain", "high")
    answer = where_exactly_answer(facts, np.random.default_rng(0))
    assert "region 1 in the top left: x 10-29, y 5-19, centred near (20, 12)" in answer


def test_near_edge_truth_and_text_by_hand() -> None:
    # 90 px: margin round(0.05 * 90) = 4 px. Box 1 touches the top; box 2 is 4 px from the right border.
    mask = blobs_mask([(40, 0, 50, 8), (80, 60, 86, 66)])
    image = np.full((90, 90, 3), 128, np.uint8)
    conversation = conversation_for(image, mask, "spot", np.random.default_rng(0))
    facts = facts_for(image, mask, "spot", "high")
    truth = near_edge_truth(facts)
    assert truth == {"near_edge": True, "margin_px": 4, "edges": [["top"], ["right"]], "border_distance_px": [0, 4]}
    answer = near_edge_answer(facts, np.random.default_rng(1))
    assert "region 1 touches the top border" in answer and "region 2 comes within 4 px of the right border" in answer
    inside = facts_for(image, blobs_mask([(40, 40, 50, 50)]), "spot", "high")
    assert near_edge_truth(inside)["near_edge"] is False
    assert "40 px" in near_edge_answer(inside, np.random.default_rng(2))
    assert conversation["regions"][0]["box"] == [40, 0, 50, 8]


def test_region_mask_drops_specks_find_regions_would_drop() -> None:
    # 90 x 90: the smallest kept component is max(4 px, 0.01% of 8100 = 0.81) = 4 px.
    mask = blobs_mask([(5, 5, 8, 6), (50, 50, 52, 52), (70, 70, 80, 71)])  # 3 px, 4 px, 10 px
    kept = region_mask(mask)
    assert int(kept.sum()) == 14 and not kept[5, 5] and kept[50, 50] and kept[70, 75]


def test_normal_image_gets_honest_answers() -> None:
    image = np.full((64, 64, 3), 90, np.uint8)
    conversation = conversation_for(image, np.zeros((64, 64), bool), None, np.random.default_rng(3), "low")
    assert conversation["regions"] == [] and conversation["family"] is None
    assert all(turn["truth"]["count"] == 0 and turn["truth"]["locations"] == [] for turn in conversation["turns"])
    assert yes_no(conversation["turns"][0]["answer"]) is False


@pytest.mark.parametrize(
    ("mask", "family", "confidence", "message"),
    [
        (np.zeros((32, 64), bool), None, "high", "mask must be (H, W) = (64, 64)"),
        (np.zeros((64, 64), bool), "dent", "high", "unknown family 'dent'"),
        (np.zeros((64, 64), bool), None, "certain", "confidence must be one of"),
        (np.zeros((64, 64), bool), "scratch", "high", "family 'scratch' given but the mask has no region"),
    ],
)
def test_bad_inputs_raise_one_line_errors(mask: np.ndarray, family: str | None, confidence: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        conversation_for(np.zeros((64, 64, 3), np.uint8), mask, family, np.random.default_rng(0), confidence)
