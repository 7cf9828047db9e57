"""Multi-turn Q&A about an image, generated from the regions of its true mask.

Regions come from ``anomalygpt.regions.find_regions(mask, 0.5, image)``, the same code the Inspector
uses, so an answer can never say more than the mask holds. JSONL format (``conversations.jsonl``, one
conversation per line, written by ``simulation/writer.py``):

- ``id`` "000042"; ``image`` "images/000042.png" and ``mask`` "masks/000042.png" (0/255 grey, exactly
  the union of the regions), both relative to the dataset folder; ``category``: parameter category or null
- ``family``: "nsa", "cutpaste", "scratch", "spot", "stain", "missing", or null for a normal image
- ``confidence``: "low", "medium" or "high", the verdict confidence the answers state
- ``regions``: ``Region.to_dict()`` list, largest first (empty for a normal image)
- ``turns``: 2-5 of ``{"intent", "question", "answer", "truth"}``; the first intent is always "anomaly".
  ``truth`` always holds ``anomalous`` (bool), ``count`` (int) and ``locations`` (one LOCATION_WORDS entry
  per region, largest first); intents add: size -> sizes, area_pct, total_area_pct; appearance -> family,
  look, shapes, contrasts; confidence -> confidence; where_exactly -> image_size [w, h], boxes
  ([x0, y0, x1, y1], x1/y1 exclusive), centroids [x, y]; near_edge -> near_edge, margin_px, edges (per
  region, subset of top/bottom/left/right), border_distance_px; next_check -> focus (region index or null),
  focus_location.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from anomalygpt.regions import (
    CONTRAST_PHRASES,
    EIGHT_CONNECTED,
    LOCATION_PHRASES,
    Region,
    appearance_details,
    border_gaps,
    default_min_area_px,
    edge_margin_px,
    find_regions,
    format_pct,
    join_words,
    near_borders,
    number_word,
    size_details,
    where_phrase,
)
from simulation.anomalies import FAMILIES

INTENTS = (
    "anomaly",
    "where",
    "count",
    "size",
    "appearance",
    "confidence",
    "where_exactly",
    "near_edge",
    "next_check",
)
FIRST_INTENT = "anomaly"
FOLLOW_UPS = ("where_exactly", "near_edge")  # only asked once "where" has been answered
# Follow-ups can only come after "where": with equal weights each came in 6-8% of 1,000 conversations,
# too rare to teach pixel coordinates; weight 3 gives about 11%.
FOLLOW_UP_WEIGHT = 3.0
TURNS_RANGE = (2, 5)  # inclusive
CONFIDENCE_WORDS = ("low", "medium", "high")
MASK_THRESHOLD = 0.5

FAMILY_LOOKS = {
    "scratch": "a scratch or crack",
    "spot": "a spot or small hole",
    "stain": "a stain or discolouration",
    "missing": "missing material",
    "nsa": "a foreign patch whose texture does not match the surface",
    "cutpaste": "a foreign patch whose texture does not match the surface",
}
UNKNOWN_LOOK = "an irregular area"  # a real mask with no simulation family
CONFIDENCE_REASONS = {
    "high": "the evidence is clear",
    "medium": "the evidence is moderate, so a second look may help",
    "low": "the evidence is weak, so please check it by eye",
}
CONFIDENCE_ADVERBS = {"high": "very", "medium": "fairly", "low": "not very"}

QUESTIONS: dict[str, tuple[str, ...]] = {
    "anomaly": (
        "Is there an anomaly in this image?",
        "Do you see any defect?",
        "Is this part defective?",
        "Does anything look wrong here?",
        "Can you find an anomaly in this picture?",
        "Does this image show a defect?",
    ),
    "where": (
        "Where is the anomaly?",
        "Where is the defect located?",
        "Which part of the image is affected?",
        "Can you tell me where the problem is?",
        "Where should I look?",
    ),
    "count": (
        "How many anomalies are there?",
        "How many defects do you see?",
        "How many separate anomalous regions are there?",
        "Count the defects, please.",
        "What is the number of anomalous regions?",
    ),
    "size": (
        "How large is the anomaly?",
        "How big is the defect?",
        "What area does the defect cover?",
        "How much of the image is affected?",
        "Is the defect big or small?",
    ),
    "appearance": (
        "What does the anomaly look like?",
        "What kind of defect is it?",
        "Can you describe the defect?",
        "What type of anomaly is this?",
        "Describe what you see.",
    ),
    "confidence": (
        "How confident are you?",
        "How sure are you about that?",
        "Can I trust this verdict?",
        "What is your confidence?",
        "How certain is this result?",
    ),
    "where_exactly": (
        "Where exactly?",
        "Can you be more precise about the location?",
        "Give me the exact coordinates.",
        "Where precisely, in pixels?",
        "Show me the bounding boxes.",
    ),
    "near_edge": (
        "Is it near the edge?",
        "Does the defect touch the border of the image?",
        "Is the anomaly close to the image border?",
        "Is it at the edge of the image?",
        "Is any of it near the image boundary?",
    ),
    "next_check": (
        "What should I check next?",
        "What do you recommend I do now?",
        "What is the next step?",
        "What should I inspect more closely?",
        "Any advice on what to look at?",
    ),
}

# Answer templates by case: "normal" (no region), "one" / "many" regions, or "anomalous" where the count
# does not change the wording; near_edge has "yes" / "no".
ANSWERS: dict[str, dict[str, tuple[str, ...]]] = {
    "anomaly": {
        "normal": (
            "No, this image looks normal.",
            "No. I found no anomalous region.",
            "No, nothing looks defective here.",
            "No anomaly: the part appears normal.",
        ),
        "one": (
            "Yes, this image shows an anomaly.",
            "Yes. There is {look} on this part.",
            "Yes, I found 1 anomalous region.",
            "Yes, it is defective: 1 region looks abnormal.",
        ),
        "many": (
            "Yes, this image shows anomalies.",
            "Yes. There is {look} on this part, in {count} places.",
            "Yes, I found {count} anomalous regions.",
            "Yes, it is defective: {count} regions look abnormal.",
        ),
    },
    "where": {
        "normal": (
            "There is nothing to locate: the image looks normal.",
            "Nowhere. I found no anomalous region.",
            "No location to give, because nothing looks anomalous.",
            "Nothing stands out anywhere in the image.",
        ),
        "one": (
            "It is {where} of the image.",
            "The anomaly is {where}.",
            "Look {where}: that is where the anomaly is.",
            "{Where}.",
        ),
        "many": (
            "There are {count} anomalous regions: {where}.",
            "I found {count} of them: {where}.",
            "{count} regions stand out: {where}.",
            "The anomalies are spread over {count} regions: {where}.",
        ),
    },
    "count": {
        "normal": (
            "0. The image has no anomalous region.",
            "None: I count 0 anomalous regions.",
            "There are 0 anomalous regions; the image looks normal.",
            "I count 0 anomalous regions in this image.",
        ),
        "one": (
            "1 anomalous region.",
            "I count 1 region.",
            "There is 1 anomalous region.",
            "Exactly 1 separate anomalous region.",
        ),
        "many": (
            "{count} anomalous regions.",
            "I count {count} regions.",
            "There are {count} anomalous regions.",
            "Exactly {count} separate anomalous regions.",
        ),
    },
    "size": {
        "normal": (
            "There is nothing to measure: no region is anomalous (0% of the image).",
            "No anomalous area at all, so its size is 0% of the image.",
            "Nothing: 0% of the image looks anomalous.",
            "Size does not apply here; the image looks normal.",
        ),
        "one": (
            "It is {size}: it covers {pct} of the image.",
            "{Size}, about {pct} of the image area.",
            "The region covers {pct} of the image, so it is {size}.",
            "About {pct} of the image; I would call that {size}.",
        ),
        "many": (
            "Together they cover {total} of the image: {details}.",
            "{Details}; {total} of the image in all.",
            "In total {total} of the image. By region: {details}.",
            "The {count} regions cover {total} of the image ({details}).",
        ),
    },
    "appearance": {
        "normal": (
            "Nothing looks unusual; the image looks like a normal part.",
            "There is no defect to describe; the image looks normal.",
            "It looks normal: no scratch, spot, stain, missing material or foreign patch.",
            "Nothing to describe; everything looks as expected.",
        ),
        "one": (
            "It looks like {look}: {shape}, {contrast}.",
            "{Look}. The region is {shape} and {contrast}.",
            "I would describe it as {look}; it is {shape} and {contrast}.",
            "A {shape} region, {contrast}, typical of {look}.",
        ),
        "many": (
            "They look like {look}. {Details}.",
            "{Look}, in {count} places: {details}.",
            "Each region looks like {look}: {details}.",
            "The pattern is {look}; {details}.",
        ),
    },
    "confidence": {
        "normal": (
            "My confidence is {word} that the image is normal.",
            "{Word} confidence that the image is normal: {reason}.",
            "I am {adverb} sure that the image is normal ({word} confidence).",
            "Confidence: {word}. {Reason}.",
        ),
        "anomalous": (
            "My confidence is {word} that the image is anomalous.",
            "{Word} confidence that the image is anomalous: {reason}.",
            "I am {adverb} sure that the image is anomalous ({word} confidence).",
            "Confidence: {word}. {Reason}.",
        ),
    },
    "where_exactly": {
        "normal": (
            "There is nothing to point at; no region is anomalous.",
            "No boxes to give: the image looks normal.",
            "Nowhere exactly: I found no anomalous pixels.",
            "Nothing to locate, so there are no coordinates.",
        ),
        "anomalous": (
            "In pixel coordinates of this {width}x{height} image: {details}.",
            "Here are the boxes (x and y ranges in pixels): {details}.",
            "{Details}. Coordinates are pixels, with (0, 0) the first pixel of the image.",
            "Exactly: {details}.",
        ),
    },
    "near_edge": {
        "normal": (
            "No, because there is no anomalous region at all.",
            "No: there is nothing anomalous, near the edge or elsewhere.",
            "No. The image looks normal everywhere.",
            "No, there is no anomaly to be near the edge.",
        ),
        "yes": (
            "Yes: {details}.",
            "Yes, {details}.",
            "Yes. {Details}.",
            "Yes, it reaches the border area: {details}.",
        ),
        "no": (
            "No, {gap} px is the smallest distance to a border.",
            "No. Every region stays at least {gap} px away from the image border.",
            "No, the anomaly stays well inside the image: at least {gap} px from each border.",
            "No; the nearest border is {gap} px away.",
        ),
    },
    "next_check": {
        "normal": (
            "Nothing here needs a closer look; move on to the next part.",
            "No follow-up is needed. If the process drifts, compare with a fresh good reference.",
            "Nothing to check on this image; keep sampling parts as usual.",
            "The part can pass; inspect the next one as usual.",
        ),
        "anomalous": (
            "Check the region {where} first: it covers {pct} of the image.",
            "Start {where}, at the largest anomalous region, and confirm it under better light.",
            "Look closely {where} and compare it with a known good part.",
            "Inspect the {shape} region {where} and measure it against your tolerance.",
        ),
    },
}


@dataclass(frozen=True)
class Facts:
    """Everything the answers about one image are built from."""

    regions: tuple[Region, ...]  # largest first
    width: int
    height: int
    family: str | None  # simulation family; None for a normal image or a real mask
    confidence: str  # one of CONFIDENCE_WORDS


def region_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the mask without the specks find_regions drops, so mask and regions agree exactly."""
    binary = np.asarray(mask) > MASK_THRESHOLD  # (H, W)
    labels, count = ndimage.label(binary, structure=EIGHT_CONNECTED)  # (H, W) int
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    keep = areas >= default_min_area_px(*binary.shape)
    keep[0] = False
    return keep[labels]


