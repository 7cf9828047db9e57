"""Grounded answers: what an Inspection holds, in words, for every kind of question an operator asks.

Every sentence here is built from the Inspection's own numbers (verdict, score, threshold, margin, confidence,
regions), the evidence against the good references (anomalygpt.evidence) and the product's defect types, and
nothing else. The LLM assistant's answer is prefilled with them (anomalygpt.guard), the template answerer says
them alone, and the claim checker (anomalygpt.claims) puts them in place of any generated sentence that
contradicts the Inspection. They name places only through Region.place() (regions.LOCATION_PHRASES), regions as
"region N", areas as regions.format_pct writes them and peak scores as "peak score X", which is how the checker
reads them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from anomalygpt.regions import (
    BORDERS,
    LOCATION_PHRASES,
    LOCATION_WORDS,
    Region,
    border_gaps,
    format_pct,
    join_words,
    near_borders,
    size_details,
    where_phrase,
)
from anomalygpt.verdict import FIT_LIMIT, STEADY_REFERENCES, few_references_note

if TYPE_CHECKING:
    from anomalygpt.evidence import RegionEvidence
    from anomalygpt.guard import Question
    from anomalygpt.inspection import Inspection

SHAPES = ("elongated", "compact")
CONTRASTS = ("darker", "brighter", "similar")
SIZES = ("small", "medium", "large")
POSITIONS = ("edge", "inside")  # the region's box comes within regions.edge_margin_px of a border, or not
# How a sentence words a region's contrast; the plural form serves "regions 4 and 5 are ...".
CONTRAST_WORDS = {
    "darker": ("darker than its surroundings", "darker than their surroundings"),
    "brighter": ("brighter than its surroundings", "brighter than their surroundings"),
    "similar": ("about as bright as its surroundings", "about as bright as their surroundings"),
}
NO_REGION = (
    "the anomaly score is above the threshold, but no single area is large enough to outline; "
    "the heat map shows where the scores are highest"
)
# "What kind" is read off the region's descriptors, never measured: every family is hedged by the confidence.
KIND_HEDGES = {"high": "most likely", "medium": "probably", "low": "perhaps (my confidence in the verdict is low)"}
CONFIDENCE_REASONS = {
    "high": "The evidence is clear.",
    "medium": "The evidence is moderate, so a second look may help.",
    "low": "The evidence is weak, so please check it by eye.",
}
REMINDER = "Warning (as above)"  # how a later answer of a conversation recalls the warnings given in full
# With a trust warning (references that do not fit, one reference, duplicates, none at all) no word may vouch for
# the margin.
UNTRUSTED_MARGIN = "But the warning above means that this margin does not make the verdict reliable: check it by eye."
GREY_SAME = 2.0  # grey levels (0-255) within which a region is "about as bright as" its good match


@dataclass(frozen=True)
class DefectType:
    """A defect family an answer may name for a region, and the region descriptors it fits (empty: any)."""

    name: str  # as the answer writes it, e.g. "crack" or "finger interruption"
    description: str = ""  # one short phrase shown beside the name, e.g. "a dark line across the cell"
    shapes: tuple[str, ...] = ()  # of SHAPES
    contrasts: tuple[str, ...] = ()  # of CONTRASTS
    sizes: tuple[str, ...] = ()  # of SIZES
    positions: tuple[str, ...] = ()  # of POSITIONS

    def __post_init__(self) -> None:
        if not self.name.strip() or any(ch in self.name for ch in "();:.,"):
            raise ValueError(f"defect type name {self.name!r}: must be non-empty words without ();:.,")
        for values, known, what in (
            (self.shapes, SHAPES, "shapes"),
            (self.contrasts, CONTRASTS, "contrasts"),
            (self.sizes, SIZES, "sizes"),
            (self.positions, POSITIONS, "positions"),
        ):
            unknown = sorted(set(values) - set(known))
            if unknown:
                raise ValueError(f"defect type {self.name!r}: unknown {what} {unknown}; known: {', '.join(known)}")

    def fits(self, region: Region, image_size: tuple[int, int]) -> bool:
        """True when every descriptor the type constrains matches the region's."""
        checks = (
            (self.shapes, region.shape),
            (self.contrasts, region.contrast),
            (self.sizes, region.size),
            (self.positions, region_position(region, image_size)),
        )
        return all(not allowed or value in allowed for allowed, value in checks)


