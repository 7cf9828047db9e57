"""Scoring chat answers about real inspections: every stated fact checked, and usefulness by explicit rules.

Written apart from anomalygpt.claims (the checker the answers went through), with its own reading, so that a
fact the checker misreads is not misread here the same way. An answer is cut into sentences and each sentence into
clauses (";" and ":"); within a clause every word that states a fact is bound to the region named last before it
("region 3 ... small" binds "small" to region 3), to region 1 when there is only one region, and otherwise to
"some region" (or "no region" after a negation). Facts read: the verdict, counts (overall and per place), places,
size words, areas, shape and contrast words, confidence words, region and reference numbers, scores, thresholds,
margins, peak scores, grey-level differences against the best good match, border gaps, pixel boxes, defect types,
and which region is the biggest / most severe. The trust warnings an answer opens with (in full, or recalled in one
sentence later in a chat) are the Inspection's own words and are skipped; an answer about an Inspection with
warnings that does not open with one is not useful, whatever it says.

Usefulness, per question kind (KINDS), by the rules in USEFUL: how many -> the first count stated is the number
of regions; where -> every region's place is named; biggest -> exactly one region is named, the right one; what
kind -> at least one defect type that fits a named region's descriptors; compare -> a reference and a difference
are named; and so on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from anomalygpt.evidence import RegionEvidence
from anomalygpt.grounded import GENERIC_DEFECT_TYPES, DefectType, most_severe, place_locations, without_preamble
from anomalygpt.inspection import Inspection
from anomalygpt.regions import (
    LOCATION_WORDS,
    NUMBER_WORDS,
    WIDESPREAD,
    Region,
    border_gaps,
    format_pct,
    near_borders,
)
from anomalygpt.verdict import STEADY_REFERENCES

KINDS = (
    "anomaly",
    "where",
    "count",
    "biggest",
    "size",
    "confidence",
    "kind",
    "compare",
    "references",
    "describe",
    "near",
    "why",
    "next_check",
)
PLACES = {word: word for word in LOCATION_WORDS} | {"centre": "center", "middle": "center"}
PLACE_WORD = re.compile(r"\b(the )(very )?(top left|top right|bottom left|bottom right|top|bottom|left|right|center|"
                        r"centre|middle)\b(?! (border|edge)s?\b)(?!-)", re.IGNORECASE)  # fmt: skip
SIZE_WORD = re.compile(r"\b(small|tiny|medium|large|big|huge)\b(?! enough)", re.IGNORECASE)
SIZE_OF = {"small": "small", "tiny": "small", "medium": "medium", "large": "large", "big": "large", "huge": "large"}
SHAPE_WORD = re.compile(r"\b(elongated|line-like|linear|compact|spot-like|round)\b", re.IGNORECASE)
SHAPE_OF = {"elongated": "elongated", "line-like": "elongated", "linear": "elongated"}
SHAPE_OF |= {"compact": "compact", "spot-like": "compact", "round": "compact"}
CONTRAST_OF = {"dark": "darker", "darker": "darker", "bright": "brighter", "brighter": "brighter"}
BORDERS = re.compile(r"\bthe ((top|bottom|left|right)(, | and | or )?)+ (image )?(border|edge)s?\b", re.IGNORECASE)
# Phrases whose words would read as claims: the confidence word, and the questions an answer offers to take.
NOT_CLAIMS = re.compile(
    r"\b(low|medium|high) confidence\b|\bconfidence (is |in this verdict is )?(low|medium|high)\b"
    r"|\bhow (large|big|many|sure)\b",
    re.IGNORECASE,
)
SIMILAR_WORDS = re.compile(r"\babout as (bright|dark) as (its|their) surroundings\b", re.IGNORECASE)
DARK_BRIGHT = re.compile(r"\b(darker|brighter|dark|bright)\b(?! than (that|the|a) (good|reference|match))", re.I)
NEGATION = re.compile(r"\b(no|not|none|nothing|nowhere|neither|nor|without)\b|n't\b", re.IGNORECASE)
REGION_MENTION = re.compile(r"\b[Rr]egions? (\d+(?:(?:, | and | or | to |-)\d+)*)(?!\d|\.\d|%)")
REFERENCE_MENTION = re.compile(r"\breference (\d+)\b")
COUNTED = re.compile(
    rf"(?<![\w.#-])((?:other|remaining) )?(\d+|{'|'.join(NUMBER_WORDS)}) "
    r"((?:separate|anomalous|distinct|outlined) )*(regions?|anomalies|anomaly|defects?|places)\b",
    re.IGNORECASE,
)
PLACE_COUNT = re.compile(rf"(?<![\w.#-])(\d+|{'|'.join(NUMBER_WORDS)}) (in|at|on) the (\w+(?: left| right)?)\b", re.I)
PERCENT = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s?%")
# How often good parts score this high (a profile's p-value): a percentage that is not an area
RARITY = re.compile(r"\bscore this high\b[^.%]*?(\d+(?:\.\d+)?)\s?% of the time", re.IGNORECASE)
# How often good parts score above the threshold (the rate a profile's conformal threshold keeps): not an area either
RATE = re.compile(r"\bscore above (?:it|the threshold)\b[^.%]*?(\d+(?:\.\d+)?)\s?% of the time", re.IGNORECASE)
FOUR_DECIMALS = re.compile(r"(?<![\d.])(\d+\.\d{4})(?!\d)")
SPREADS = re.compile(r"(\d+(?:\.\d+)?) normal spreads?")
GREY_LEVELS = re.compile(r"(\d+) gr[ae]y levels? (darker|brighter)")
BOX = re.compile(r"x (\d+)-(\d+), y (\d+)-(\d+)")
PIXELS = re.compile(r"(\d+) px\b")
CONFIDENCE_WORD = re.compile(
    r"\b(low|medium|high) confidence\b|\bconfidence(?: is|:| in this verdict is)? (low|medium|high)", re.IGNORECASE
)
NORMAL_SAYING = re.compile(
    r"\b(image|part|cell|it) (is|looks|appears|seems) (normal|fine|good|ok|defect-free)\b|\bverdict is normal\b"
    r"|\b(matches|fits) the good references\b|\bfound no anomalous region\b(?! (is|at|in|on|near))"
    r"|\b0 anomalous regions\b|\bcan pass\b",
    re.IGNORECASE,
)
ANOMALOUS_SAYING = re.compile(
    r"(?<!0% of the )\b(image|part|cell|it) (is|looks|appears|seems) (anomalous|defective|abnormal|damaged|faulty)\b"
    r"|\bverdict is anomalous\b|\b(found|shows?|has|detected) ([1-9]\d*|an?|one) (anomalous region|anomal|defect)"
    r"|\bdiffers? from (them|the good references)\b",
    re.IGNORECASE,
)
SEVERE_WORDS = re.compile(r"\bmost severe\b|\bthe highest of all\b|\bdrives the score\b", re.IGNORECASE)
BIGGEST_WORDS = re.compile(r"\b(biggest|largest)\b", re.IGNORECASE)
DIFFERENCE_WORDS = re.compile(r"\b(darker|brighter|grey levels|rougher|smoother|about as bright as that good area)\b")
SENTENCE = re.compile(r"(?<=[.!?])\s+")


@dataclass
class Scored:
    """One answer's score: the facts it gets wrong, and whether it does what its question kind asks."""

    contradictions: list[str] = field(default_factory=list)
    useful: bool = True
    why_not: str = ""  # the rule an unuseful answer broke


