"""The real-chat scorer on hand-made right and wrong answers, and its question bank against the question reader."""

from __future__ import annotations

import dataclasses

import pytest
from chat_cases import LOW, MANY, NORMAL, ONE, POOL, POOL_NORMAL, SPANNING, WIDESPREAD, evidence_for, inspection_with

from anomalygpt.grounded import Grounds, answer_text, without_preamble
from anomalygpt.guard import read_question
from anomalygpt.inspection import Inspection
from eval.chat_scorer import BANK, KINDS, Case, score_answer

CASE = Case(MANY, evidence_for(MANY))


def test_the_bank_has_every_kind_in_three_phrasings_or_more_and_the_reader_agrees() -> None:
    for kind in KINDS:
        assert len([q for q in BANK if q.kind == kind]) >= 3, kind
    for entry in BANK:
        question = read_question(entry.text)
        assert question.kind == entry.kind, entry.text
        if entry.kind == "near":
            assert question.place == entry.focus, entry.text
        elif entry.focus is not None:
            assert question.focus == entry.focus, entry.text
        if entry.polarity is not None:
            assert question.polarity == entry.polarity, entry.text


@pytest.mark.parametrize(
    "inspection",
    [NORMAL, ONE, MANY, LOW, SPANNING, WIDESPREAD, POOL, POOL_NORMAL],
    ids=["normal", "one", "many", "low", "spanning", "widespread", "pool", "pool-normal"],
)
def test_grounded_answers_score_right_and_useful(inspection: Inspection) -> None:
    case = Case(inspection, evidence_for(inspection))
    for entry in BANK:
        text = answer_text(read_question(entry.text), Grounds(inspection, case.evidence))
        scored = score_answer(text, entry.kind, case, entry.polarity, entry.focus)
        assert scored.contradictions == [] and scored.useful, (entry.text, text, scored)


@pytest.mark.parametrize(
    ("answer", "kind", "polarity", "error"),
    [
        ("No: the image is normal.", "anomaly", "defect", "verdict"),
        ("Yes, it passes.", "anomaly", "normal", "verdict"),
        ("There are 2 anomalous regions.", "count", None, "count"),
        ("One at the bottom and two in the top left.", "where", None, "count at a place"),
        ("Region 2 is in the bottom left.", "where", None, "place bottom left"),
        ("Region 3 is compact.", "describe", None, "shape compact"),
        ("Region 1 is about as bright as its surroundings.", "describe", None, "contrast similar"),
        ("Region 2 is darker than its surroundings.", "describe", None, "contrast darker"),
        ("Region 1 covers 3.0% of the image.", "size", None, "area 3.0%"),
        ("Region 1 covers 0% of the image.", "size", None, "area 0%"),
        ("Region 1 is large.", "size", None, "size large"),
        ("Region 5 is small.", "describe", None, "region number 5"),
        ("The most severe is region 3.", "biggest", None, "most severe"),
        ("The biggest is region 2.", "biggest", None, "biggest"),
        ("My confidence is high.", "confidence", None, "confidence high"),
        ("The anomaly score is 0.9123.", "why", None, "score"),
        ("It is 4.0 normal spreads above the threshold.", "why", None, "margin"),
        ("Region 1 best matches reference 1.", "compare", None, "reference 1 for region 1"),
        ("Region 1 is 30 grey levels darker than that good area.", "compare", None, "grey levels"),
        ("Region 1 touches the left border.", "near", None, "touches"),
        ("Nothing is in the top left.", "near", None, "place top left said absent"),
        ("It could be x 1-5, y 1-5.", "where", None, "box"),
        ("Good parts score this high about 1% of the time.", "confidence", None, "p-value 1%"),  # MANY has none
        ("Good parts score above it at most 2% of the time.", "why", None, "false-alarm rate 2%"),  # nor a rate
    ],
)
def test_a_wrong_answer_is_a_contradiction(answer: str, kind: str, polarity: str | None, error: str) -> None:
    scored = score_answer(answer, kind, CASE, polarity)
    assert any(error in found for found in scored.contradictions), (answer, scored.contradictions)


@pytest.mark.parametrize(
    "answer",
    [
        "Yes: region 1 in the top left is darker than its surroundings and covers 1.8% of the image.",
        "One in the top left, one in the top right and one at the bottom.",
        "Region 3 at the bottom is elongated; region 2 touches the top border.",
        "The most severe is region 2 in the top right: its peak score, 1.0000, is the highest of all regions.",
        "Region 1 best matches reference 2, and is 14 grey levels darker than that good area.",
        "The anomaly score 0.7000 is above the threshold 0.5000 by 2.0 normal spreads (medium confidence).",
        "Nothing is in the center.",
        "Region 1 covers about 2% of the image.",  # 1.78% rounded to the written precision
        "Confidence: medium.",
    ],
)
def test_a_right_answer_is_not_a_contradiction(answer: str) -> None:
    assert score_answer(answer, "describe", CASE).contradictions == [], answer