def facts_for(image: np.ndarray, mask: np.ndarray, family: str | None, confidence: str) -> Facts:
    """Facts from the true mask, with regions computed exactly as the Inspector computes them."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.shape != image.shape[:2]:
        got = getattr(mask, "shape", type(mask).__name__)
        raise ValueError(f"conversation_for: mask must be (H, W) = {image.shape[:2]}, got {got}")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"conversation_for: unknown family {family!r}; known: {', '.join(FAMILIES)} or None")
    if confidence not in CONFIDENCE_WORDS:
        raise ValueError(f"conversation_for: confidence must be one of {CONFIDENCE_WORDS}, got {confidence!r}")
    regions = find_regions(mask.astype(np.float32), MASK_THRESHOLD, image)
    if family is not None and not regions:
        raise ValueError(f"conversation_for: family {family!r} given but the mask has no region")
    height, width = mask.shape
    return Facts(tuple(regions), width, height, family, confidence)


def conversation_for(
    image: np.ndarray, mask: np.ndarray, family: str | None, rng: np.random.Generator, confidence: str = "high"
) -> dict[str, Any]:
    """One conversation (family, confidence, regions, turns) about image, truthful to mask by construction."""
    facts = facts_for(image, mask, family, confidence)
    return {
        "family": family,
        "confidence": confidence,
        "regions": [region.to_dict() for region in facts.regions],
        "turns": [turn_for(intent, facts, rng) for intent in turn_intents(rng)],
    }


def turn_intents(rng: np.random.Generator) -> list[str]:
    """2-5 distinct intents, the yes/no question first; follow-ups only after 'where'."""
    count = int(rng.integers(TURNS_RANGE[0], TURNS_RANGE[1] + 1))
    intents = [FIRST_INTENT]
    while len(intents) < count:
        ready = [i for i in INTENTS if i not in intents and (i not in FOLLOW_UPS or "where" in intents)]
        weights = np.array([FOLLOW_UP_WEIGHT if i in FOLLOW_UPS else 1.0 for i in ready])
        intents.append(ready[int(rng.choice(len(ready), p=weights / weights.sum()))])
    return intents


def turn_for(intent: str, facts: Facts, rng: np.random.Generator) -> dict[str, Any]:
    """One question/answer pair with its structured truth."""
    question = pick(QUESTIONS[intent], rng)
    return {
        "intent": intent,
        "question": question,
        "answer": ANSWER_BUILDERS[intent](facts, rng),
        "truth": truth_for(intent, facts),
    }


def pick(options: Sequence[str], rng: np.random.Generator) -> str:
    """One option, uniformly."""
    return options[int(rng.integers(len(options)))]


def render(intent: str, case: str, rng: np.random.Generator, **fields: Any) -> str:
    """A random template of intent/case filled with fields; '{Name}' gives the capitalised field."""
    capitalised = {name.capitalize(): capitalise(str(value)) for name, value in fields.items()}
    return pick(ANSWERS[intent][case], rng).format(**fields, **capitalised)


def capitalise(text: str) -> str:
    """Text with its first character upper-cased (str.capitalize would lower the rest)."""
    return text[:1].upper() + text[1:]


def look_for(family: str | None) -> str:
    """What a family looks like to an operator."""
    return UNKNOWN_LOOK if family is None else FAMILY_LOOKS[family]


def case_of(facts: Facts) -> str:
    """'normal', 'one' or 'many' regions."""
    return {0: "normal", 1: "one"}.get(len(facts.regions), "many")


def anomaly_answer(facts: Facts, rng: np.random.Generator) -> str:
    """Yes/No first, then a short reason."""
    return render("anomaly", case_of(facts), rng, look=look_for(facts.family), count=len(facts.regions))


def where_answer(facts: Facts, rng: np.random.Generator) -> str:
    """A location word for every region."""
    if not facts.regions:
        return render("where", "normal", rng)
    where = where_phrase(facts.regions, spans=False)
    return render("where", case_of(facts), rng, where=where, count=len(facts.regions))


def count_answer(facts: Facts, rng: np.random.Generator) -> str:
    """The number of regions, the only number in the answer."""
    return render("count", case_of(facts), rng, count=len(facts.regions))


def size_answer(facts: Facts, rng: np.random.Generator) -> str:
    """Size words and % of the image, per region and in total."""
    regions = facts.regions
    if not regions:
        return render("size", "normal", rng)
    if len(regions) == 1:
        return render("size", "one", rng, size=regions[0].size, pct=format_pct(regions[0].area_pct))
    total = format_pct(sum(r.area_pct for r in regions))
    return render(
        "size", case_of(facts), rng, details=size_details(regions, spans=False), total=total, count=len(regions)
    )


def appearance_answer(facts: Facts, rng: np.random.Generator) -> str:
    """Family look plus each region's shape and contrast."""
    regions, look = facts.regions, look_for(facts.family)
    if not regions:
        return render("appearance", "normal", rng)
    if len(regions) == 1:
        contrast = CONTRAST_PHRASES[regions[0].contrast]
        return render("appearance", "one", rng, look=look, shape=regions[0].shape, contrast=contrast)
    details = appearance_details(regions, spans=False)
    return render("appearance", case_of(facts), rng, look=look, details=details, count=len(regions))