# Families for any product, by the region descriptors they fit; a preset's defect_types come first. Every
# combination of shape, contrast and size fits at least one of them (tests/test_grounded.py checks).
GENERIC_DEFECT_TYPES = (
    DefectType("crack", "a thin break in the material", shapes=("elongated",), contrasts=("darker", "similar")),
    DefectType("scratch", "a thin line in the surface", shapes=("elongated",)),
    DefectType("spot", "a small dark or bright mark", ("compact",), ("darker", "brighter"), ("small", "medium")),
    DefectType("contamination", "foreign material on the surface", ("compact",), ("darker", "brighter")),
    DefectType("dead area", "a dark patch that does not respond", ("compact",), ("darker",), ("medium", "large")),
    DefectType("stain", "a low-contrast discoloured patch", sizes=("medium", "large"), contrasts=("similar",)),
    DefectType("uneven process", "a large area that differs from the good parts", sizes=("large",)),
    DefectType("missing material", "a chipped or broken edge", ("compact",), ("darker", "brighter"), (), ("edge",)),
    DefectType("texture irregularity", "a local change of texture without contrast", ("compact",), ("similar",)),
)


def region_position(region: Region, image_size: tuple[int, int]) -> str:
    """'edge' when the region's box comes within edge_margin_px of a border, else 'inside'."""
    height, width = image_size
    return "edge" if near_borders(region, width, height) else "inside"


def fitting_types(
    region: Region, image_size: tuple[int, int], defect_types: Sequence[DefectType] = ()
) -> list[DefectType]:
    """The product's defect types that fit the region; the generic families when none of them does."""
    own = [kind for kind in defect_types if kind.fits(region, image_size)]
    return own or [kind for kind in GENERIC_DEFECT_TYPES if kind.fits(region, image_size)]


def most_severe(regions: Sequence[Region]) -> Region:
    """The region with the highest peak score (the larger one on a tie)."""
    return max(regions, key=lambda region: (region.peak_score, -region.index))


@dataclass(frozen=True)
class Grounds:
    """Everything a grounded answer may state: the Inspection, the evidence per region, the defect types."""

    inspection: Inspection
    evidence: tuple[RegionEvidence, ...] | None = None  # None: not computed (no references at hand)
    defect_types: tuple[DefectType, ...] = ()
    reference_names: tuple[str, ...] = ()  # one per good reference, as the answers name them
    warned: bool = False  # an earlier answer of this conversation gave the Inspection's trust warnings in full

    @property
    def regions(self) -> list[Region]:
        return self.inspection.regions

    def evidence_for(self, index: int) -> RegionEvidence | None:
        found = [item for item in self.evidence or () if item.region == index]
        return found[0] if found else None


# ---------------------------------------------------------------- small phrases


def sentence(text: str) -> str:
    """Text with its first letter upper-cased and a full stop at the end."""
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def count_phrase(count: int) -> str:
    return "1 anomalous region" if count == 1 else f"{count} anomalous regions"


def region_label(region: Region) -> str:
    """'region 2 in the top right'."""
    return f"region {region.index} {region.place()}"


def region_list(regions: Sequence[Region]) -> str:
    """'region 4', 'regions 4 and 5', 'regions 4, 5 and 7'."""
    numbers = [str(region.index) for region in regions]
    return f"region {numbers[0]}" if len(numbers) == 1 else f"regions {join_words(numbers)}"


def side(margin: float) -> str:
    return "above" if margin > 0 else "below"


def score_clause(inspection: Inspection) -> str:
    """'the anomaly score 0.3165 is above the threshold 0.2004 by 4.5 normal spreads'."""
    return (
        f"the anomaly score {inspection.score:.4f} is {side(inspection.margin)} the threshold "
        f"{inspection.threshold:.4f} by {abs(inspection.margin):.1f} normal spreads"
    )


def region_description(region: Region) -> str:
    """'a large compact region at the bottom, darker than its surroundings, covering 34% of the image'."""
    return (
        f"a {region.size} {region.shape} region {region.place()}, "
        f"{CONTRAST_WORDS[region.contrast][0]}, covering {format_pct(region.area_pct)} of the image"
    )