@pytest.mark.parametrize(
    ("kind", "answer", "useful", "focus"),
    [
        ("count", "There are 3 anomalous regions.", True, None),
        ("count", "There are several regions.", False, None),
        ("where", "In the top left, in the top right and at the bottom.", True, None),
        ("where", "In the top left and in the top right.", False, None),
        ("biggest", "The biggest is region 1 in the top left.", True, "biggest"),
        ("biggest", "Region 1 and region 2 are big.", False, "biggest"),
        ("biggest", "The most severe is region 2.", True, "severe"),
        ("size", "Region 1 is 1.8%, region 2 is 1.2% and region 3 is 1.1%.", True, None),
        ("size", "Region 1 is 1.8%.", False, None),
        ("size", "Region 1 is 1.8%.", True, "biggest"),
        ("confidence", "My confidence is medium.", True, None),
        ("confidence", "I am not sure.", False, None),
        ("kind", "Region 3 could be a crack or a scratch.", True, None),
        ("kind", "It could be contamination.", True, None),
        ("kind", "It is a defect.", False, None),
        ("compare", "Region 1 best matches reference 2 and is 14 grey levels darker.", True, None),
        ("compare", "It differs from the references.", False, None),
        ("describe", "Region 1 is compact, region 2 is compact and region 3 is elongated.", True, None),
        ("describe", "Region 1 is compact.", False, None),
        ("near", "Yes: region 2 touches the top border.", True, "edge"),
        ("near", "No.", False, "edge"),
        ("near", "No: nothing is in the center.", True, "center"),
        ("why", "The anomaly score 0.7000 is above the threshold 0.5000 by 2.0 normal spreads; region 2.", True, None),
        ("why", "Because it looks bad.", False, None),
        ("next_check", "Check region 1 first.", True, None),
        ("next_check", "Be careful.", False, None),
    ],
)
def test_usefulness_rules(kind: str, answer: str, useful: bool, focus: str | None) -> None:
    assert score_answer(answer, kind, CASE, focus=focus).useful is useful, answer


def test_a_references_answer_says_whether_the_image_looks_like_them_and_how_many() -> None:
    fitting = {"distance": 0.01, "ratio": 1.2, "brightness": 0.0, "fits": True, "nearest": ["a.png"]}
    case = Case(dataclasses.replace(MANY, reference_fit=fitting), ())
    assert score_answer("Yes, in look. A threshold from 2 good references is rough.", "references", case).useful
    assert not score_answer("No. A threshold from 2 good references is rough.", "references", case).useful
    assert not score_answer("Yes, in look.", "references", case).useful  # how many: not said
    rough = "No: a threshold from 2 good references is rough. The image looks like them."
    assert score_answer(rough, "references", case, focus="number").useful  # "Are there enough?": the number first
    assert not score_answer("Yes: it looks like them; 2 good references.", "references", case, focus="number").useful
    none = Case(dataclasses.replace(NORMAL, n_references=0), ())
    assert score_answer("There are no good references: give some.", "references", none).useful


@pytest.mark.parametrize(
    ("answer", "useful", "focus", "inspection"),
    [
        ("No: region 1 is in the top left.", True, "top left", MANY),  # "Is the top left clean?"
        ("Yes: region 1 is in the top left.", False, "top left", MANY),
        ("Yes: no anomalous region is in the center.", True, "center", MANY),
        ("No: region 2 touches the top border.", True, "edge", MANY),
        ("Yes: the detector found no anomalous region anywhere.", True, "edge", NORMAL),
        ("No: the detector found no anomalous region anywhere.", False, "edge", NORMAL),
    ],
)
def test_a_question_whether_a_place_is_clean_wants_the_opposite_yes(
    answer: str, useful: bool, focus: str, inspection: Inspection
) -> None:
    case = Case(inspection, evidence_for(inspection))
    assert score_answer(answer, "near", case, polarity="normal", focus=focus).useful is useful, answer


@pytest.mark.parametrize(
    "normal",
    [dataclasses.replace(NORMAL, confidence="low"), dataclasses.replace(NORMAL, warnings=["references unlike it"])],
    ids=["low confidence", "warning"],
)
def test_a_normal_verdict_that_cannot_be_trusted_alone_is_usefully_answered_by_confirming_it(normal) -> None:
    case = Case(normal)
    grounded = answer_text(read_question("What should I do next?"), Grounds(normal))
    assert score_answer(grounded, "next_check", case).useful, grounded
    assert not score_answer("Nothing needs a closer look: the part can pass.", "next_check", case).useful


def test_regions_listed_by_place_are_never_undercounted() -> None:
    """A bar across the top and two blobs at the top: 'two at the top' would say two where three reach the top, so
    the listing names each region by number, and the scorer reads no wrong count."""
    bars = ((5, 2, 80, 6, 0.9, 40), (35, 15, 5, 5, 0.8, 40), (50, 15, 5, 5, 0.8, 40))
    inspection = inspection_with(bars)
    assert [r.place() for r in inspection.regions] == ["from the top left to the top right", "at the top", "at the top"]
    case = Case(inspection, evidence_for(inspection))
    counted = "There are 3 anomalous regions: one from the top left to the top right and two at the top."
    assert score_answer(counted, "count", case).contradictions, "the count-at-a-place reading this guards against"
    for question in ("How many defects are there?", "Where are the defects?", "Is there any defect?"):
        text = answer_text(read_question(question), Grounds(inspection, case.evidence))
        assert "region 2 at the top and region 3 at the top" in text, text
        assert score_answer(text, "count", case).contradictions == [], text


def test_the_trust_warnings_are_not_scored() -> None:
    text = answer_text(read_question("How many defects are there?"), Grounds(LOW))
    assert text.startswith("Warning: the references do not fit this image.")
    scored = score_answer(text, "count", Case(LOW))
    assert scored.useful and scored.contradictions == []
    recalled = answer_text(read_question("How many defects are there?"), Grounds(LOW, warned=True))
    assert recalled.startswith("Warning (as above): ") and score_answer(recalled, "count", Case(LOW)).useful
    unwarned = score_answer(without_preamble(text, LOW), "count", Case(LOW))  # the right count, no warning first
    assert not unwarned.useful and "trust warning" in unwarned.why_not