@dataclass(frozen=True)
class Case:
    """What an answer is scored against."""

    inspection: Inspection
    evidence: tuple[RegionEvidence, ...] = ()
    defect_types: tuple[DefectType, ...] = ()

    @property
    def regions(self) -> list[Region]:
        return self.inspection.regions

    @property
    def width_height(self) -> tuple[int, int]:
        height, width = self.inspection.image_size
        return width, height


def number(word: str) -> int:
    return int(word) if word.isdigit() else NUMBER_WORDS.index(word.lower())


def mentioned_regions(text: str) -> list[int]:
    """Every region number a text names ('regions 2 to 4' names 2, 3 and 4)."""
    out: list[int] = []
    for found in REGION_MENTION.finditer(text):
        for part in re.split(r", | and | or ", found.group(1)):
            ends = [int(value) for value in re.split(r" to |-", part)]
            out += list(range(ends[0], ends[-1] + 1))
    return out


def score_answer(answer: str, kind: str, case: Case, polarity: str | None = None, focus: str | None = None) -> Scored:
    """Contradictions and usefulness of one answer to a question of `kind` (polarity: for yes/no defect
    questions, 'defect' or 'normal'; focus: 'biggest' or 'severe' for the question singling one out)."""
    text = without_preamble(answer.strip(), case.inspection)
    scored = Scored(contradictions=fact_errors(text, case, polarity if kind == "anomaly" else None))
    rule = USEFUL[kind](text, case, polarity, focus)
    if case.inspection.warnings and not answer.strip().startswith("Warning"):
        rule = "does not say first that the inspection carries a trust warning"
    scored.useful, scored.why_not = rule is None, rule or ""
    return scored