def region_sentence(region: Region) -> str:
    """'Region 2 is a small compact region in the top right, ..., covering 0.4% of the image.'"""
    return sentence(f"region {region.index} is {region_description(region)}")


def empty_sentence(inspection: Inspection) -> str:
    """What a region question gets when there is no region: the normal verdict, or no area to outline."""
    if inspection.is_anomalous:
        return sentence(NO_REGION)
    return "The detector found no anomalous region: the image looks normal."


# ---------------------------------------------------------------- what every answer opens with


def preamble(inspection: Inspection, warned: bool = False) -> list[str]:
    """The trust warnings every answer opens with: the Inspection's own, then a low-confidence note. `warned`
    (an earlier answer gave them in full): one sentence recalls each warning by its head instead, so that a
    conversation does not bury its answers under the same paragraph."""
    if warned and inspection.warnings:
        lines = [sentence(f"{REMINDER}: " + "; ".join(warning_head(warning) for warning in inspection.warnings))]
    else:
        lines = warning_sentences(inspection)
    if inspection.confidence == "low":
        lines.append(
            f"Note: my confidence in this verdict is low, because the anomaly score is only "
            f"{abs(inspection.margin):.1f} normal spreads {side(inspection.margin)} the threshold."
        )
    return lines


def warning_sentences(inspection: Inspection) -> list[str]:
    return [sentence(f"Warning: {warning}") for warning in inspection.warnings]


def warning_head(warning: str) -> str:
    """What a reminder says of a warning: its words before the first ':' or ' (' ('the image does not look like
    the good references', 'one reference', 'no good references', '2 references are the same picture')."""
    return re.split(r":| \(", warning, maxsplit=1)[0]


def warned_before(inspection: Inspection, answers: Sequence[str]) -> bool:
    """True when one of a conversation's earlier answers opened with this Inspection's trust warnings in full
    (the same words: warnings that changed, with the sensitivity or the references, are given in full again)."""
    full = " ".join(warning_sentences(inspection))
    return bool(full) and any(answer.startswith(full) for answer in answers)


def chat_grounds(
    inspection: Inspection,
    evidence: Sequence[RegionEvidence] | None,
    defect_types: tuple[DefectType, ...],
    history: Sequence[tuple[str, str]],
) -> Grounds:
    """The grounds of one chat answer, after the conversation's (question, answer) history: its trust warnings are
    recalled when an earlier answer gave them in full (warned_before)."""
    found = None if evidence is None else tuple(evidence)
    warned = warned_before(inspection, [said for _, said in history])
    return Grounds(inspection, found, defect_types, warned=warned)


def without_preamble(text: str, inspection: Inspection) -> str:
    """An answer without the trust warnings it opens with, in full or recalled (they are the Inspection's words,
    not claims)."""
    for warned in (False, True):
        opening = " ".join(preamble(inspection, warned))
        if opening and text.startswith(opening):
            return text[len(opening) :].lstrip()
    return text


def answer_sentences(question: Question, grounds: Grounds) -> list[str]:
    """The grounded answer to a question, sentence by sentence, the trust warnings first."""
    return preamble(grounds.inspection, grounds.warned) + BUILDERS[question.kind](question, grounds)


def answer_text(question: Question, grounds: Grounds) -> str:
    return " ".join(answer_sentences(question, grounds))


# ---------------------------------------------------------------- one builder per question kind


def anomaly_answer(question: Question, grounds: Grounds) -> list[str]:
    """Yes/No (by the question's polarity) and the verdict with its regions."""
    inspection, regions = grounds.inspection, grounds.regions
    word = {"defect": "yes", "normal": "no"} if inspection.is_anomalous else {"defect": "no", "normal": "yes"}
    opening = word.get(question.polarity or "", "")
    head = f"{opening}: the image is {inspection.verdict}" if opening else f"the image is {inspection.verdict}"
    if not inspection.is_anomalous:
        return [sentence(f"{head}; the detector found no anomalous region, and {score_clause(inspection)}")]
    if not regions:
        return [sentence(f"{head}: {NO_REGION}")]
    return [sentence(f"{head}; the detector found {count_phrase(len(regions))}, {where_phrase(regions)}")]


