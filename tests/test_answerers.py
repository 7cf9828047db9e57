"""Tests for chat/answerers.py: intents, grounded answers that agree with the Inspection, and the loader."""

from __future__ import annotations

import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import texture_crops, with_dark_blob

from anomalygpt.assistant import AssistantConfig
from anomalygpt.backbones import BackboneConfig
from anomalygpt.config import Preset
from anomalygpt.inspection import Inspection
from anomalygpt.llm import LLMConfig
from anomalygpt.regions import find_regions
from chat.answerers import (
    NO_REGION_ANSWER,
    AnswererError,
    AssistantAnswerer,
    GroundedAnswerer,
    grounded_answer,
    intent_of,
    load_answerer,
)
from simulation.conversations import LOCATION_PHRASES, QUESTIONS

SIDE = 90


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


def test_guard_openings_state_the_inspections_facts() -> None:
    from anomalygpt.guard import answer_claims, expected_opening
    from anomalygpt.regions import CONTRAST_PHRASES
    from eval.qa import sizes_right, stated_count, stated_locations, turn_scores

    normal, one, three = (
        inspection_with([], margin=-2.0),
        inspection_with([(5, 5)]),
        inspection_with([(5, 5), (75, 5), (40, 75)]),
    )
    assert [r.location for r in three.regions] == ["top left", "top right", "bottom"]
    for question in QUESTIONS["count"]:
        assert [stated_count(expected_opening(question, i) or "") for i in (normal, one, three)] == [0, 1, 3]
    for question in QUESTIONS["where"]:
        assert stated_locations(expected_opening(question, one) or "") == {"top left"}, question
        assert stated_locations(expected_opening(question, three) or "") == {"top left", "top right", "bottom"}
        assert answer_claims(expected_opening(question, normal) or "") == {False}
    # Anomalous by its score with no region outlined: no count or place to state.
    no_region = replace(one, regions=[])
    assert expected_opening("How many defects are there?", no_region) is None
    assert expected_opening("Where is it?", no_region) is None
    for question in QUESTIONS["size"]:
        for inspection in (one, three):
            opening = expected_opening(question, inspection) or ""
            assert sizes_right(opening, [r.area_pct for r in inspection.regions]), (question, opening)
        assert answer_claims(expected_opening(question, normal) or "") == {False}
    for question in QUESTIONS["appearance"]:
        region = one.regions[0]
        assert expected_opening(question, one) == f"A {region.shape} region, {CONTRAST_PHRASES[region.contrast]}"
        opening = expected_opening(question, three) or ""
        assert opening.startswith(f"In 3 places: region 1 in the top left is {three.regions[0].shape} and"), opening
        assert stated_locations(opening) == {"top left", "top right", "bottom"}
        assert answer_claims(expected_opening(question, normal) or "") <= {False}
    assert expected_opening("How large is it?", no_region) is None
    assert expected_opening("What does it look like?", no_region) is None
    for question in QUESTIONS["confidence"]:
        for inspection in (normal, one, replace(one, confidence="low")):
            opening = expected_opening(question, inspection) or ""
            assert turn_scores(
                {"intent": "confidence", "question": question, "truth": {"confidence": inspection.confidence}}, opening
            ) == {"confidence": True}
            assert answer_claims(opening) == {inspection.is_anomalous}
    assert expected_opening("Is it near the edge?", three) is None
    assert expected_opening("Is there a defect?", normal) == "No"


def test_every_training_question_gets_its_intent() -> None:
    for intent, questions in QUESTIONS.items():
        for question in questions:
            assert intent_of(question) == intent, question
    assert intent_of("What is the anomaly score?") == "score"
    assert intent_of("Is this part OK?") == "normal"
    assert intent_of("Tell me a joke") is None


def test_answers_agree_with_an_anomalous_inspection() -> None:
    inspection = inspection_with([(5, 40), (70, 75)])  # left, bottom right
    assert [region.location for region in inspection.regions] == ["left", "bottom right"]
    assert grounded_answer("Is there an anomaly?", inspection).startswith("Yes")
    assert grounded_answer("Is the part OK?", inspection).startswith("No, it is anomalous: 2 regions")
    where = grounded_answer("Where is the defect?", inspection)
    assert LOCATION_PHRASES["left"] in where and LOCATION_PHRASES["bottom right"] in where
    assert "2" in grounded_answer("How many defects are there?", inspection)
    assert "0.7000" in grounded_answer("What is the score?", inspection)
    assert "medium" in grounded_answer("How sure are you?", inspection)


def test_answers_agree_with_a_normal_inspection() -> None:
    inspection = inspection_with([], margin=-3.0)
    assert grounded_answer("Is there an anomaly?", inspection).startswith("No")
    assert grounded_answer("Is the part OK?", inspection).startswith("Yes, it looks normal")
    assert "0" in grounded_answer("How many defects are there?", inspection)
    for question in ("Where is the defect?", "How big is it?", "Is it near the edge?"):
        answer = grounded_answer(question, inspection)
        assert not any(phrase in answer for phrase in LOCATION_PHRASES.values()), answer


def test_an_anomalous_score_without_an_outlined_region_is_still_yes() -> None:
    inspection = replace(inspection_with([(5, 40)]), regions=[])
    assert grounded_answer("Do you see any defect?", inspection) == "Yes. " + NO_REGION_ANSWER
    assert grounded_answer("Where is the defect?", inspection) == NO_REGION_ANSWER


def test_an_unknown_question_gets_the_facts() -> None:
    inspection = inspection_with([(5, 40)])
    assert inspection.facts() in grounded_answer("Tell me a joke", inspection)


def test_the_stream_joins_into_the_answer() -> None:
    inspection = inspection_with([(5, 40)])
    question = "What does the anomaly look like?"
    pieces = list(GroundedAnswerer().stream(question, [], inspection, np.zeros((SIDE, SIDE, 3), np.uint8)))
    assert len(pieces) > 3 and "".join(pieces) == grounded_answer(question, inspection)


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
    fake_assistant_module(monkeypatch, lambda preset, inspector: built.append(inspector) or FakeAssistant())
    untrained = Preset(name="t")
    assert isinstance(load_answerer(untrained, "auto"), GroundedAnswerer) and built == []
    assert "preset 't' names no trained assistant weights" in capsys.readouterr().err
    trained = replace(untrained, assistant=AssistantConfig(weights="assistant"))
    inspector = object()
    answerer = load_answerer(trained, "auto", inspector)  # type: ignore[arg-type]
    assert isinstance(answerer, AssistantAnswerer) and isinstance(answerer.assistant, FakeAssistant)
    assert built == [inspector]  # the app's Inspector is shared, not built twice
    assert isinstance(load_answerer(untrained, "assistant"), AssistantAnswerer)
    assert isinstance(load_answerer(trained, "grounded"), GroundedAnswerer)


def test_an_assistant_that_cannot_load_falls_back_or_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing(preset: Preset, inspector: Any) -> None:
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
        with pytest.raises(ValueError):
            list(answerer.stream("   ", [], inspection, image))
    finally:
        hook.remove()