# ---------------------------------------------------------------- facts


def fact_errors(text: str, case: Case, polarity: str | None) -> list[str]:
    errors: list[str] = []
    sentences = [s for s in SENTENCE.split(text) if s.strip()]
    for index, sentence in enumerate(sentences):
        errors += verdict_errors(sentence, case, polarity if index == 0 else None)
        errors += number_errors(sentence, case)
        errors += confidence_errors(sentence, case)
        sentence = CONFIDENCE_WORD.sub(lambda m: " " * len(m.group(0)), sentence)  # read: not a size word
        for clause in re.split(r"[;:]", strip_reference_names(sentence, case.defect_types)):
            errors += clause_errors(clause, case)
    return errors


def strip_reference_names(sentence: str, defect_types: Sequence[DefectType] = ()) -> str:
    """'reference 2 (cell0101.png)' -> 'reference 2'; defect type descriptions in brackets removed."""
    out = re.sub(r"(reference \d+) \([^)]*\)", r"\1", sentence)
    for kind in (*defect_types, *GENERIC_DEFECT_TYPES):
        out = out.replace(f"({kind.description})", "")
    return out


def verdict_errors(sentence: str, case: Case, polarity: str | None) -> list[str]:
    anomalous = case.inspection.is_anomalous
    says = set()
    if NORMAL_SAYING.search(sentence):
        says.add(False)
    if ANOMALOUS_SAYING.search(sentence):
        says.add(True)
    opening = re.match(r"\W*(yes|no)\b", sentence, re.IGNORECASE)
    if polarity is not None and opening is not None:
        says.add((opening.group(1).lower() == "yes") == (polarity == "defect"))
    return [f"verdict: {sentence!r}"] if any(claim != anomalous for claim in says) else []


def number_errors(sentence: str, case: Case) -> list[str]:
    """Counts, region/reference numbers, scores, margins and boxes, anywhere in the sentence."""
    inspection, regions, errors = case.inspection, case.regions, []
    for value in mentioned_regions(sentence):
        if not 1 <= value <= len(regions):
            errors.append(f"region number {value} of {len(regions)}")
    for found in REFERENCE_MENTION.finditer(sentence):
        if not 1 <= int(found.group(1)) <= inspection.n_references:
            errors.append(f"reference number {found.group(1)}")
    plain = REGION_MENTION.sub("region #", sentence)
    for found in COUNTED.finditer(plain):
        expected = len(regions) - (1 if found.group(1) else 0)
        if number(found.group(2)) != expected:
            errors.append(f"count: {found.group(0)!r}, {len(regions)} regions")
    for found in PLACE_COUNT.finditer(plain):
        place = PLACES.get(found.group(3).lower())
        if place is not None and number(found.group(1)) != sum(place in r.places for r in regions):
            errors.append(f"count at a place: {found.group(0)!r}")
    known = [inspection.score, inspection.threshold, *(r.peak_score for r in regions)]
    for found in FOUR_DECIMALS.finditer(sentence):
        if not any(f"{value:.4f}" == found.group(1) for value in known):
            errors.append(f"score: {found.group(1)}")
    for found in SPREADS.finditer(sentence):
        if abs(float(found.group(1)) - abs(inspection.margin)) > 0.051:
            errors.append(f"margin: {found.group(0)}")
    for found in BOX.finditer(sentence):
        x0, x1, y0, y1 = (int(v) for v in found.groups())
        if not any(r.box == (x0, y0, x1 + 1, y1 + 1) for r in regions):
            errors.append(f"box: {found.group(0)}")
    return errors