def focus_regions(question: Question, regions: Sequence[Region]) -> list[Region]:
    """The regions a question singles out (the biggest, the most severe, region N...); all when none."""
    if not regions or question.focus is None:
        return list(regions)
    if question.focus == "biggest":
        return [regions[0]]
    if question.focus == "smallest":
        return [regions[-1]]
    if question.focus == "severe":
        return [most_severe(regions)]
    return [region for region in regions if region.index == question.focus]


def missing_focus(question: Question, grounds: Grounds) -> list[str] | None:
    """The answer to a question about region N when there is no region N; None otherwise."""
    if not isinstance(question.focus, int) or not grounds.regions or focus_regions(question, grounds.regions):
        return None
    n = len(grounds.regions)
    numbered = "region 1" if n == 1 else f"regions 1 to {n}"
    return [sentence(f"the detector found {count_phrase(n)}, numbered as {numbered}, so I cannot say")]


def focus_title(question: Question, region: Region) -> str:
    """'the biggest anomalous region (region 1)' or 'region 3'."""
    titles = {"biggest": "the biggest", "smallest": "the smallest", "severe": "the most severe"}
    title = titles.get(str(question.focus))
    return f"{title} anomalous region (region {region.index})" if title else f"region {region.index}"


def where_answer(question: Question, grounds: Grounds) -> list[str]:
    """Every region's place; the singled-out region's alone when the question asks about one."""
    regions = grounds.regions
    if not regions:
        return [empty_sentence(grounds.inspection)]
    missing = missing_focus(question, grounds)
    if missing is not None:
        return missing
    if question.focus is not None:
        region = focus_regions(question, regions)[0]
        return [sentence(f"{focus_title(question, region)} is {region.place()}")]
    if len(regions) == 1:
        return [sentence(f"the anomaly is {where_phrase(regions)} (region 1)")]
    numbered = ", ".join(region_label(region) for region in regions)
    return [sentence(f"there are {count_phrase(len(regions))}: {where_phrase(regions)}"), sentence(numbered)]


def where_exactly_answer(question: Question, grounds: Grounds) -> list[str]:
    """Pixel boxes and centres of the regions asked about."""
    regions = grounds.regions
    if not regions:
        return [empty_sentence(grounds.inspection)]
    height, width = grounds.inspection.image_size
    boxes = "; ".join(box_phrase(region) for region in focus_regions(question, regions))
    return missing_focus(question, grounds) or [
        sentence(f"in pixel coordinates of this {width}x{height} image: {boxes}")
    ]


def box_phrase(region: Region) -> str:
    """'region 1 in the top left: x 10-29, y 5-19, centred near (20, 12)' (inclusive ranges)."""
    x0, y0, x1, y1 = region.box
    cx, cy = (int(value) for value in region.centroid)
    return f"{region_label(region)}: x {x0}-{x1 - 1}, y {y0}-{y1 - 1}, centred near ({cx}, {cy})"


def count_answer(question: Question, grounds: Grounds) -> list[str]:
    """The number of regions first, then their places."""
    inspection, regions = grounds.inspection, grounds.regions
    if not regions:
        if inspection.is_anomalous:
            return [sentence(f"I can outline 0 anomalous regions: {NO_REGION}")]
        return ["There are 0 anomalous regions: the image looks normal."]
    verb = "is" if len(regions) == 1 else "are"
    return [sentence(f"there {verb} {count_phrase(len(regions))}: {where_phrase(regions)}")]


def biggest_answer(question: Question, grounds: Grounds) -> list[str]:
    """Exactly one region: the biggest, or the most severe when the question asks for that."""
    regions = grounds.regions
    if not regions:
        return [empty_sentence(grounds.inspection)]
    if len(regions) == 1:
        region = regions[0]
        return [sentence(f"there is only one: region 1, {region_description(region)}")]
    if question.focus == "severe":
        region = most_severe(regions)
        return [
            sentence(
                f"the most severe is {region_label(region)}: its peak score, {region.peak_score:.4f}, is the highest "
                f"of all regions, and it covers {format_pct(region.area_pct)} of the image"
            )
        ]
    region = regions[0]
    text = f"the biggest is {region_label(region)}: it is {region.size}, covering {format_pct(region.area_pct)}"
    return [sentence(f"{text} of the image")]