def confidence_answer(facts: Facts, rng: np.random.Generator) -> str:
    """A sentence built on the given confidence word."""
    word = facts.confidence
    case = "anomalous" if facts.regions else "normal"
    return render("confidence", case, rng, word=word, reason=CONFIDENCE_REASONS[word], adverb=CONFIDENCE_ADVERBS[word])


def where_exactly_answer(facts: Facts, rng: np.random.Generator) -> str:
    """Each region's location word, pixel box (inclusive ranges) and centre pixel."""
    if not facts.regions:
        return render("where_exactly", "normal", rng)
    details = "; ".join(box_phrase(region) for region in facts.regions)
    return render("where_exactly", "anomalous", rng, details=details, width=facts.width, height=facts.height)


def box_phrase(region: Region) -> str:
    """'region 1 in the top left: x 10-29, y 5-19, centred near (20, 12)'."""
    x0, y0, x1, y1 = region.box
    cx, cy = (int(value) for value in region.centroid)  # the pixel holding the centroid
    return (
        f"region {region.index} {LOCATION_PHRASES[region.location]}: "
        f"x {x0}-{x1 - 1}, y {y0}-{y1 - 1}, centred near ({cx}, {cy})"
    )


def near_edge_answer(facts: Facts, rng: np.random.Generator) -> str:
    """Yes with the regions and borders involved, or No with the smallest distance to a border."""
    if not facts.regions:
        return render("near_edge", "normal", rng)
    near = [(r, near_borders(r, facts.width, facts.height)) for r in facts.regions]
    near = [(r, sides) for r, sides in near if sides]
    if not near:
        gap = min(min(border_gaps(r, facts.width, facts.height).values()) for r in facts.regions)
        return render("near_edge", "no", rng, gap=gap)
    details = "; ".join(edge_phrase(r, sides, facts) for r, sides in near)
    return render("near_edge", "yes", rng, details=details)