def clause_errors(clause: str, case: Case) -> list[str]:
    """Places, sizes, areas, shapes, contrasts, confidence, grey levels, defect types, ranks in one clause."""
    errors: list[str] = []
    answer_word = re.fullmatch(r"\W*(yes|no)\W*", clause, re.IGNORECASE) or re.match(r"\W*no\s*,", clause, re.I)
    negative = NEGATION.search(clause[answer_word.end() if answer_word else 0 :]) is not None
    clause = NOT_CLAIMS.sub(lambda m: " " * len(m.group(0)), clause)
    for word, value, position in stated_words(clause):
        owners = owners_at(clause, position, case)
        errors += word_errors(word, value, owners, negative, case)
    errors += percent_errors(clause, case)
    errors += evidence_errors(clause, case)
    errors += rank_errors(clause, case)
    errors += border_errors(clause, case)
    return errors


def stated_words(clause: str) -> list[tuple[str, str, int]]:
    """(kind of word, value, position) of every place, size, shape, contrast and defect-type word."""
    text = re.sub(r"reference \d+[^;]*", lambda m: " " * len(m.group(0)), clause)  # a reference's own place
    text = BORDERS.sub(lambda m: " " * len(m.group(0)), text)  # border names are not places
    words = [("place", PLACES[m.group(3).lower()], m.start(3)) for m in PLACE_WORD.finditer(text)]
    words += [("size", SIZE_OF[m.group(1).lower()], m.start()) for m in SIZE_WORD.finditer(text)]
    words += [("shape", SHAPE_OF[m.group(1).lower()], m.start()) for m in SHAPE_WORD.finditer(text)]
    similar = SIMILAR_WORDS.search(text)
    if similar is not None:
        words.append(("contrast", "similar", similar.start()))
        text = text[: similar.start()] + " " * len(similar.group(0)) + text[similar.end() :]
    words += [("contrast", CONTRAST_OF[m.group(1).lower()], m.start()) for m in DARK_BRIGHT.finditer(text)]
    return words


def owners_at(clause: str, position: int, case: Case) -> list[Region] | None:
    """The region(s) named last before `position` in the clause; region 1 when it is the only one; else None."""
    before = mentioned_regions_with_positions(clause[:position])
    if before:
        numbers = before[-1]
        return [r for r in case.regions if r.index in numbers]
    if BIGGEST_WORDS.search(clause[:position]) and case.regions:
        return [case.regions[0]]
    return case.regions[:1] if len(case.regions) == 1 else None


def mentioned_regions_with_positions(text: str) -> list[list[int]]:
    return [mentioned_regions(found.group(0)) for found in REGION_MENTION.finditer(text)]


def word_errors(word: str, value: str, owners: list[Region] | None, negative: bool, case: Case) -> list[str]:
    attribute = {"place": "location", "size": "size", "shape": "shape", "contrast": "contrast"}[word]
    regions = case.regions if owners is None else owners
    # A region is in every grid cell it spans ("from the bottom to the bottom right").
    matches = [value in region.places if word == "place" else getattr(region, attribute) == value for region in regions]
    if negative:
        return [f"{word} {value} said absent"] if any(matches) else []
    if owners is not None and regions and all(matches):
        return []
    if owners is None and any(matches):
        return []
    return [f"{word} {value} ({', '.join(str(r.index) for r in regions) or 'no region'})"]