def size_answer(question: Question, grounds: Grounds) -> list[str]:
    """Size words and areas of the regions asked about, and their total."""
    inspection, regions = grounds.inspection, grounds.regions
    if not regions:
        if inspection.is_anomalous:
            return [sentence(NO_REGION)]
        return ["There is nothing to measure: no region is anomalous (0% of the image)."]
    missing = missing_focus(question, grounds)
    if missing is not None:
        return missing
    if question.focus is not None or len(regions) == 1:
        region = focus_regions(question, regions)[0]
        title = focus_title(question, region) if question.focus is not None else "it"
        place = "" if question.focus is None else f" {region.place()}"
        return [sentence(f"{title}{place} is {region.size}: it covers {format_pct(region.area_pct)} of the image")]
    total = format_pct(sum(region.area_pct for region in regions))
    return [sentence(f"together they cover {total} of the image: {size_details(regions)}")]


def confidence_answer(question: Question, grounds: Grounds) -> list[str]:
    """The confidence word, the margin behind it, and what it means for the operator."""
    inspection = grounds.inspection
    return [
        sentence(
            f"my confidence is {inspection.confidence} that the image is {inspection.verdict}: the anomaly score is "
            f"{abs(inspection.margin):.1f} normal spreads {side(inspection.margin)} the threshold"
        ),
        UNTRUSTED_MARGIN if inspection.warnings else CONFIDENCE_REASONS[inspection.confidence],
        *rarity_sentence(inspection),
        *threshold_note(inspection),
    ]


def rarity_sentence(inspection: Inspection) -> list[str]:
    """The p-value of a conformal threshold's inspection in words (claims.RARITY reads it back), when there is one."""
    if inspection.p_value is None:
        return []
    return [f"Good parts like the references score this high about {format_pct(100 * inspection.p_value)} of the time."]


def rate_sentence(inspection: Inspection) -> list[str]:
    """What a conformal threshold promises (claims.RATE reads it back), when the inspection used it unmoved by a
    sensitivity."""
    rate = false_alarm_rate(inspection)
    if rate is None:
        return []
    return [f"It is set so that good parts like the references score above it at most {format_pct(100 * rate)} of the "
            "time."]  # fmt: skip


def false_alarm_rate(inspection: Inspection) -> float | None:
    """The rate the inspection's threshold keeps: its calibration's conformal rate, unless a sensitivity moved it."""
    rate = inspection.calibration.get("false_alarm_rate")
    if rate is None or inspection.threshold != inspection.calibration.get("image_threshold"):
        return None
    return float(rate)


def threshold_note(inspection: Inspection) -> list[str]:
    """The inspection's notes (a threshold from few references, verdict.few_references_note) as sentences."""
    return [sentence(note) for note in inspection.notes]


# Where each mode's threshold comes from ("why" answers): a sentence that is true of the inspection's own mode.
THRESHOLD_SOURCES = {
    "few-shot": "The threshold comes from the good references alone.",
    "pool": "The threshold comes from the good references alone.",
    "zero-shot-text": "With no good references, the threshold is fixed from simulated normal images.",
    "zero-shot-batch": (
        "With no good references, the threshold comes from this batch's own scores, assuming most of its images "
        "are good."
    ),
}


def why_answer(question: Question, grounds: Grounds) -> list[str]:
    """The score against the threshold, the margin, and the region that drives the score."""
    inspection, regions = grounds.inspection, grounds.regions
    lines = [
        sentence(f"{score_clause(inspection)}, so the verdict is {inspection.verdict} ({inspection.confidence} "
                 "confidence)"),
        THRESHOLD_SOURCES.get(inspection.mode, THRESHOLD_SOURCES["few-shot"]),
        *rate_sentence(inspection),
        *threshold_note(inspection),
    ]  # fmt: skip
    if not inspection.is_anomalous:
        return lines
    if not regions:
        return [*lines, sentence(NO_REGION)]
    region = most_severe(regions)
    detail = "of all regions" if len(regions) > 1 else "in the image"
    lines.append(
        sentence(
            f"{region_label(region)} drives the score: its peak score, {region.peak_score:.4f}, is the highest "
            f"{detail}, and it covers {format_pct(region.area_pct)} of the image"
        )
    )
    return lines