def edge_phrase(region: Region, sides: list[str], facts: Facts) -> str:
    """'region 2 touches the top and left borders' or 'region 1 comes within 3 px of the bottom border'."""
    gap = min(border_gaps(region, facts.width, facts.height)[side] for side in sides)
    noun = "border" if len(sides) == 1 else "borders"
    reach = "touches" if gap == 0 else f"comes within {gap} px of"
    return f"region {region.index} {reach} the {join_words(sides)} {noun}"


def next_check_answer(facts: Facts, rng: np.random.Generator) -> str:
    """Where to look first (the largest region), then the rest and any border contact."""
    if not facts.regions:
        return render("next_check", "normal", rng)
    first = facts.regions[0]
    where, pct = LOCATION_PHRASES[first.location], format_pct(first.area_pct)
    text = render("next_check", "anomalous", rng, where=where, pct=pct, shape=first.shape)
    others = len(facts.regions) - 1
    if others:
        text += (
            " Then check the other region." if others == 1 else f" Then check the other {number_word(others)} regions."
        )
    if any(near_borders(r, facts.width, facts.height) for r in facts.regions):
        text += " A region reaches the image border, so make sure the part is fully in view there."
    return text


ANSWER_BUILDERS: dict[str, Callable[[Facts, np.random.Generator], str]] = {
    "anomaly": anomaly_answer,
    "where": where_answer,
    "count": count_answer,
    "size": size_answer,
    "appearance": appearance_answer,
    "confidence": confidence_answer,
    "where_exactly": where_exactly_answer,
    "near_edge": near_edge_answer,
    "next_check": next_check_answer,
}