def confidence_errors(sentence: str, case: Case) -> list[str]:
    return [
        f"confidence {word}"
        for found in CONFIDENCE_WORD.finditer(sentence)
        if (word := (found.group(1) or found.group(2)).lower()) != case.inspection.confidence
    ]


def percent_errors(clause: str, case: Case) -> list[str]:
    inspection = case.inspection
    p_value = inspection.p_value
    errors = [
        f"p-value {found.group(1)}%"
        for found in RARITY.finditer(clause)
        if p_value is None or not rounds_to(found.group(1), 100 * p_value)
    ]
    # The rate holds only for the threshold the references set (no sensitivity moved it)
    unmoved = inspection.threshold == inspection.calibration.get("image_threshold")
    rate = inspection.calibration.get("false_alarm_rate") if unmoved else None
    errors += [
        f"false-alarm rate {found.group(1)}%"
        for found in RATE.finditer(clause)
        if rate is None or not rounds_to(found.group(1), 100 * rate)
    ]
    clause = RATE.sub(" ", RARITY.sub(" ", clause))
    regions = case.regions
    named = [r for r in regions if r.index in mentioned_regions(clause)]
    pool = named if len(named) == 1 else regions
    allowed = [r.area_pct for r in pool] + [sum(r.area_pct for r in regions)]
    for found in PERCENT.finditer(clause):
        said = found.group(1)
        if regions and not any(rounds_to(said, area) for area in allowed) or not regions and float(said) != 0:
            errors.append(f"area {said}%")
    return errors


def rounds_to(written: str, value: float) -> bool:
    """True when `value` rounded to the written number's decimals is the written number ('3' for 2.91, not 0 for
    any region: a region covers more than nothing)."""
    decimals = len(written.split(".")[1]) if "." in written else 0
    return float(written) > 0 and round(value, decimals) == float(written)


def evidence_errors(clause: str, case: Case) -> list[str]:
    """'region 1 best matches reference 2 ... 14 grey levels darker': the reference and the difference."""
    named = mentioned_regions(clause)
    if len(set(named)) != 1 or not case.evidence:
        return []
    found = [e for e in case.evidence if e.region == named[0]]
    if not found:
        return []
    item, errors = found[0], []
    for reference in REFERENCE_MENTION.finditer(clause):
        if int(reference.group(1)) != item.reference + 1:
            errors.append(f"reference {reference.group(1)} for region {item.region}")
    for grey in GREY_LEVELS.finditer(clause):
        darker = grey.group(2) == "darker"
        if darker != (item.difference < 0) or abs(int(grey.group(1)) - abs(item.difference)) > 1:
            errors.append(f"grey levels: {grey.group(0)}")
    return errors


def rank_errors(clause: str, case: Case) -> list[str]:
    named = mentioned_regions(clause)
    if not case.regions or len(set(named)) != 1:
        return []
    errors = []
    if BIGGEST_WORDS.search(clause) and named[0] != 1 and "check" not in clause.lower():
        errors.append(f"biggest said of region {named[0]}")
    if SEVERE_WORDS.search(clause) and named[0] != most_severe(case.regions).index:
        errors.append(f"most severe said of region {named[0]}")
    return errors


def border_errors(clause: str, case: Case) -> list[str]:
    """'touches the top border', 'within 3 px of', 'at least 12 px away' against the regions' border gaps."""
    width, height = case.width_height
    named = [r for r in case.regions if r.index in mentioned_regions(clause)] or case.regions
    gaps = [gap for r in named for gap in border_gaps(r, width, height).values()]
    errors = []
    if "border" in clause or "edge" in clause:
        for found in PIXELS.finditer(clause):
            if int(found.group(1)) not in gaps:
                errors.append(f"border gap {found.group(0)}")
        if re.search(r"\btouches\b", clause) and 0 not in gaps:
            errors.append("touches a border")
    return errors


