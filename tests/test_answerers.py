"""Tests for anomalygpt/answerers.py: intents, grounded answers that agree with the Inspection, and the loader."""

from __future__ import annotations

import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import texture_crops, with_dark_blob

from anomalygpt.answerers import AnswererError, AssistantAnswerer, GroundedAnswerer, grounded_answer, load_answerer
from anomalygpt.assistant import AssistantConfig
from anomalygpt.backbones import BackboneConfig
from anomalygpt.claims import CheckReport
from anomalygpt.config import Preset
from anomalygpt.grounded import NO_REGION, DefectType
from anomalygpt.inspection import Inspection
from anomalygpt.llm import LLMConfig
from anomalygpt.memory import MemoryConfig
from anomalygpt.regions import LOCATION_PHRASES, find_regions

SIDE = 90
SIDE_IMAGE = np.zeros((SIDE, SIDE, 3), np.uint8)


def inspection_with(blobs: list[tuple[int, int]], margin: float = 2.0) -> Inspection:
    """An Inspection of a SIDE x SIDE image whose map has a 10x10 hot square at each (x, y) corner given."""
    anomaly_map = np.zeros((SIDE, SIDE), dtype=np.float32)
    for x, y in blobs:
        anomaly_map[y : y + 10, x : x + 10] = 1.0
    anomalous = margin > 0
    return Inspection(
        is_anomalous=anomalous,
        score=0.5 + 0.1 * margin,
        threshold=0.5,
        margin=margin,
        confidence="medium",
        pixel_threshold=0.5,
        regions=find_regions(anomaly_map, 0.5) if anomalous else [],
        mode="few-shot",
        n_references=2,
        image_size=(SIDE, SIDE),
        calibration={},
        anomaly_map=anomaly_map,
    )


def test_answers_agree_with_an_anomalous_inspection() -> None:
    inspection = inspection_with([(5, 40), (70, 75)])  # left, bottom right
    assert [region.location for region in inspection.regions] == ["left", "bottom right"]
    assert grounded_answer("Is there an anomaly?", inspection).startswith("Yes: the image is anomalous")
    assert grounded_answer("Is the part OK?", inspection).startswith("No: the image is anomalous; the detector found 2")
    where = grounded_answer("Where is the defect?", inspection)
    assert LOCATION_PHRASES["left"] in where and LOCATION_PHRASES["bottom right"] in where
    assert grounded_answer("How many defects are there?", inspection).startswith("There are 2 anomalous regions")
    assert "0.7000" in grounded_answer("What is the score?", inspection)
    assert grounded_answer("How sure are you?", inspection).startswith("My confidence is medium")


def test_answers_agree_with_a_normal_inspection() -> None:
    inspection = inspection_with([], margin=-3.0)
    assert grounded_answer("Is there an anomaly?", inspection).startswith("No: the image is normal")
    assert grounded_answer("Is the part OK?", inspection).startswith("Yes: the image is normal")
    assert grounded_answer("How many defects are there?", inspection).startswith("There are 0 anomalous regions")
    for question in ("Where is the defect?", "How big is it?", "Is it near the edge?"):
        answer = grounded_answer(question, inspection)
        assert not any(phrase in answer for phrase in LOCATION_PHRASES.values()), answer


def test_an_anomalous_score_without_an_outlined_region_is_still_yes() -> None:
    inspection = replace(inspection_with([(5, 40)]), regions=[])
    assert grounded_answer("Do you see any defect?", inspection) == f"Yes: the image is anomalous: {NO_REGION}."
    assert grounded_answer("Where is the defect?", inspection) == NO_REGION[0].upper() + NO_REGION[1:] + "."


def test_warnings_and_low_confidence_open_every_answer() -> None:
    inspection = replace(inspection_with([(5, 40)], margin=0.4), confidence="low", warnings=["references unlike it"])
    note = "Note: my confidence in this verdict is low, because the anomaly score is only 0.4 normal spreads above"
    for question in ("Is there an anomaly?", "Where is it?", "What kind of defect is it?", "Tell me a joke"):
        answer = grounded_answer(question, inspection)
        assert answer.startswith(f"Warning: references unlike it. {note}"), answer
    # In a conversation, once given in full, the warnings are recalled in a sentence (the note stays whole).
    answerer, first = GroundedAnswerer(), grounded_answer("Where is it?", inspection)
    later = "".join(answerer.stream("What kind of defect is it?", [("Where is it?", first)], inspection, SIDE_IMAGE))
    assert later.startswith(f"Warning (as above): references unlike it. {note}"), later
    again = "".join(answerer.stream("What kind of defect is it?", [("Hi", "Hello.")], inspection, SIDE_IMAGE))
    assert again.startswith("Warning: references unlike it. ")  # not given yet in this conversation


def test_an_unknown_question_gets_the_verdict_and_what_can_be_asked() -> None:
    inspection = inspection_with([(5, 40)])
    answer = grounded_answer("Tell me a joke", inspection)
    assert answer.startswith("The image is anomalous; the detector found 1 anomalous region, on the left.")
    assert "You can ask me where" in answer