def kind_answer(question: Question, grounds: Grounds) -> list[str]:
    """Likely defect families per group of alike regions, from shape, contrast, size and position, hedged."""
    inspection, regions = grounds.inspection, grounds.regions
    if not regions:
        if inspection.is_anomalous:
            return [sentence(f"I cannot tell the kind of defect: {NO_REGION}")]
        return ["There is no defect to classify: the detector found no anomalous region."]
    missing = missing_focus(question, grounds)
    if missing is not None:
        return missing
    hedge = KIND_HEDGES[inspection.confidence]
    lines = [asked_family_sentence(question, grounds)] if question.family else []
    for group in alike_groups(focus_regions(question, regions), inspection.image_size):
        lines.append(kind_sentence(group, hedge, grounds))
    return [line for line in lines if line]


def alike_groups(regions: Sequence[Region], image_size: tuple[int, int]) -> list[list[Region]]:
    """Regions grouped by (shape, contrast, size, position), in the order of their first member."""
    groups: dict[tuple[str, ...], list[Region]] = {}
    for region in regions:
        key = (region.shape, region.contrast, region.size, region_position(region, image_size))
        groups.setdefault(key, []).append(region)
    return list(groups.values())


def kind_sentence(group: Sequence[Region], hedge: str, grounds: Grounds) -> str:
    """'Region 1 in the center (large, compact, brighter than its surroundings): by its shape and contrast, it is
    most likely uneven process (a large area that differs from the good parts).'"""
    first, plural = group[0], len(group) > 1
    subject = region_list(group) if plural else region_label(first)
    descriptors = f"{first.size}, {first.shape}, {CONTRAST_WORDS[first.contrast][int(plural)]}"
    if region_position(first, grounds.inspection.image_size) == "edge":
        descriptors += ", at the image border"
    kinds = fitting_types(first, grounds.inspection.image_size, grounds.defect_types)
    names = " or ".join(type_phrase(kind) for kind in kinds)
    whose, verb = ("their", "each is") if plural else ("its", "it is")
    return sentence(f"{subject} ({descriptors}): by {whose} shape and contrast, {verb} {hedge} {names}")


def type_phrase(kind: DefectType) -> str:
    """'crack (a thin break in the material)'."""
    return f"{kind.name} ({kind.description})" if kind.description else kind.name


def asked_family_sentence(question: Question, grounds: Grounds) -> str:
    """Whether the family the question names fits any region asked about."""
    name = str(question.family)
    chosen = focus_regions(question, grounds.regions)
    size = grounds.inspection.image_size
    fitting = [r for r in chosen if any(k.name == name for k in fitting_types(r, size, grounds.defect_types))]
    if fitting:
        return sentence(f"{region_list(fitting)} could be a {name} by its shape and contrast")
    return sentence(f"by their shape and contrast none of the regions I describe below looks like a {name}")


def compare_answer(question: Question, grounds: Grounds) -> list[str]:
    """Per region: the good reference and place that match it best, and how the region differs from it."""
    inspection, regions = grounds.inspection, grounds.regions
    if inspection.n_references == 0:
        return [f"There are no good references to compare with: this inspection is {inspection.mode}."]
    if not inspection.is_anomalous:
        return [
            sentence(
                f"compared with the good references, no area stands out enough to count as a defect: "
                f"{score_clause(inspection)}"
            )
        ]
    if not regions:
        return [sentence(f"the image differs from the good references as a whole: {NO_REGION}")]
    chosen = focus_regions(question, regions) or regions
    verb = "differs" if len(regions) == 1 else "differ"
    lines = [sentence(f"compared with the {inspection.n_references} good references, {count_phrase(len(regions))} "
                      f"{verb} from them")]  # fmt: skip
    for region in chosen:
        lines.append(evidence_sentence(region, grounds))
    return lines


