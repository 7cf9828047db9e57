"""Keep answers consistent with the detector: question intents, forced openings, and `contradicts`.

The detector decides, the LLM explains. Where a question asks for a fact the Inspection holds, the assistant's
turn is prefilled with that fact and the model only continues it: the opening word ("Yes"/"No") of a yes/no
question about whether there is a defect, the region count of a count question, every region's location of a
where question, every region's size word and area of a size question, every region's shape and contrast of an
appearance question, and the confidence word of a confidence question (in the wording of the training
conversations). `contradicts` reads an answer's claims about the verdict, so a bench can count how often an
unguarded model contradicts the Inspection it was given. Intent names are those of simulation/conversations.py.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from anomalygpt.regions import CONTRAST_PHRASES, appearance_details, format_pct, size_details, where_phrase

if TYPE_CHECKING:
    from anomalygpt.inspection import Inspection

ANOMALY_INTENT = "anomaly"  # "is there a defect?": the only intent whose answer opens with a forced Yes/No
OTHER_INTENT = "other"
# First match wins, so the more specific intents come first ("Where exactly?" before "Where...").
INTENT_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (intent, re.compile(pattern, re.IGNORECASE))
    for intent, pattern in (
        ("near_edge", r"\b(edges?|borders?|boundary|boundaries)\b"),
        ("where_exactly", r"\b(exact(ly)?|precise(ly)?|coordinates?|pixels?|bounding|box(es)?)\b"),
        ("count", r"\bhow many\b|\bcount\b|\bnumber of\b"),
        ("size", r"\bhow (large|big|much)\b|\bsize\b|\bwhat area\b|\bbig or small\b|\bcover(s|ed)?\b"),
        ("confidence", r"\b(confiden\w*|sure|certain\w*|trust|reliable)\b"),
        ("appearance", r"\blooks? like\b|\b(kind|type) of\b|\bdescribe\b"),
        ("where", r"\bwhere\b|\bwhich part\b|\blocat\w*\b"),
        ("next_check", r"\bnext\b|\brecommend\w*\b|\badvice\b|\bshould i\b"),
    )
)
YES_NO_START = re.compile(
    r"^\W*(is|are|was|were|does|do|did|has|have|had|can|could|would|will|should|any)\b", re.IGNORECASE
)
DEFECT_NOUN = r"(defects?|anomal(y|ies)|flaws?|damage|problems?|issues?|faults?|cracks?|scratch(es)?)"
# Asking whether it is good: "Yes" then means normal. Matched first and blanked, so "defect-free" is not a defect.
NORMAL_WORDS = re.compile(
    rf"\bdefect-free\b|\b(free (of|from)|without( any| a)?) {DEFECT_NOUN}\b"
    r"|\b(normal|ok|okay|fine|good|acceptable|intact|flawless|perfect|pass(es)?)\b",
    re.IGNORECASE,
)
DEFECT_WORDS = re.compile(
    rf"\b{DEFECT_NOUN}\b|\b(anomalous|abnormal|defective|damaged|broken|faulty|flawed|cracked|wrong|bad)\b",
    re.IGNORECASE,
)
# "Is the defect dark?" presupposes a defect: it asks about it, not whether there is one.
DEFINITE_DEFECT = re.compile(rf"\b(the|this|that|these|those|its|each) {DEFECT_NOUN}\b", re.IGNORECASE)
OPENING = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
SUBJECT = r"(image|part|it|this|product|sample|surface|item|picture|everything|cell|object)"
DEFECT_ADJECTIVE = r"(defective|anomalous|abnormal|damaged|faulty)"
NORMAL_CLAIMS = re.compile(
    rf"\b{SUBJECT}\s+(looks|appears|is|seems)\s+(to be\s+)?(normal|fine|ok|okay|good|defect-free|flawless|intact)\b"
    r"|\bno (anomal\w*|defects?|flaws?|damage)\b"
    r"(?!\s+regions?\s+(at|near|on|along)\s+(the|an?|any)\s+(edges?|borders?))"  # "none at the edge": no verdict
    r"|\bnothing (looks|is|seems|appears) (defective|wrong|anomalous|abnormal|unusual)\b"
    r"|\b(0|zero) (separate )?anomalous regions?\b"
    r"|(?<![\d.])\b0% of the image\b"  # not the end of "1.0%"
    r"|\bnot (defective|anomalous|abnormal|damaged)\b",
    re.IGNORECASE,
)
COUNT = r"([1-9]\d*|one|two|three|four|five|six|seven|eight|nine|ten)"
ANOMALOUS_CLAIMS = re.compile(
    rf"(?<!0% of the )\b{SUBJECT}\s+(is|looks|appears|seems)\s+(to be\s+)?{DEFECT_ADJECTIVE}\b"
    r"|\b(shows?|has|contains?|found|detected)\s+(an?\s+|some\s+)?(anomal(y|ies)|defects?|flaws?)\b"
    rf"|\b{COUNT} (separate )?(anomalous regions?|anomalies|defects)\b"
    r"|\bregions? looks? abnormal\b",
    re.IGNORECASE,
)


def question_intent(question: str) -> str:
    """One of the simulated conversations' intents ("anomaly", "where", "count", ...) or "other"."""
    for intent, pattern in INTENT_PATTERNS:
        if pattern.search(question):
            return intent
    return ANOMALY_INTENT if presence_polarity(question) is not None else OTHER_INTENT