def test_the_stream_joins_into_the_answer_and_reports_no_repair() -> None:
    inspection = inspection_with([(5, 40)])
    question = "What does the anomaly look like?"
    reports: list[CheckReport] = []
    image = np.zeros((SIDE, SIDE, 3), np.uint8)
    pieces = list(GroundedAnswerer().stream(question, [], inspection, image, on_report=reports.append))
    assert len(pieces) > 3 and "".join(pieces) == grounded_answer(question, inspection)
    (report,) = reports
    assert report.repairs == [] and report.opening_conflicts == [] and report.answer == "".join(pieces).strip()


def test_product_defect_types_name_the_kind() -> None:
    inspection = inspection_with([(5, 40)])
    region = inspection.regions[0]
    own = DefectType("blotch", "a soft grey patch", shapes=(region.shape,), contrasts=(region.contrast,))
    other = DefectType(
        "burn mark", "a dark burn", contrasts=("darker",) if region.contrast != "darker" else ("brighter",)
    )
    answer = "".join(
        GroundedAnswerer([own, other]).stream("What kind of defect could it be?", [], inspection, SIDE_IMAGE)
    )
    assert "blotch (a soft grey patch)" in answer and "burn mark" not in answer


class FakeAssistant:
    """Stands in for anomalygpt.assistant.Assistant in the loader tests."""


def fake_assistant_module(monkeypatch: pytest.MonkeyPatch, build: Any) -> None:
    module = types.ModuleType("anomalygpt.assistant")
    module.build_assistant = build  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "anomalygpt.assistant", module)


def test_auto_takes_the_assistant_only_with_trained_weights(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    built: list[Any] = []
    fake_assistant_module(
        monkeypatch, lambda preset, inspector, inference: built.append((inspector, inference)) or FakeAssistant()
    )
    untrained = Preset(name="t")
    assert isinstance(load_answerer(untrained, "auto"), GroundedAnswerer) and built == []
    assert "preset 't' names no trained assistant weights" in capsys.readouterr().err
    trained = replace(untrained, assistant=AssistantConfig(weights="assistant"))
    inspector = object()
    answerer = load_answerer(trained, "auto", inspector)  # type: ignore[arg-type]
    assert isinstance(answerer, AssistantAnswerer) and isinstance(answerer.assistant, FakeAssistant)
    assert built == [(inspector, True)]  # the app's Inspector is shared, not built twice; merged for chat
    assert isinstance(load_answerer(untrained, "assistant"), AssistantAnswerer)
    assert isinstance(load_answerer(trained, "grounded"), GroundedAnswerer)


def test_an_assistant_that_cannot_load_falls_back_or_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing(preset: Preset, inspector: Any, inference: bool) -> None:
        raise OSError("no LLM file at /nowhere")

    fake_assistant_module(monkeypatch, missing)
    trained = Preset(name="t", assistant=AssistantConfig(weights="assistant"))
    assert isinstance(load_answerer(trained, "auto"), GroundedAnswerer)
    assert "the LLM assistant is not available: no LLM file at /nowhere" in capsys.readouterr().err
    with pytest.raises(AnswererError, match="the LLM assistant is not available: no LLM file"):
        load_answerer(trained, "assistant")
    with pytest.raises(AnswererError, match="unknown answerer 'gpt'"):
        load_answerer(trained, "gpt")


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # transformers, inside peft
def test_the_assistant_answerer_streams_guarded_answers_without_re_encoding(tmp_path: Path) -> None:
    from tiny_llm import save_chat_llm

    from anomalygpt.assistant import build_assistant

    preset = Preset(
        name="tiny",
        backbone=BackboneConfig(image_size=64),
        memory=MemoryConfig(augment=True),  # brick crops: their rotations and flips are good patches too
        llm=LLMConfig(model=str(save_chat_llm(tmp_path / "llm"))),
        assistant=AssistantConfig(max_new_tokens=6),
    )
    assistant = build_assistant(preset)
    inspector = assistant.inspector
    references = inspector.fit(texture_crops(2, size=64, seed=11))
    image = with_dark_blob(texture_crops(1, size=64, seed=98)[0], center=(46, 46), radius=7)
    calls: list[int] = []
    hook = inspector.backbone.register_forward_hook(lambda *args: calls.append(1))
    try:
        answerer = AssistantAnswerer(assistant)
        for sensitivity in (0.0, 5.0, -5.0):  # the verdict may move between turns; the opening follows it
            inspection = inspector.inspect(image, references, sensitivity=sensitivity)
            before = len(calls)
            answer = "".join(answerer.stream("Is there an anomaly in this image?", [], inspection, image))
            assert answer.startswith("Yes" if inspection.is_anomalous else "No"), answer
            if sensitivity != 0.0:
                assert len(calls) == before  # the embedding was cached on the first question
        warned = replace(inspection, warnings=["references unlike it"])
        first = "".join(answerer.stream("Where is it?", [], warned, image))
        later = "".join(answerer.stream("Is there an anomaly?", [("Where is it?", first)], warned, image))
        assert first.startswith("Warning: references unlike it. ") and later.startswith("Warning (as above): ")
        with pytest.raises(ValueError):
            list(answerer.stream("   ", [], inspection, image))
    finally:
        hook.remove()