def references_answer(question: Question, grounds: Grounds) -> list[str]:
    """Whether the good references suit this image (the reference-fit check in words) and what their number
    allows; a question whether there are enough of them is answered on the number first."""
    inspection = grounds.inspection
    n = inspection.n_references
    if n == 0:
        return [
            f"There are no good references: this inspection is {inspection.mode}. Give 4 or more good images of the "
            "product for a dependable verdict."
        ]
    fit = inspection.reference_fit or {}
    look: tuple[bool | None, str]
    number: tuple[bool | None, str]
    if fit.get("fits") is True:
        look = (
            True,
            f"the image's distance to the nearest reference is {float(fit['ratio']):.1f} times the references' "
            f"typical spacing (up to {FIT_LIMIT:g} counts as like them), and its brightness is like theirs",
        )
    elif fit.get("fits") is False:
        look = (False, "the image does not look like them (the warning above says how)")
    else:
        look = (None, "with one reference nothing shows how good parts vary, so the image's look is not compared")
    note = few_references_note(n)
    if note:
        number = (False, note)
    elif n >= STEADY_REFERENCES:
        number = (True, f"{n} good references are enough for a steady threshold ({STEADY_REFERENCES} or more)")
    else:  # one reference: its caveat is among the warnings
        number = (False, "one reference is too few: give 4 or more good images of the product")
    first, then = (number, look) if question.focus == "number" else (look, number)
    word = {True: "yes: ", False: "no: ", None: ""}[first[0]]
    return [sentence(word + first[1]), sentence(then[1])]


def evidence_sentence(region: Region, grounds: Grounds) -> str:
    """'Region 1 at the bottom best matches reference 2 (cell0101.png) at the bottom, and is 14 grey levels
    darker than that good area, with a rougher texture; it covers 34% of the image.'"""
    found = grounds.evidence_for(region.index)
    if found is None:
        return region_sentence(region)
    difference = found.difference
    if abs(difference) < GREY_SAME:
        shade = f"about as bright as that good area (within {GREY_SAME:.0f} grey levels)"
    else:
        shade = f"{abs(difference):.0f} grey levels {'darker' if difference < 0 else 'brighter'} than that good area"
    texture = {"rougher": ", with a rougher texture", "smoother": ", with a smoother texture"}.get(found.texture, "")
    return sentence(
        f"{region_label(region)} best matches reference {found.reference + 1} ({found.reference_name}) "
        f"{LOCATION_PHRASES[found.location]}, and is {shade}{texture}; it covers {format_pct(region.area_pct)} "
        "of the image"
    )


def describe_answer(question: Question, grounds: Grounds) -> list[str]:
    """Every region asked about: size, shape, place, contrast and area."""
    regions = grounds.regions
    if not regions:
        if grounds.inspection.is_anomalous:
            return [sentence(NO_REGION)]
        return ["There is nothing to describe: the image looks like a normal part."]
    missing = missing_focus(question, grounds)
    if missing is not None:
        return missing
    if len(regions) == 1:
        return [sentence(f"it is {region_description(regions[0])} (region 1)")]
    return [region_sentence(region) for region in focus_regions(question, regions)]


def near_answer(question: Question, grounds: Grounds) -> list[str]:
    """Yes or No for a place the question names (the image border, a side, a corner or a grid cell): Yes means a
    region is there, or, for a question whether the place is clean ("Is the top left OK?", polarity "normal"),
    that none is."""
    regions, clean = grounds.regions, question.polarity == "normal"
    if not regions:
        if grounds.inspection.is_anomalous:
            return [sentence(f"I cannot tell: {NO_REGION}")]
        return [f"{'Yes' if clean else 'No'}: the detector found no anomalous region anywhere."]
    chosen = focus_regions(question, regions) or regions
    if question.place in (None, "edge"):
        found, text = edge_finding(chosen, grounds)
    else:
        places = place_locations(str(question.place))
        inside = [region for region in chosen if set(region.places) & set(places)]
        found = bool(inside)
        if inside:
            text = ", and ".join(f"region {r.index} is {r.place()}" for r in inside)
        else:
            listed = join_words([LOCATION_PHRASES[word] for word in places]).replace(" and ", " or ")
            subject = "the anomalous regions are" if len(chosen) > 1 else f"region {chosen[0].index} is"
            text = f"no anomalous region is {listed}; {subject} {where_phrase(chosen)}"
    return [sentence(f"{'yes' if found != clean else 'no'}: {text}")]


def place_locations(place: str) -> tuple[str, ...]:
    """The grid cells a place names: itself, a side's three cells, the four corners or the center."""
    if place in BORDERS:
        return tuple(word for word in LOCATION_WORDS if place in word.split())
    if place == "corner":
        return ("top left", "top right", "bottom left", "bottom right")
    return (place,)