def truth_for(intent: str, facts: Facts) -> dict[str, Any]:
    """Structured ground truth of one turn: the shared fields plus the intent's own."""
    regions = facts.regions
    truth: dict[str, Any] = {
        "anomalous": bool(regions),
        "count": len(regions),
        "locations": [region.location for region in regions],
    }
    extra = TRUTH_EXTRAS.get(intent)
    return truth | extra(facts) if extra is not None else truth


def size_truth(facts: Facts) -> dict[str, Any]:
    """Size words and areas."""
    areas = [region.area_pct for region in facts.regions]
    return {
        "sizes": [region.size for region in facts.regions],
        "area_pct": [round(area, 4) for area in areas],
        "total_area_pct": round(sum(areas), 4),
    }


def appearance_truth(facts: Facts) -> dict[str, Any]:
    """Family, its look and the per-region descriptors."""
    return {
        "family": facts.family,
        "look": look_for(facts.family) if facts.regions else None,
        "shapes": [region.shape for region in facts.regions],
        "contrasts": [region.contrast for region in facts.regions],
    }


def where_exactly_truth(facts: Facts) -> dict[str, Any]:
    """Boxes and centroids in pixels."""
    return {
        "image_size": [facts.width, facts.height],
        "boxes": [list(region.box) for region in facts.regions],
        "centroids": [[round(value, 2) for value in region.centroid] for region in facts.regions],
    }


def near_edge_truth(facts: Facts) -> dict[str, Any]:
    """Which borders each region is near, and its distance to the closest border."""
    width, height = facts.width, facts.height
    edges = [near_borders(region, width, height) for region in facts.regions]
    return {
        "near_edge": any(edges),
        "margin_px": edge_margin_px(width, height),
        "edges": edges,
        "border_distance_px": [min(border_gaps(region, width, height).values()) for region in facts.regions],
    }


def next_check_truth(facts: Facts) -> dict[str, Any]:
    """The region to look at first (the largest)."""
    first = facts.regions[0] if facts.regions else None
    return {
        "focus": None if first is None else first.index,
        "focus_location": None if first is None else first.location,
    }


TRUTH_EXTRAS: dict[str, Callable[[Facts], dict[str, Any]]] = {
    "size": size_truth,
    "appearance": appearance_truth,
    "confidence": lambda facts: {"confidence": facts.confidence},
    "where_exactly": where_exactly_truth,
    "near_edge": near_edge_truth,
    "next_check": next_check_truth,
}
