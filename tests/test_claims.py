"""The claim checker on hand-made inspections: grounded answers pass, every kind of wrong fact is caught and
repaired, and streaming holds back only the sentence being checked."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
from chat_cases import LOW, MANY, NORMAL, ONE, POOL, POOL_NORMAL, SPANNING, WIDESPREAD, evidence_for

from anomalygpt.claims import CheckTally, ClaimChecker, check_answer
from anomalygpt.grounded import Grounds, answer_text, region_sentence
from anomalygpt.guard import Question, read_question
from anomalygpt.inspection import Inspection
from eval.chat_scorer import BANK

GROUNDS = Grounds(MANY, evidence_for(MANY))


def facts(text: str, grounds: Grounds = GROUNDS, question: Question | None = None) -> set[str]:
    return {conflict.fact for conflict in check_answer(text, grounds, question)}


@pytest.mark.parametrize(
    "inspection",
    [NORMAL, ONE, MANY, LOW, SPANNING, WIDESPREAD, POOL, POOL_NORMAL],
    ids=["normal", "one", "many", "low", "spanning", "widespread", "pool", "pool-normal"],
)
def test_every_grounded_answer_passes_the_checker(inspection: Inspection) -> None:
    grounds = Grounds(inspection, evidence_for(inspection))
    for entry in BANK:
        question = read_question(entry.text)
        text = answer_text(question, grounds)
        assert check_answer(text, grounds, question) == [], (entry.text, text)
        checker = ClaimChecker(grounds, question)
        assert "".join(checker.stream([], text)) == text and checker.report.opening_conflicts == []


def test_how_often_good_parts_score_this_high_is_the_p_value_and_not_an_area() -> None:
    pool = Grounds(POOL, evidence_for(POOL))  # p = 2 / 209: 0.96 %, written 1.0%
    said = answer_text(read_question("How sure are you?"), pool)
    assert "Good parts like the references score this high about 1.0% of the time." in said
    assert "score this high" not in answer_text(read_question("How sure are you?"), GROUNDS)  # no p-value
    assert facts("Good parts like the references score this high about 1% of the time.", pool) == set()
    assert facts("Good parts score this high about 5% of the time.", pool) == {"score"}
    assert facts("Good parts score this high about 1% of the time.", GROUNDS) == {"score"}  # MANY has none
    normal = Grounds(POOL_NORMAL, evidence_for(POOL_NORMAL))
    assert facts("Good parts like the references score this high about 62% of the time.", normal) == set()


def test_why_says_the_rate_a_conformal_threshold_keeps_and_nothing_else_may_state_one() -> None:
    pool = Grounds(POOL, evidence_for(POOL))
    said = answer_text(read_question("Why is it anomalous?"), pool)
    assert "It is set so that good parts like the references score above it at most 2.0% of the time." in said
    assert "score above it" not in answer_text(read_question("Why is it anomalous?"), GROUNDS)  # no stated rate
    assert facts("Good parts score above it at most 2% of the time.", pool) == set()
    assert facts("Good parts score above it at most 5% of the time.", pool) == {"score"}
    assert facts("Good parts score above it about 2% of the time.", GROUNDS) == {"score"}  # MANY keeps no rate
    moved = Grounds(replace(POOL, threshold=0.45), evidence_for(POOL))  # a sensitivity lowered the threshold
    assert "score above it" not in answer_text(read_question("Why is it anomalous?"), moved)
    assert facts("Good parts score above it at most 2% of the time.", moved) == {"score"}


def test_a_region_is_in_every_cell_it_spans() -> None:
    grounds = Grounds(SPANNING, evidence_for(SPANNING))
    assert SPANNING.regions[0].where() == "top left to bottom left"
    for place in ("in the top left", "on the left", "in the bottom left"):
        assert facts(f"Region 1 is {place}.", grounds) == set(), place
    assert facts("Region 1 is on the right.", grounds) == {"location"}
    assert facts("There is one region in the bottom left.", grounds) == set()
    assert facts("There are two regions on the left.", grounds) == {"count"}
    wide = Grounds(WIDESPREAD, evidence_for(WIDESPREAD))
    assert WIDESPREAD.regions[0].location == "widespread"
    assert facts("Region 1 is in the top left.", wide) == set()
    assert facts("Region 1 is at the bottom.", wide) == {"location"}


@pytest.mark.parametrize(
    ("sentence", "fact"),
    [
        ("There are 2 anomalous regions.", "count"),
        ("I found two in the top left.", "count"),
        ("Region 2 is in the bottom left.", "location"),
        ("Region 3 is compact.", "shape"),
        ("Region 1 is brighter than its surroundings.", "contrast"),
        ("Region 2 is dark.", "contrast"),
        ("Region 1 covers 5% of the image.", "area"),
        ("Region 1 is large.", "size"),
        ("Region 4 is small.", "region"),
        ("The biggest is region 2.", "rank"),
        ("The most severe is region 3.", "rank"),
        ("Region 1 has the highest peak score.", "rank"),
        ("Region 1 on the left drives the score 66.", "rank"),
        ("My confidence is high.", "confidence"),
        ("I am very sure about it.", "confidence"),
        ("The anomaly score is 0.9000.", "score"),
        ("It is 3.5 normal spreads above the threshold.", "score"),
        ("The score is below the threshold.", "score"),
        ("Region 1 could be a crack.", "family"),
        ("Region 3 is a foreign patch.", "family"),  # a word for contamination, which elongated region 3 does not fit
        ("Region 2 looks like a fracture.", "family"),  # a crack: region 2 is compact
        ("Region 1 is a hole.", "family"),  # no descriptor tells a hole
        ("There are bubbles at the bottom.", "family"),
        ("No anomalous region is in the top left.", "location"),
        ("Region 2 touches the bottom border.", "edge"),
        ("Region 1 is near the edge.", "edge"),
        ("The image looks normal.", "verdict"),
        ("They fit the image perfectly.", "verdict"),
        ("Region 3 is small and compact, so it is not noticeable.", "verdict"),  # a flagged region played down
        # True words, then a "not" that a reader can take as denying them: replaced (the chat bench's cell2439)
        ("Region 1 in the top left is rough and darker, so it is not well labelled.", "location"),
        ("Region 1 in the top left is rough and darker, so it is not well labelled.", "contrast"),
        ("The region at the bottom is negligible.", "verdict"),
        ("Region 1 best matches reference 1 at the top left.", "reference"),
        ("Region 1 is 30 grey levels darker than that good area.", "reference"),
        ("Region 1 is brighter than the good reference.", "reference"),
        ("Region 3 is 0.4% of the image.", "area"),
        ("Region 1 covers 1.9% of the image.", "area"),  # 1.78% does not round to 1.9%
        ("I see 1.8% in each of the 3 regions.", "area"),
        ("In pixel coordinates: x 1-9, y 1-9.", "box"),
    ],
)
def test_a_wrong_fact_is_caught(sentence: str, fact: str) -> None:
    assert fact in facts(sentence), sentence


@pytest.mark.parametrize(
    "sentence",
    [
        "Region 3 at the bottom is elongated and about as bright as its surroundings.",
        "There is one in the top left, one in the top right and one at the bottom.",
        "It is not in the center.",
        "Region 2 touches the top border.",
        "Region 1 is darker than its surroundings and covers 1.8% of the image.",
        "The biggest is region 1 in the top left.",
        "Region 2 in the top right has the highest peak score.",
        "Region 2 in the top right drives the score.",
        "Region 3 could be a scratch.",
        "Region 1 could be dirt or a foreign particle.",  # contamination fits compact, darker region 1
        "Region 3 could be a scrape.",
        "It is not a hole.",
        "Region 1 best matches reference 2 in the top left, and is 14 grey levels darker than that good area.",
        "Together they cover 4.1% of the image.",
        "The image is anomalous, and my confidence is medium.",
        "Check region 1 first, then the other 2 regions.",
        "There is no defect at the center.",
    ],
)
def test_a_right_sentence_passes(sentence: str) -> None:
    assert facts(sentence) == set(), sentence


def test_on_a_normal_image_any_region_fact_is_wrong() -> None:
    grounds = Grounds(NORMAL)
    for sentence in ("There is a small spot at the top.", "Region 1 is elongated.", "It covers 2% of the image."):
        assert facts(sentence, grounds), sentence
    assert facts("Nothing is at the top; the part looks fine.", grounds) == set()


@pytest.mark.parametrize(
    ("inspection", "sentence"),
    [
        (MANY, "I cannot find any defect in this image."),
        (MANY, "I can't see any anomaly here."),
        (MANY, "There are no visible defects."),
        (MANY, "The part can pass."),
        (NORMAL, "I cannot say it is normal; there is a defect."),
        (NORMAL, "There are two small flaws."),
        (NORMAL, "The part should be rejected."),
        (NORMAL, "The cell cannot pass."),
    ],
)
def test_a_verdict_said_in_other_words_is_caught(inspection: Inspection, sentence: str) -> None:
    assert "verdict" in facts(sentence, Grounds(inspection, evidence_for(inspection))), sentence


@pytest.mark.parametrize(
    ("inspection", "sentence"),
    [
        (MANY, "There are three defects; the part should be rejected."),
        (MANY, "I cannot pass this part."),
        (NORMAL, "I cannot find any defect, so the part can pass."),
        (NORMAL, "There is no visible defect."),
    ],
)
def test_the_same_words_agreeing_with_the_verdict_pass(inspection: Inspection, sentence: str) -> None:
    assert "verdict" not in facts(sentence, Grounds(inspection, evidence_for(inspection))), sentence


def test_a_pronoun_follows_the_region_named_before() -> None:
    assert facts("Region 3 is at the bottom. It is elongated.") == set()
    assert facts("Region 3 is at the bottom. It is compact.") == {"shape"}


def pieces(text: str, size: int = 5) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def test_streaming_holds_back_only_the_sentence_being_checked() -> None:
    question = read_question("Where is it?")
    opening = answer_text(question, GROUNDS)
    consumed: list[str] = []

    def generated() -> Iterator[str]:
        for piece in pieces(" Region 3 is elongated. Region 2 is in the bottom left. Look there."):
            consumed.append(piece)
            yield piece

    checker = ClaimChecker(GROUNDS, question)
    stream = checker.stream(generated(), opening)
    assert next(stream) == opening and consumed == []  # the opening comes before the model runs
    assert next(stream) == " Region 3 is elongated." and "".join(consumed).endswith("Region 3 is elongated. R")
    assert next(stream) == " " + region_sentence(MANY.regions[1])  # replaced once the sentence was complete
    assert list(stream) == [" Look there."]
    report = checker.report
    assert [(r.path, r.facts) for r in report.repairs] == [("replaced", ("location",))]
    assert report.raw.endswith("Region 2 is in the bottom left. Look there.") and report.sentences == 3
    assert report.answer == f"{opening} Region 3 is elongated. {region_sentence(MANY.regions[1])} Look there."


def test_each_repair_path() -> None:
    question = read_question("Which one is the biggest?")
    opening = answer_text(question, GROUNDS)
    model = [
        " Region 1 is in the top left.",  # right, but about the biggest only: kept
        " Region 1 is in the top left.",  # the same again: repeat
        " No region fits the label; no region fits the label.",  # a clause said twice: the model loops: repeat
        " Region 3 is elongated.",  # another region than the question singles out: off_topic
        " Region 2 is in the bottom left.",  # wrong, and about another region: off_topic, never its repair
        " There are 5 regions.",  # wrong count: replaced by the count sentence
        " There are 4 regions.",  # wrong again: its replacement was said already: dropped
        " And then",  # cut off by the token limit: unfinished
    ]
    checker = ClaimChecker(GROUNDS, question)
    checker.truncated = lambda: True
    shown = "".join(checker.stream(iter(model), opening))
    paths = ["repeat", "repeat", "off_topic", "off_topic", "replaced", "dropped", "unfinished"]
    assert [r.path for r in checker.report.repairs] == paths
    assert shown.count("Region 1 is in the top left.") == 1 and "5 regions" not in shown and "And then" not in shown
    assert check_answer(shown, GROUNDS, question) == []
    tally = CheckTally()
    tally.add(checker.report)
    assert tally.to_dict() == {
        "answers": 1,
        "fired": 1,
        "paths": {"repeat": 2, "off_topic": 2, "replaced": 1, "dropped": 1, "unfinished": 1},
        "facts": {"count": 2},
    }
    assert tally.summary() == "claim checker: 1 of 1 answers corrected (count 2)"


def test_the_issue_s_wrong_answers_are_all_caught() -> None:
    """The answers issue 19 reported, against an inspection of their kind (several regions, high confidence)."""
    wrong = {
        "Is there any defect?": "Yes, this image shows anomalies: 3 at the bottom, and 3 at the top.",
        "How sure are you?": "My confidence is low. There is only 1 anomalous region.",
        "Compare it with the good references.": "They fit the image perfectly.",
        "What kind of defect could it be?": "Region 1 is compact and about as bright as its surroundings.",
        "How large is the biggest one?": "Region 2 in the top right is medium at 1.2%; region 3 is 1.1%.",
    }
    for question, answer in wrong.items():
        asked = read_question(question)
        checker = ClaimChecker(GROUNDS, asked)
        shown = "".join(checker.stream([" " + answer], answer_text(asked, GROUNDS)))
        assert checker.report.repairs, question
        assert check_answer(shown, GROUNDS, asked) == [], (question, shown)


def test_with_a_trust_warning_no_sentence_may_vouch_for_the_verdict() -> None:
    grounds = Grounds(LOW, evidence_for(LOW))  # the references do not fit; confidence low
    vouching = ("The evidence is clear.", "You can trust this result.", "I am absolutely certain.", "It is reliable.")
    for text in vouching:
        assert facts(text, grounds) == {"confidence"}, text
        assert facts(text, GROUNDS) == set(), text  # the same words without a warning state no wrong fact
    for text in ("It is not reliable, so check it by eye.", "I can't say that the evidence is clear."):
        assert facts(text, grounds) == set(), text
    question = read_question("Where is it?")
    opening = answer_text(question, grounds)
    checker = ClaimChecker(grounds, question)
    shown = "".join(checker.stream(iter([" You can safely trust this verdict."]), opening))
    assert shown.endswith(
        "But the warning above means that this margin does not make the verdict reliable: check it by eye."
    )
    assert [(r.path, r.facts) for r in checker.report.repairs] == [("replaced", ("confidence",))]