def edge_answer(regions: Sequence[Region], grounds: Grounds) -> list[str]:
    """Yes with the regions and borders involved, or No with the smallest distance to a border."""
    found, text = edge_finding(regions, grounds)
    return [sentence(f"{'yes' if found else 'no'}: {text}")]


def edge_finding(regions: Sequence[Region], grounds: Grounds) -> tuple[bool, str]:
    """Whether a region comes near the image border, and the regions and borders involved or the smallest gap."""
    height, width = grounds.inspection.image_size
    near = [(region, near_borders(region, width, height)) for region in regions]
    near = [(region, sides) for region, sides in near if sides]
    if not near:
        gap = min(min(border_gaps(region, width, height).values()) for region in regions)
        subject = "every region stays" if len(regions) > 1 else f"region {regions[0].index} stays"
        return False, f"{subject} at least {gap} px away from the image border"
    return True, "; ".join(edge_phrase(region, sides, width, height) for region, sides in near)


def edge_phrase(region: Region, sides: list[str], width: int, height: int) -> str:
    """'region 2 touches the top and left borders' or 'region 1 comes within 3 px of the bottom border'."""
    gap = min(border_gaps(region, width, height)[border] for border in sides)
    noun = "border" if len(sides) == 1 else "borders"
    reach = "touches" if gap == 0 else f"comes within {gap} px of"
    return f"region {region.index} {reach} the {join_words(sides)} {noun}"


def next_check_answer(question: Question, grounds: Grounds) -> list[str]:
    """Where to look first, then the rest, border contact, and what the confidence and warnings ask for."""
    inspection, regions = grounds.inspection, grounds.regions
    lines = []
    if not inspection.is_anomalous and (inspection.confidence == "low" or inspection.warnings):
        lines.append("The detector found no anomalous region, but do not pass the part on this verdict alone.")
    elif not inspection.is_anomalous:
        lines.append("Nothing here needs a closer look: the part can pass; inspect the next one as usual.")
    elif not regions:
        lines.append(sentence(f"look where the heat map is hottest: {NO_REGION}"))
    else:
        first = regions[0]
        lines.append(f"The image is anomalous ({inspection.confidence} confidence), so it should not pass unchecked.")
        lines.append(
            sentence(
                f"check {region_label(first)} first: it is the biggest, covering {format_pct(first.area_pct)} "
                "of the image; compare it with a known good part"
            )  # fmt: skip
        )
        if len(regions) > 1:
            rest = region_list(regions[1:]) if len(regions) <= 4 else f"regions 2 to {len(regions)}"
            lines.append(sentence(f"then check {rest}"))
        height, width = inspection.image_size
        if any(near_borders(region, width, height) for region in regions):
            lines.append("A region reaches the image border, so make sure the part is fully in view there.")
    if inspection.confidence == "low":
        lines.append("My confidence is low, so confirm the verdict by eye before acting on it.")
    if inspection.warnings and inspection.n_references:
        lines.append("Check that the references are good parts of the same product, seen the same way.")
    return lines


def score_answer(question: Question, grounds: Grounds) -> list[str]:
    inspection = grounds.inspection
    return [sentence(f"{score_clause(inspection)}, so the verdict is {inspection.verdict}")]


def other_answer(question: Question, grounds: Grounds) -> list[str]:
    """The verdict, and what else can be asked."""
    return [
        *anomaly_answer(question, grounds),
        "You can ask me where, how many, how large, what kind of defect it could be, how sure I am, why, how the "
        "image compares with the good references, whether the references suit it, or what to check next.",
    ]


BUILDERS: dict[str, Callable[[Question, Grounds], list[str]]] = {
    "anomaly": anomaly_answer,
    "where": where_answer,
    "where_exactly": where_exactly_answer,
    "near": near_answer,
    "count": count_answer,
    "biggest": biggest_answer,
    "size": size_answer,
    "confidence": confidence_answer,
    "why": why_answer,
    "kind": kind_answer,
    "compare": compare_answer,
    "references": references_answer,
    "describe": describe_answer,
    "next_check": next_check_answer,
    "score": score_answer,
    "other": other_answer,
}