# ---------------------------------------------------------------- usefulness


Rule = Callable[[str, Case, str | None, str | None], str | None]


def says_nothing_found(text: str) -> bool:
    return re.search(r"no anomalous region|0 anomalous regions|nothing|no defect|normal", text, re.I) is not None


def useful_anomaly(text: str, case: Case, polarity: str | None, focus: str | None) -> str | None:
    verdict = case.inspection.verdict
    if polarity is not None:
        expected = "yes" if case.inspection.is_anomalous == (polarity == "defect") else "no"
        if not text.lower().startswith(expected):
            return f"does not open with {expected}"
    return None if re.search(rf"\b{verdict}\b", text) else f"does not say {verdict}"


def useful_where(text: str, case: Case, polarity: str | None, focus: str | None) -> str | None:
    if not case.regions:
        return None if says_nothing_found(text) or "outline" in text else "no 'nothing found'"
    named = {PLACES[m.group(3).lower()] for m in PLACE_WORD.finditer(text)}
    widespread = "most of the image" in text
    missing = [
        r.where() for r in case.regions if not (named & set(r.places) or (widespread and r.location == WIDESPREAD))
    ]
    return f"places missing: {sorted(missing)}" if missing else None


def useful_count(text: str, case: Case, polarity: str | None, focus: str | None) -> str | None:
    found = COUNTED.search(REGION_MENTION.sub("region #", text))
    stated = None if found is None else number(found.group(2))
    return None if stated == len(case.regions) else f"states {stated}, not {len(case.regions)}"


def useful_biggest(text: str, case: Case, polarity: str | None, focus: str | None) -> str | None:
    if not case.regions:
        return None if says_nothing_found(text) or "outline" in text else "no 'nothing found'"
    named = set(mentioned_regions(text))
    right = most_severe(case.regions).index if focus == "severe" else 1
    return None if named == {right} else f"names regions {sorted(named)}, not {right}"


def useful_size(text: str, case: Case, polarity: str | None, focus: str | None) -> str | None:
    if not case.regions:
        return None if "0%" in text or "outline" in text else "no 0%"
    chosen = [case.regions[0]] if focus == "biggest" else case.regions
    stated = {f"{m.group(1)}%" for m in PERCENT.finditer(text)}
    missing = [r.index for r in chosen if format_pct(r.area_pct) not in stated]
    return f"areas missing for regions {missing}" if missing else None


def useful_confidence(text: str, case: Case, polarity: str | None, focus: str | None) -> str | None:
    words = {(m.group(1) or m.group(2)).lower() for m in CONFIDENCE_WORD.finditer(text)}
    return None if words == {case.inspection.confidence} else f"confidence words {sorted(words)}"


def useful_kind(text: str, case: Case, polarity: str | None, focus: str | None) -> str | None:
    if not case.regions:
        return None if says_nothing_found(text) or "outline" in text else "no 'nothing to classify'"
    size = case.inspection.image_size
    for kind in (*case.defect_types, *GENERIC_DEFECT_TYPES):
        if re.search(rf"\b{re.escape(kind.name)}\b", text) and any(kind.fits(r, size) for r in case.regions):
            return None
    return "no fitting defect type named"


def useful_compare(text: str, case: Case, polarity: str | None, focus: str | None) -> str | None:
    if not case.inspection.is_anomalous:
        return None if re.search(r"no area stands out", text) else "does not say that no area stands out"
    if not case.regions:
        return None if "differs from the good references" in text else "does not say it differs"
    if not REFERENCE_MENTION.search(text):
        return "names no reference"
    return None if DIFFERENCE_WORDS.search(text) else "names no difference"


