"""Keep answers consistent with the detector: what a question asks, the answer's grounded opening, verdict claims.

The detector decides, the LLM explains. `read_question` finds a question's kind (is there a defect, where, how
many, which is the biggest, how large, how sure, why, what kind, compare with the references, describe, near a
place, what next...), the region it singles out, the place and the defect type it names. The assistant's turn is
prefilled with the grounded answer for that kind (`expected_opening`, built by anomalygpt.grounded: the
Inspection's trust warnings first, then its facts) and the model only continues it; anomalygpt.claims then checks
every sentence the model adds. `answer_claims` / `contradicts` read an answer's claims about the verdict.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from anomalygpt.grounded import GENERIC_DEFECT_TYPES, DefectType, Grounds, answer_text

if TYPE_CHECKING:
    from anomalygpt.evidence import RegionEvidence
    from anomalygpt.inspection import Inspection

KINDS = (
    "anomaly",  # is there a defect / is it OK (yes/no by the question's polarity)
    "where",
    "where_exactly",  # pixel boxes
    "near",  # near the edge, or at a place the question names
    "count",
    "biggest",  # which region is the biggest / most severe
    "size",
    "confidence",
    "why",
    "kind",  # what kind of defect could it be
    "compare",  # compare with the good references
    "references",  # are the references right for this image, and enough
    "describe",
    "next_check",
    "score",
    "other",
)
# First match wins, so the more specific kinds come first ("What should I check near the edge?" is advice,
# "Why is the score high?" asks why, "How large is the biggest one?" asks a size).
KIND_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern, re.IGNORECASE))
    for kind, pattern in (
        (
            "next_check",
            r"\b(next|recommend\w*|advi[cs]e|suggest\w*|what should i|what (do|can|must) i do|should i (do|check"
            r"|inspect|reject|scrap|keep|pass|accept)|follow[- ]?up|action|what now|to do now|next steps?)\b",
        ),
        (
            "why",
            r"\bwhy\b|\bwhat makes (you|it)\b|\bhow do you know\b|\breasons?\b|\breasoning\b|\bexplain\b|\bjustify\b"
            r"|\bbased on what\b|\bwhat led\b|\bon what basis\b|\bwhat evidence\b",
        ),
        (
            "references",
            r"\b(references?|reference (set|images?)|good (ones|images|examples|samples))\b.{0,40}\b(ok|okay|fine"
            r"|good enough|enough|suitable|adequate|representative|right|fit|match)\b|\benough (good )?(references"
            r"|examples|good images)\b",
        ),
        (
            "compare",
            r"\bcompar\w*\b|\bdiffer\w*\b|\bversus\b|\bvs\b|\breferences?\b|\bgood (ones|images?|parts?|samples?|"
            r"cells?|examples?)\b|\bnormal (ones|images?|parts?|samples?|cells?)\b",
        ),
        ("confidence", r"\b(confiden\w*|sure|certain\w*|trust\w*|reliab\w*|doubt\w*|accurate|accuracy)\b"),
        ("score", r"\b(scores?|thresholds?|margin|sensitivity)\b"),
        ("where_exactly", r"\b(exact(ly)?|precise(ly)?|coordinates?|pixels?|bounding|box(es)?)\b"),
        ("near", r"\b(edges?|borders?|boundary|boundaries|rim|periphery)\b"),
        ("count", r"\bhow many\b|\bcount\w*\b|\bnumber of\b|\bmore than one\b|\bseveral\b|\bmultiple\b"),
        (
            "size",
            r"\bhow (large|big|small|much|wide|long|extensive)\b|\bsizes?\b|\bwhat area\b|\bbig or small\b"
            r"|\bcover(s|ed|age)?\b|\bextent\b|\bdimensions?\b|\bis (it|the \w+) (big|large|small|tiny|huge)\b",
        ),
        (
            "kind",
            r"\b(what|which) (kind|type|sort|category|class)\b|\b(kind|type|sort) of (defect|anomaly|fault|flaw|damage)"
            r"|\bwhat (could|might|can|would) (it|this|that|they) be\b|\bwhat (is|are) (it|this|that|they)\b"
            r"|\bclassif\w*|\bcategori[sz]\w*|\bidentify\b|\bwhat defect\b|\bcaus(e|ed|es|ing)\b",
        ),
        (
            "describe",
            r"\bdescri(be|ption)\b|\blooks? like\b|\bappearance\b|\bwhat do you see\b|\btell me (more )?about\b"
            r"|\bdetails?\b|\bcharacteri[sz]e\b|\bshape\b|\bcontrast\b|\bdark(er)?\b|\bbright(er)?\b",
        ),
        ("where", r"\bwhere\b|\bwhich (part|area|side|spot)\b|\blocat\w*\b|\bposition\b|\bwhereabouts\b|\bpoint me\b"),
    )
)
# Which region a question singles out; "the first one" is region 1, the biggest (regions come largest first).
FOCUS_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (focus, re.compile(pattern, re.IGNORECASE))
    for focus, pattern in (
        (
            "severe",
            r"\b(most (severe|serious|critical|important|anomalous|worrying|dangerous|suspicious)|severest|worst"
            r"|strongest|highest score|worry about most)\b",
        ),
        ("biggest", r"\b(biggest|largest|main|dominant|primary|most prominent|major|first one|first region)\b"),
        ("smallest", r"\b(smallest|tiniest|least)\b"),
    )
)
ORDINAL = re.compile(r"\b(second|third|fourth|fifth)\s+(one|region|defect|anomaly|area|spot)\b", re.IGNORECASE)
ORDINALS = ("second", "third", "fourth", "fifth")  # "first" is the biggest: a focus word
REGION_NUMBER = re.compile(r"\b(?:region|area|spot|defect|anomaly|box|number|no\.?|#)\s*#?(\d+)\b", re.IGNORECASE)
# Places a question may name, longest first; sides stand for their three grid cells (guard.place_locations).
PLACE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (place, re.compile(pattern, re.IGNORECASE))
    for place, pattern in (
        ("edge", r"\b(edges?|borders?|boundary|boundaries|rim|periphery)\b"),
        ("top left", r"\b(top|upper)[- ]left\b|\bleft[- ](top|upper)\b"),
        ("top right", r"\b(top|upper)[- ]right\b|\bright[- ](top|upper)\b"),
        ("bottom left", r"\b(bottom|lower)[- ]left\b|\bleft[- ](bottom|lower)\b"),
        ("bottom right", r"\b(bottom|lower)[- ]right\b|\bright[- ](bottom|lower)\b"),
        ("corner", r"\bcorners?\b"),
        ("center", r"\b(center|centre|middle|central)\b"),
        ("top", r"\b(top|upper)\b"),
        ("bottom", r"\b(bottom|lower)\b"),
        ("left", r"\bleft\b"),
        ("right", r"\bright\b"),
    )
)
NEAR_PLACE = re.compile(r"\b(near|close to|at|in|on|by|around|towards?)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Question:
    """What a question asks, read off its words."""

    text: str
    kind: str  # one of KINDS
    # "biggest", "smallest", "severe", a region number, or None: every region; "number" for a references question
    # on whether there are enough of them
    focus: str | int | None = None
    place: str | None = None  # "edge", a LOCATION_WORDS entry, a side ("top"...), "corner"; for kind "near"
    family: str | None = None  # a defect type the question names ("Is it a crack?")
    # for a yes/no defect question: "defect" (Yes = defect) or "normal" (Yes = good); for kind "near", "defect"
    # (Yes = a region is at the place) or "normal" (a question whether the place is clean: Yes = none is)
    polarity: str | None = None


YES_NO_START = re.compile(
    r"^\W*(is|are|was|were|does|do|did|has|have|had|can|could|would|will|should|any|anything)\b", re.IGNORECASE
)
IDENTITY = re.compile(r"\b(could|might|may) (it|this|that) be\b|\blooks? like\b|\bany\b", re.IGNORECASE)
PLACE_CONTEXT = re.compile(
    r"\b(near|close to|at|in|on|by|around|towards?|along|to)\s+(the\s+)?(very\s+)?(far\s+)?$", re.IGNORECASE
)
# "Is the top left OK?": the place is the question's subject.
PLACE_SUBJECT = re.compile(r"^\W*(is|are|was|were|does|do|did|has|have|had)\s+(the\s+)?(very\s+)?$", re.IGNORECASE)
PLACE_NOUN = re.compile(r"^[- ]*(side|half|part|third|area|region|corner|edge|portion)\b", re.IGNORECASE)
DEFECT_NOUN = r"(defects?|anomal(y|ies)|flaws?|damage|problems?|issues?|faults?|cracks?|scratch(es)?)"
# Asking whether it is good: "Yes" then means normal. Matched first and blanked, so "defect-free" is not a defect.
NORMAL_WORDS = re.compile(
    rf"\bdefect-free\b|\b(free (of|from)|without( any| a)?) {DEFECT_NOUN}\b"
    r"|\b(normal|ok|okay|fine|good|acceptable|intact|flawless|perfect|pass(es)?|clean|undamaged|unaffected|spotless)\b",
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
    r"|\bno ((visible|obvious|apparent|significant|noticeable|real) )?(anomal\w*|defects?|flaws?|damage)\b"
    r"(?!(\s+regions?)?\s+(is\s+|are\s+)?(at|near|on|along|in)\s+(the|an?|any)\b)"  # "none at the top": a place
    r"|\b(cannot|can't|could not|couldn't|do not|don't|did not|didn't)\s+(find|see|detect|spot|identify)\s+"
    r"(any|an?)\s+((visible|obvious|clear) )?(anomal\w*|defects?|flaws?|damage)\b"
    r"|\b(part|cell|product|it) can (safely )?pass\b|\bpasses (the )?inspection\b"
    r"|\bnothing (looks|is|seems|appears) (defective|wrong|anomalous|abnormal|unusual)\b"
    r"|\b(0|zero) (separate )?anomalous regions?\b"
    r"|(?<![\d.])\b0% of the image\b"  # not the end of "1.0%"
    r"|\bnot (defective|anomalous|abnormal|damaged)\b"
    r"|\bverdict (is|was) normal\b|\b(matches|fits) the (good )?references\b(?! (poorly|badly|less|only))"
    r"|\b(fits?|match(es)?) (the image |it |the references |them )?(perfectly|exactly|closely)\b"
    # a flagged region played down ("region 3 is small, so it is not noticeable"): the detector flagged it
    r"|\b(is|are|looks?|seems?)\s+(not|n't)\s+(really\s+)?(noticeable|significant|relevant|important|worrying"
    r"|an? (real |true |actual |serious )?(problem|concern|issue|defect|anomaly))\b"
    r"|\b(negligible|harmless|insignificant)\b|\bcan (safely )?be (ignored|disregarded)\b|\bnothing to worry about\b",
    re.IGNORECASE,
)
COUNT = r"([1-9]\d*|one|two|three|four|five|six|seven|eight|nine|ten)"
ANOMALOUS_CLAIMS = re.compile(
    rf"(?<!0% of the )\b{SUBJECT}\s+(is|looks|appears|seems)\s+(to be\s+)?{DEFECT_ADJECTIVE}\b"
    r"|\b(shows?|has|contains?|found|detected)\s+(an?\s+|some\s+)?(anomal(y|ies)|defects?|flaws?)\b"
    rf"|\b{COUNT} (separate )?(anomalous regions?|anomalies|defects)\b"
    r"|\bregions? looks? abnormal\b"
    r"|\bverdict (is|was) anomalous\b|\b(regions?|it|image|part|cell) differs? from (the (good )?references|them)\b"
    r"|\bthere (is|are) (an?|some|several|a few|one|two|three|[1-9]\d*) ((visible|clear|small|large|real) )?"
    r"(anomal(y|ies)|defects?|flaws?)\b"
    r"|\b(should|must) be rejected\b|\bfails? (the )?inspection\b"
    r"|\b(part|cell|product|it) (cannot|can't|must not|should not|shouldn't) pass\b",
    re.IGNORECASE,
)


def read_question(text: str, defect_types: Sequence[DefectType] = ()) -> Question:
    """The kind of a question, the region it singles out, the place and the defect type it names."""
    family = named_family(text, defect_types)
    focus = question_focus(text)
    place = question_place(text)
    kind = next((kind for kind, pattern in KIND_PATTERNS if pattern.search(text)), None)
    polarity = presence_polarity(text)
    yes_no = YES_NO_START.search(text) is not None
    if kind is None and family is not None and (yes_no or IDENTITY.search(text)):
        kind = "kind"
    elif kind is None and place is not None and yes_no:
        kind = "near"
    elif kind is None and focus is not None:
        kind = "describe" if isinstance(focus, int) else "biggest"
    elif kind is None and (polarity is not None or asks_defect(text)):
        kind = "anomaly"
    if kind == "near" and place is None:
        place = "edge"
    if kind == "references" and re.search(r"\benough\b", text, re.IGNORECASE):
        focus = "number"
    if kind == "near":  # Yes means a region is there, unless the question asks whether the place is clean
        polarity = "normal" if asks_normal_only(text) else "defect"
    return Question(" ".join(text.split()), kind or "other", focus, place, family, polarity)


def question_focus(text: str) -> str | int | None:
    """'severe', 'biggest', 'smallest', a region number, or None."""
    number = REGION_NUMBER.search(text)
    if number is not None:
        return int(number.group(1))
    ordinal = ORDINAL.search(text)
    if ordinal is not None:
        return ORDINALS.index(ordinal.group(1).lower()) + 2
    return next((focus for focus, pattern in FOCUS_PATTERNS if pattern.search(text)), None)


def question_place(text: str) -> str | None:
    """The place a question names after a preposition ('near the top', 'in the bottom left corner'), or None."""
    for place, pattern in PLACE_PATTERNS:
        for found in pattern.finditer(text):
            before = text[max(0, found.start() - 24) : found.start()]
            if (
                place in ("edge", "corner")
                or PLACE_CONTEXT.search(before)
                or PLACE_SUBJECT.match(text[: found.start()])
                or PLACE_NOUN.match(text[found.end() :])
            ):
                return place
    return None


def named_family(text: str, defect_types: Sequence[DefectType] = ()) -> str | None:
    """The first defect type (the preset's, then the generic ones) whose name the text contains."""
    for kind in (*defect_types, *GENERIC_DEFECT_TYPES):
        if re.search(rf"\b{re.escape(kind.name)}(s|es)?\b", text, re.IGNORECASE):
            return kind.name
    return None


def presence_polarity(question: str) -> str | None:
    """For a yes/no question on whether there is a defect: "defect" (Yes = defect) or "normal" (Yes = good)."""
    if not YES_NO_START.search(question) or DEFINITE_DEFECT.search(question):
        return None
    if any(pattern.search(question) for _, pattern in KIND_PATTERNS):
        return None
    asks_normal = NORMAL_WORDS.search(question) is not None
    if asks_normal == asks_defect(question):  # neither, or "normal or defective?": not a yes/no question
        return None
    return "normal" if asks_normal else "defect"


def asks_defect(text: str) -> bool:
    """The text names a defect ("defect-free" and "free of flaws" do not)."""
    return DEFECT_WORDS.search(NORMAL_WORDS.sub(" ", text)) is not None


def asks_normal_only(text: str) -> bool:
    """The text asks whether something is good ("clean", "OK", "free of defects") and names no defect."""
    return NORMAL_WORDS.search(text) is not None and not asks_defect(text)


def expected_opening(
    question: str,
    inspection: Inspection,
    evidence: Sequence[RegionEvidence] | None = None,
    defect_types: Sequence[DefectType] = (),
) -> str:
    """The grounded answer a question's reply opens with: the trust warnings, then what the Inspection holds
    for its kind (anomalygpt.grounded); the model only continues it."""
    grounds = Grounds(inspection, None if evidence is None else tuple(evidence), tuple(defect_types))
    return answer_text(read_question(question, defect_types), grounds)


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
