"""QA accuracy on simulated conversations: answer parsing by hand, and whole replays of known answerers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalygpt.answerers import GroundedAnswerer
from anomalygpt.inspection import Inspection
from eval.qa import (
    GUARDED_INTENTS,
    asker,
    evaluate,
    read_records,
    record_case,
    stated_count,
    stated_locations,
    turn_scores,
)
from simulation.normals import VALIDATION_PICTURES, write_normals
from simulation.writer import write_dataset

N = 16


@pytest.fixture(scope="module")
def conversations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("qa")
    normals = write_normals(VALIDATION_PICTURES, 6, 96, 3, base / "normals")
    write_dataset(normals, base / "sim", N, 11, None, size=96, progress=False)
    return base / "sim"


def test_locations_and_counts_read_from_answers() -> None:
    assert stated_locations("Two in the top left and one at the bottom.") == {"top left", "bottom"}
    assert stated_locations("It sits in the centre, slightly right.") == {"center", "right"}
    assert stated_locations("The image looks normal.") == set()
    assert stated_count("I count 3 regions, 2 of them small.") == 3
    assert stated_count("Exactly two separate anomalous regions.") == 2
    assert stated_count("None: I count 0 anomalous regions.") == 0
    assert stated_count("Several.") is None


def test_turn_scores_by_intent() -> None:
    where = {
        "intent": "where",
        "question": "Where?",
        "truth": {"anomalous": True, "count": 2, "locations": ["top", "left"]},
    }
    assert turn_scores(where, "At the top and on the left.") == {"location": True}
    assert turn_scores(where, "At the top.") == {"location": False}
    anomaly = {
        "intent": "anomaly",
        "question": "Is there a defect?",
        "truth": {"anomalous": False, "count": 0, "locations": []},
    }
    assert turn_scores(anomaly, "No, it looks fine.") == {"yes_no": True}
    assert turn_scores(anomaly, "Yes, there is a scratch.") == {"yes_no": False}
    assert turn_scores(anomaly, "Hard to say.") == {"yes_no": False}  # states no verdict
    count = {"intent": "count", "question": "How many?", "truth": {"anomalous": True, "count": 1, "locations": ["top"]}}
    assert turn_scores(count, "1 anomalous region.") == {"count": True}
    size = {"intent": "size", "question": "How big?", "truth": {"anomalous": True, "area_pct": [6.1234, 0.0432]}}
    assert turn_scores(size, "Together they cover 6.2% of the image: 6.1% on the left; 0.043% at the top.") == {
        "size": True
    }
    assert turn_scores(size, "Region 1 is large at 6.1 %, region 2 small at 0.043%.") == {"size": True}
    assert turn_scores(size, "It covers 6.1% of the image.") == {"size": False}  # region 2 left out
    assert turn_scores(size, "6.1% and 0.043%, 2.9% in all.") == {"size": False}  # a wrong total
    assert turn_scores({**size, "truth": {"anomalous": False, "area_pct": []}}, "Nothing: 0% of the image.") == {}
    confidence = {"intent": "confidence", "question": "How sure are you?", "truth": {"confidence": "low"}}
    assert turn_scores(confidence, "I am not very sure that the image is anomalous (Low confidence).") == {
        "confidence": True
    }
    assert turn_scores(confidence, "My confidence is high.") == {"confidence": False}
    assert turn_scores(confidence, "Low or high, hard to say.") == {"confidence": False}


def test_the_template_answerer_scores_perfectly(conversations: Path) -> None:
    report = evaluate(conversations, read_records(conversations), asker(GroundedAnswerer()), None, z=3.0)
    summary = report.summary()
    assert summary["yes_no"] == {"accuracy": 1.0, "n": N}  # every conversation opens with the anomaly question
    assert summary["contradictions"]["count"] == 0 and summary["contradictions"]["n"] == len(report.turns)
    for figure in ("location", "count", "size", "confidence"):
        assert summary[figure]["n"] == 0 or summary[figure]["accuracy"] == 1.0


def test_an_answerer_that_always_says_fine(conversations: Path) -> None:
    records = read_records(conversations)

    def fine(question: str, history: Sequence[tuple[str, str]], inspection: Inspection, image: np.ndarray) -> str:
        return "No, it looks fine: 0 anomalous regions."

    report = evaluate(conversations, records, fine, fine, z=3.0)
    summary = report.summary()
    anomalous = [bool(r["regions"]) for r in records]
    assert summary["yes_no"]["accuracy"] == pytest.approx(1 - np.mean(anomalous))
    expected = sum(len(r["turns"]) for r in records if r["regions"])  # every turn about an anomalous image
    assert summary["contradictions"]["count"] == expected
    # Unguarded: every turn the guard may prefill is answered again, and scored on its own.
    guarded = [(bool(r["regions"]), t) for r in records for t in r["turns"] if t["intent"] in GUARDED_INTENTS]
    assert summary["unguarded_contradictions"] == {
        "count": sum(bad for bad, _ in guarded),
        "n": len(guarded),
        "rate": pytest.approx(np.mean([bad for bad, _ in guarded])),
    }
    counts = [t["truth"]["count"] == 0 for _, t in guarded if t["intent"] == "count"]
    assert summary["unguarded"]["yes_no"] == summary["yes_no"]
    assert summary["unguarded"]["count"] == {"accuracy": pytest.approx(np.mean(counts)), "n": len(counts)}
    assert all(not turn.unguarded_scores.get("location", False) for turn in report.turns)


def test_record_case_states_the_conversation_and_maps_its_mask(conversations: Path) -> None:
    record = next(r for r in read_records(conversations) if r["regions"])
    inspection, image = record_case(conversations, record, 3.0, seed=0)
    assert inspection.is_anomalous and len(inspection.regions) == len(record["regions"])
    assert inspection.anomaly_map is not None and inspection.anomaly_map.shape == image.shape[:2]
    mask = np.asarray(Image.open(conversations / record["mask"])) > 127
    above = inspection.anomaly_map > inspection.threshold
    assert (above == mask).mean() > 0.97  # the map crosses the threshold on the mask's pixels