def useful_references(text: str, case: Case, polarity: str | None, focus: str | None) -> str | None:
    """Yes when the image looks like the references, No when it does not (focus "number", a question whether
    there are enough: Yes from STEADY_REFERENCES on), and how many there are."""
    inspection = case.inspection
    if inspection.n_references == 0:
        return None if "no good references" in text else "does not say there are none"
    if focus == "number":  # "Are there enough references?": the number first
        expected: str | None = "yes" if inspection.n_references >= STEADY_REFERENCES else "no"
    else:
        expected = {True: "yes", False: "no"}.get((inspection.reference_fit or {}).get("fits"))
    if expected is not None and not text.lower().startswith(expected):
        return f"does not open with {expected}"
    said = re.search(rf"\b{inspection.n_references}\b|\bone reference\b", text)
    return None if said else "does not say how many references"


def useful_describe(text: str, case: Case, polarity: str | None, focus: str | None) -> str | None:
    if not case.regions:
        return None if says_nothing_found(text) or "outline" in text else "no 'nothing to describe'"
    shapes = {SHAPE_OF[m.group(1).lower()] for m in SHAPE_WORD.finditer(text)}
    missing = {r.shape for r in case.regions} - shapes
    return f"shapes missing {sorted(missing)}" if missing else None


def useful_near(text: str, case: Case, polarity: str | None, focus: str | None) -> str | None:
    """focus here is the place asked about ('edge' or a place word); polarity "normal": the question asks whether
    the place is clean, so Yes means no region is there."""
    clean = polarity == "normal"
    if not case.regions:
        expected = "yes" if clean else "no"
        return None if text.lower().startswith(expected) or "outline" in text else f"does not say {expected}"
    width, height = case.width_height
    if focus in (None, "edge"):
        near = any(near_borders(r, width, height) for r in case.regions)
    else:
        near = any(set(r.places) & set(place_locations(focus)) for r in case.regions)
    expected = "yes" if near != clean else "no"
    return None if text.lower().startswith(expected) else f"does not open with {expected}"


def useful_why(text: str, case: Case, polarity: str | None, focus: str | None) -> str | None:
    inspection = case.inspection
    needed = [f"{inspection.score:.4f}", f"{inspection.threshold:.4f}", f"{abs(inspection.margin):.1f} normal spread"]
    missing = [value for value in needed if value not in text]
    if missing:
        return f"missing {missing}"
    if case.regions and most_severe(case.regions).index not in mentioned_regions(text):
        return "does not name the region that drives the score"
    return None


def useful_next(text: str, case: Case, polarity: str | None, focus: str | None) -> str | None:
    if not case.inspection.is_anomalous and (case.inspection.warnings or case.inspection.confidence == "low"):
        # a normal verdict that cannot be trusted alone: the useful advice is to confirm it, never to pass the part
        said = re.search(r"\bby eye\b|\bcheck (that )?the references\b", text, re.I)
        return None if said else "does not say to confirm the verdict by eye"
    if not case.inspection.is_anomalous:
        return None if re.search(r"can pass|nothing", text, re.I) else "does not say it can pass"
    if not case.regions:
        return None if "heat map" in text else "does not point at the heat map"
    return None if 1 in mentioned_regions(text) else "does not name a region to check"


USEFUL: dict[str, Rule] = {
    "anomaly": useful_anomaly,
    "where": useful_where,
    "count": useful_count,
    "biggest": useful_biggest,
    "size": useful_size,
    "confidence": useful_confidence,
    "kind": useful_kind,
    "compare": useful_compare,
    "references": useful_references,
    "describe": useful_describe,
    "near": useful_near,
    "why": useful_why,
    "next_check": useful_next,
}


def defect_types_named(text: str, types: Sequence[DefectType]) -> list[str]:
    return [kind.name for kind in (*types, *GENERIC_DEFECT_TYPES) if re.search(rf"\b{re.escape(kind.name)}\b", text)]


@dataclass(frozen=True)
class BankQuestion:
    kind: str  # one of KINDS
    text: str
    # yes/no questions: "defect" (Yes = a defect, or for "near" a region at the place) or "normal" (Yes = good, or
    # the place clean); None: the scorer's default ("near": Yes = a region is there)
    polarity: str | None = None
    focus: str | None = None  # "biggest"/"severe" for a question singling one region out; the place for "near"