def presence_polarity(question: str) -> str | None:
    """For a yes/no question on whether there is a defect: "defect" (Yes = defect) or "normal" (Yes = good)."""
    if not YES_NO_START.search(question) or DEFINITE_DEFECT.search(question):
        return None
    if any(pattern.search(question) for _, pattern in INTENT_PATTERNS):
        return None
    asks_normal = NORMAL_WORDS.search(question) is not None
    asks_defect = DEFECT_WORDS.search(NORMAL_WORDS.sub(" ", question)) is not None
    if asks_normal == asks_defect:  # neither, or "normal or defective?": not a yes/no question
        return None
    return "normal" if asks_normal else "defect"


def expected_opening(question: str, inspection: Inspection) -> str | None:
    """The opening the Inspection dictates: "Yes"/"No" for a defect yes/no question, the region count for a count
    question, the regions' locations for a where question, their sizes and areas for a size question, their
    shapes and contrasts for an appearance question, the confidence word for a confidence question; None for any
    other question, and for the region questions on an image that is anomalous by its score with no region
    outlined (no fact to state)."""
    polarity = presence_polarity(question)
    if polarity is not None:
        return "Yes" if inspection.is_anomalous == (polarity == "defect") else "No"
    intent, regions = question_intent(question), inspection.regions
    if intent == "confidence":
        return f"My confidence is {inspection.confidence} that the image is {inspection.verdict}"
    if intent not in ("count", "where", "size", "appearance") or inspection.is_anomalous != bool(regions):
        return None
    n = len(regions)
    if intent == "count":
        return {0: "I count 0 anomalous regions", 1: "There is 1 anomalous region"}.get(
            n, f"There are {n} anomalous regions"
        )
    if intent == "appearance":
        if n == 0:
            return "Nothing looks unusual; the image looks like a normal part"
        if n == 1:
            return f"A {regions[0].shape} region, {CONTRAST_PHRASES[regions[0].contrast]}"
        return f"In {n} places: {appearance_details(regions)}"
    if intent == "size":
        if n == 0:
            return "There is nothing to measure: no region is anomalous (0% of the image)"
        if n == 1:
            return f"It is {regions[0].size}: it covers {format_pct(regions[0].area_pct)} of the image"
        total = format_pct(sum(region.area_pct for region in regions))
        return f"Together they cover {total} of the image: {size_details(regions)}"
    if n == 0:
        return "Nowhere. I found no anomalous region"
    where = where_phrase(regions)
    return f"The anomaly is {where}" if n == 1 else f"There are {n} anomalous regions: {where}"


def answer_claims(answer: str, question: str | None = None) -> set[bool]:
    """Verdicts the answer states: True = anomalous, False = normal; empty when it states none.

    An opening Yes/No counts when the question asks whether there is a defect; question None reads the answer
    as a reply to "Is there a defect?".
    """
    claims = {False} if NORMAL_CLAIMS.search(answer) else set()
    if ANOMALOUS_CLAIMS.search(answer):
        claims.add(True)
    polarity = "defect" if question is None else presence_polarity(question)
    opening = OPENING.match(answer)
    if polarity is not None and opening is not None:
        claims.add((opening.group(1).lower() == "yes") == (polarity == "defect"))
    return claims


def contradicts(answer: str, inspection: Inspection, question: str | None = None) -> bool:
    """True when the answer states a verdict other than the Inspection's (an answer stating both counts)."""
    return any(claim != inspection.is_anomalous for claim in answer_claims(answer, question))