# Operators' questions, several phrasings of each kind; most are not the training conversations' wording.
BANK = (
    BankQuestion("anomaly", "Is there any defect?", "defect"),
    BankQuestion("anomaly", "Is this cell OK?", "normal"),
    BankQuestion("anomaly", "Do you see anything wrong with it?", "defect"),
    BankQuestion("anomaly", "Does this cell pass inspection?", "normal"),
    BankQuestion("anomaly", "Any anomalies in this one?", "defect"),
    BankQuestion("where", "Where is it?"),
    BankQuestion("where", "Where are the defects?"),
    BankQuestion("where", "Which part of the cell is affected?"),
    BankQuestion("where", "Can you point me to the problem areas?"),
    BankQuestion("where", "Where should I look?"),
    BankQuestion("count", "How many defects are there?"),
    BankQuestion("count", "How many regions did you find?"),
    BankQuestion("count", "Count the anomalies for me."),
    BankQuestion("count", "Is there more than one defect?"),
    BankQuestion("count", "What is the number of flagged areas?"),
    BankQuestion("biggest", "Which one is the biggest?", focus="biggest"),
    BankQuestion("biggest", "Which region is the largest?", focus="biggest"),
    BankQuestion("biggest", "Which defect is the most severe?", focus="severe"),
    BankQuestion("biggest", "What is the worst area?", focus="severe"),
    BankQuestion("biggest", "What is the main defect?", focus="biggest"),
    BankQuestion("size", "How large is it?"),
    BankQuestion("size", "How big are the defects?"),
    BankQuestion("size", "How much of the cell is affected?"),
    BankQuestion("size", "How large is the biggest one?", focus="biggest"),
    BankQuestion("size", "What area do they cover?"),
    BankQuestion("confidence", "How sure are you?"),
    BankQuestion("confidence", "How confident are you in this verdict?"),
    BankQuestion("confidence", "Can I trust this result?"),
    BankQuestion("confidence", "Are you certain?"),
    BankQuestion("kind", "What kind of defect could it be?"),
    BankQuestion("kind", "What type of defect is this?"),
    BankQuestion("kind", "Could it be a crack?"),
    BankQuestion("kind", "What could have caused this?"),
    BankQuestion("kind", "How would you classify it?"),
    BankQuestion("compare", "Compare it with the good references."),
    BankQuestion("compare", "How does it differ from the good cells?"),
    BankQuestion("compare", "What is different compared to the reference images?"),
    BankQuestion("compare", "Does it look like the good ones?"),
    BankQuestion("references", "Is the reference set OK?"),
    BankQuestion("references", "Are the good references suitable for this image?"),
    BankQuestion("references", "Are there enough references?", focus="number"),
    BankQuestion("describe", "Describe it."),
    BankQuestion("describe", "What does it look like?"),
    BankQuestion("describe", "Can you describe the defect?"),
    BankQuestion("describe", "Tell me about the anomaly."),
    BankQuestion("near", "Is it near the edge?", focus="edge"),
    BankQuestion("near", "Does it touch the border?", focus="edge"),
    BankQuestion("near", "Is there a defect in the top left corner?", focus="top left"),
    BankQuestion("near", "Is anything close to the center?", focus="center"),
    BankQuestion("near", "Is it at the bottom?", focus="bottom"),
    BankQuestion("near", "Is the top left corner clean?", "normal", focus="top left"),
    BankQuestion("near", "Is the edge free of defects?", "normal", focus="edge"),
    BankQuestion("why", "Why do you think so?"),
    BankQuestion("why", "Why is it flagged?"),
    BankQuestion("why", "What makes you say that?"),
    BankQuestion("why", "Explain your verdict."),
    BankQuestion("next_check", "What should I do next?"),
    BankQuestion("next_check", "What do you recommend?"),
    BankQuestion("next_check", "What should I check first?"),
    BankQuestion("next_check", "Should I reject this cell?"),
)
