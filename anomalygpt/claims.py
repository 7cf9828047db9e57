"""The claim checker: every sentence an answer states is read for its facts and checked against the Inspection.

Facts read (FACTS): the verdict, counts (overall and per place), places, size words and areas, shape and
contrast words, the confidence word, region numbers, which region is the biggest / smallest / most severe,
defect types, reference numbers and how a region differs from its good match (anomalygpt.evidence), scores,
thresholds and margins, border contact, pixel boxes. A sentence is cut into clauses at ";" and each clause into
segments at every region it names ("region 2 in the top right is small" binds "top right" and "small" to region
2); a segment that names none is about any region ("at the bottom" must hold for some region, "no region at the
top" for none). A sentence that contradicts the Inspection is not shown: `ClaimChecker` puts the grounded
sentence for the contradicted fact (anomalygpt.grounded) in its place, or drops it when that sentence was
already said. Streaming stays: only the sentence being checked is held back. Each answer's `CheckReport` says
how often the checker fired and on what; a `CheckTally` adds them up over a session.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from anomalygpt.grounded import (
    GENERIC_DEFECT_TYPES,
    GREY_SAME,
    UNTRUSTED_MARGIN,
    DefectType,
    Grounds,
    anomaly_answer,
    biggest_answer,
    confidence_answer,
    count_answer,
    describe_answer,
    edge_answer,
    empty_sentence,
    evidence_sentence,
    false_alarm_rate,
    focus_regions,
    kind_answer,
    most_severe,
    preamble,
    region_sentence,
    score_answer,
    size_answer,
    where_answer,
    where_exactly_answer,
    without_preamble,
)
from anomalygpt.guard import Question, answer_claims
from anomalygpt.regions import NUMBER_WORDS, Region, border_gaps, near_borders

if TYPE_CHECKING:
    from anomalygpt.inspection import Inspection

FACTS = (
    "verdict",
    "count",
    "location",
    "size",
    "area",
    "shape",
    "contrast",
    "confidence",
    "region",
    "rank",
    "family",
    "reference",
    "score",
    "edge",
    "box",
)
UNTRUSTED = "not reliable: the Inspection carries a trust warning"  # the truth a vouching sentence contradicts
PATHS = ("replaced", "dropped", "repeat", "off_topic", "unfinished")  # what the checker did with a sentence
NUMBER = "|".join(NUMBER_WORDS)
LOCATION_SYNONYMS = {"centre": "center", "middle": "center", "upper left": "top left", "upper right": "top right"}
LOCATION_SYNONYMS |= {"lower left": "bottom left", "lower right": "bottom right"}
LOCATION = re.compile(
    r"(?P<the>\bthe\s+(?:very\s+|far\s+)?)?\b(?P<loc>(?:top|upper|bottom|lower)[- ](?:left|right)"
    r"|top|bottom|left|right|center|centre|middle)\b(?!-)",
    re.IGNORECASE,
)
REGION_REF = re.compile(
    r"\bregions?\s+#?(?P<nums>\d+(?:(?:\s*,\s*(?:and\s+)?|\s+and\s+|\s+or\s+|\s+to\s+|\s*-\s*)\d+(?!\d|\.\d|%|\s*(?:%|px)))*)"
    r"(?!\d|\.\d|%)",
    re.IGNORECASE,
)
REFERENCE_REF = re.compile(r"\breference\s+#?(\d+)\b(?:\s*\([^)]*\))?", re.IGNORECASE)
SEVERE = r"most severe|most serious|most anomalous|most critical|worst|strongest|highest (?:peak |anomaly )?score"
SEVERE += r"|the highest of all|highest peak"
SUPERLATIVE = re.compile(
    rf"\b(?P<sup>biggest|largest|smallest|tiniest|{SEVERE}"
    r"|(?:first|second|third|last)(?=\s+(?:anomalous\s+)?(?:one|region|defect|anomaly|area)\b))\b",
    re.IGNORECASE,
)
DRIVES = re.compile(r"\bdrives? (?:the )?(?:image |anomaly )?score\b", re.IGNORECASE)
PAIR_GAP = re.compile(
    r"^(?:\s*(?:one|region|defect|anomaly|area|anomalous|is|was|would be|being|here|of them|:|,|\(|=|-))*\s*$",
    re.IGNORECASE,
)
PRONOUN_START = re.compile(r"^\W*(it|its|this one|that one|this region|that region|the region|there it)\b", re.I)
NEGATION = re.compile(r"\b(no|not|nothing|none|neither|nor|never|without|nowhere)\b|n't\b", re.IGNORECASE)
ANSWER_WORD = re.compile(r"^\W*(yes|no)\s*[:,.!]\s*", re.IGNORECASE)  # "No: ..." answers; "No region ..." negates
SIZE_WORDS = {"small": "small", "tiny": "small", "little": "small", "medium": "medium", "medium-sized": "medium"}
SIZE_WORDS |= {"large": "large", "big": "large", "huge": "large", "extensive": "large"}
SIZE = re.compile(r"\b(medium-sized|small|tiny|little|medium|large|big|huge|extensive)\b(?! enough)", re.I)
SHAPE = re.compile(
    r"\b(?P<long>elongated|line-like|linear|long and thin|thin line|streak|line-shaped)\b"
    r"|\b(?P<compact>compact|spot-like|round|roundish|blob-like|blob|circular)\b",
    re.IGNORECASE,
)
SIMILAR = re.compile(
    r"\b(about|roughly|nearly|almost) as (bright|dark) as\b|\bsimilar (brightness|contrast|grey|gray|intensity)\b"
    r"|\b(no|low)[- ](visible )?contrast\b",
    re.IGNORECASE,
)
CONTRAST = re.compile(r"\b(?P<dark>darker|dark|darkened)\b|\b(?P<bright>brighter|bright|lighter|whiter)\b", re.I)
GOOD_TARGET = r"(?:that|the|this|its|their|a)?\s*(?:good|reference|references|match|matched|best|known)"
REFERENCE_CONTRAST = re.compile(rf"\b(darker|brighter|lighter)\s+than\s+{GOOD_TARGET}\b", re.IGNORECASE)
REFERENCE_SAME = re.compile(rf"\b(about|roughly|nearly|almost) as bright as\s+{GOOD_TARGET}\b", re.IGNORECASE)
GREY = re.compile(r"\b(\d+(?:\.\d+)?)\s+gr[ae]y levels?\s+(darker|brighter|lighter)\b", re.IGNORECASE)
TEXTURE = re.compile(r"\b(rougher|smoother)\b", re.IGNORECASE)
MATCH_WORDS = re.compile(r"\b(match\w*|resembl\w*|closest|most similar|best)\b", re.IGNORECASE)
PERCENT = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s?%")
# The p-value as grounded.rarity_sentence writes it: checked against Inspection.p_value, then hidden from the areas
RARITY = re.compile(r"\bscore this high (?:about |at most )?(\d+(?:\.\d+)?)\s?% of the time\b", re.IGNORECASE)
# The false-alarm rate as grounded.rate_sentence writes it: checked against the rate the inspection's threshold keeps
RATE = re.compile(r"\bscore above it (?:about |at most )?(\d+(?:\.\d+)?)\s?% of the time\b", re.IGNORECASE)
COUNT_NOUN = (
    r"(?:(?:separate|distinct|anomalous|defective|suspicious|abnormal|different|outlined|flagged)\s+)*"
    r"(?:regions?|anomal(?:y|ies)|defects?|places|areas|spots|flaws|faults)\b"
)
COUNT = re.compile(
    rf"(?<![\w.#-])(?P<other>(?:other|remaining|further)\s+)?(?P<num>\d+|{NUMBER}|a single|only one)\s+{COUNT_NOUN}"
    r"(?P<where>\s+(?:is\s+|are\s+)?(?:located\s+)?(?:in|at|on)\s+the\s+(?P<loc>(?:top|bottom)[- ](?:left|right)"
    r"|top|bottom|left|right|center|centre|middle)\b)?",
    re.IGNORECASE,
)
PLACE_COUNT = re.compile(
    rf"(?<![\w.#-])(?P<num>\d+|{NUMBER})\s+(?:in|at|on)\s+the\s+(?P<loc>(?:top|bottom)[- ](?:left|right)"
    r"|top|bottom|left|right|center|centre|middle)\b",
    re.IGNORECASE,
)
CONFIDENCE = re.compile(
    r"\b(?P<a>low|medium|high)\s+confidence\b|\bconfidence\b[^.;]{0,30}?\b(?:is|was|:|of)\s+(?P<b>low|medium|high)\b"
    r"|\b(?P<adverb>very|highly|fairly|quite|somewhat|not very|not)\s+(?:sure|confident|certain)\b",
    re.IGNORECASE,
)
# Words that vouch for a verdict: wrong whatever the confidence word when the Inspection carries a trust warning.
VOUCH = re.compile(
    r"\b(?:evidence is (?:clear|strong|conclusive)|(?:is|are|looks|seems) (?:reliable|dependable|trustworthy)"
    r"|(?:can|may|should) (?:safely )?(?:trust|rely on)|(?:very|highly|completely|absolutely|fully) "
    r"(?:sure|confident|certain)|no doubt|definitely|certainly)\b",
    re.IGNORECASE,
)
ADVERB_CONFIDENCE = {"very": "high", "highly": "high", "fairly": "medium", "quite": "medium", "somewhat": "medium"}
ADVERB_CONFIDENCE |= {"not very": "low", "not": "low"}
SCORE = re.compile(
    r"(?<!peak )(?<!pixel )\b(?:anomaly |image )?score(?:\s+(?:of|is|was|=|:))?\s*,?\s*(\d+\.\d+)(?!\d|\.\d|\s+normal)",
    re.I,
)
PEAK = re.compile(r"\bpeak (?:anomaly )?score(?:\s+(?:of|is|was|=|:))?\s*,?\s*(\d+\.\d+)", re.IGNORECASE)
THRESHOLD = re.compile(r"(?<!pixel )\bthreshold(?:\s+(?:of|is|was|=|:))?\s*,?\s*(\d+\.\d+)", re.IGNORECASE)
SPREADS = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s+normal spreads?\b", re.IGNORECASE)
MARGIN = re.compile(r"\bmargin(?:\s+(?:of|is|was))?\s*([+-]?\d+(?:\.\d+)?)", re.IGNORECASE)
SIDE_OF = re.compile(
    r"\b(?:(?P<above>above|over|exceeds|higher than)|(?P<below>below|under|lower than))"
    r"\s+the\s+(?:image\s+)?threshold\b",
    re.IGNORECASE,
)
BORDER_SIDES = r"(?:top|bottom|left|right)(?:(?:,\s*|\s+and\s+|\s+or\s+)(?:top|bottom|left|right))*"
BORDER = re.compile(
    rf"\b(?P<verb>touches|comes within (?P<gap>\d+) px of|reaches|is near|near|close to|at|along|on)\s+the\s+"
    rf"(?P<sides>{BORDER_SIDES})\s+(?:image\s+)?(?:border|edge)s?\b",
    re.IGNORECASE,
)
EDGE = re.compile(
    r"\b(?:near|close to|at|on|reaches|reach|touches|touch|along|by)\s+the\s+(?:image\s+)?(?:border|edge|rim)s?\b", re.I
)
GAP = re.compile(r"\bat least (\d+) px (?:away )?from (?:the |each |every )?(?:image )?borders?\b", re.IGNORECASE)
BOX = re.compile(r"\bx (\d+)-(\d+), y (\d+)-(\d+)")
CENTRE = re.compile(r"\bcent(?:red|ered) near \((\d+), (\d+)\)")
IMAGE_SIZE = re.compile(r"\b(\d+)x(\d+) image\b")
RELATIVE = re.compile(r"\b(larger|bigger|smaller) than region (\d+)\b", re.IGNORECASE)
SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")
WORDS = re.compile(r"[a-z0-9%.]+")


@dataclass(frozen=True)
class Conflict:
    """One stated fact the Inspection does not hold."""

    fact: str  # one of FACTS
    said: str  # the words that state it
    region: int | None  # the region the claim is about; None: the image or any region
    truth: str  # what the Inspection holds instead


@dataclass(frozen=True)
class Repair:
    sentence: str  # as generated
    path: str  # one of PATHS
    facts: tuple[str, ...]  # the facts it got wrong ("replaced", "dropped")
    replacement: str = ""  # what is shown instead ("replaced")


@dataclass
class CheckReport:
    """What the checker did to one answer."""

    raw: str = ""  # the answer as generated: opening + the model's text, before any repair
    answer: str = ""  # the answer as shown
    sentences: int = 0  # generated sentences checked
    repairs: list[Repair] = field(default_factory=list)
    opening_conflicts: list[Conflict] = field(default_factory=list)  # grounded opening: always empty when correct

    def paths(self) -> Counter[str]:
        return Counter(repair.path for repair in self.repairs)

    def facts(self) -> Counter[str]:
        return Counter(fact for repair in self.repairs for fact in repair.facts)

    @property
    def fired(self) -> bool:
        return any(repair.path in ("replaced", "dropped") for repair in self.repairs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sentences": self.sentences,
            "paths": dict(self.paths()),
            "facts": dict(self.facts()),
            "repairs": [vars(repair) | {"facts": list(repair.facts)} for repair in self.repairs],
            "raw": self.raw,
        }


@dataclass
class CheckTally:
    """The checker's reports added up, e.g. over a chat session."""

    answers: int = 0
    fired: int = 0  # answers with at least one contradicting sentence replaced or dropped
    paths: Counter[str] = field(default_factory=Counter)
    facts: Counter[str] = field(default_factory=Counter)

    def add(self, report: CheckReport) -> None:
        self.answers += 1
        self.fired += int(report.fired)
        self.paths.update(report.paths())
        self.facts.update(report.facts())

    def to_dict(self) -> dict[str, Any]:
        return {"answers": self.answers, "fired": self.fired, "paths": dict(self.paths), "facts": dict(self.facts)}

    def summary(self) -> str:
        """'claim checker: 2 of 9 answers corrected (location 2, count 1)'."""
        if not self.fired:
            return f"claim checker: no contradiction in {self.answers} answers"
        facts = ", ".join(f"{fact} {count}" for fact, count in self.facts.most_common())
        return f"claim checker: {self.fired} of {self.answers} answers corrected ({facts})"


# ---------------------------------------------------------------- reading one sentence


@dataclass(frozen=True)
class Segment:
    """Part of a clause and the regions it is about (None: any region)."""

    text: str
    regions: tuple[int, ...] | None
    reference: str = ""  # the text from the first "reference N" on, where places are the reference's


def sentence_conflicts(
    text: str, grounds: Grounds, question: Question | None = None, first: bool = False, carried: int | None = None
) -> tuple[list[Conflict], int | None]:
    """The facts a sentence gets wrong, and the one region it ends up talking about (for a following 'it')."""
    clean = blanked(text, grounds)
    conflicts = rarity_conflicts(" ".join(text.split()), grounds.inspection)
    conflicts += verdict_conflicts(clean, grounds.inspection, question, first)
    conflicts += sentence_level_conflicts(clean, grounds)
    clean = blank(CONFIDENCE, clean)
    for clause in clean.split(";"):
        segments = clause_segments(clause, grounds, carried)
        conflicts += rank_conflicts(clause, grounds) + driver_conflicts(clause, grounds)
        for segment in segments:
            conflicts += segment_conflicts(segment, grounds)
        bound = [segment.regions for segment in segments if segment.regions is not None]
        carried = bound[-1][0] if bound and len(bound[-1]) == 1 else None
    return conflicts, carried


def blanked(text: str, grounds: Grounds) -> str:
    """The sentence without what the checker must not read as claims: defect-type descriptions, file names."""
    out = " ".join(text.split())
    for kind in (*grounds.defect_types, *GENERIC_DEFECT_TYPES):
        if kind.description:
            out = out.replace(f"({kind.description})", " ")
    out = REFERENCE_REF.sub(lambda found: f"reference {found.group(1)}", out)
    out = RATE.sub(" ", RARITY.sub(" ", out))  # read by rarity_conflicts: their percentages are not areas
    return re.sub(r"\blarge enough\b|\bhow (large|big|small)\b", " ", out, flags=re.IGNORECASE)


def rarity_conflicts(text: str, inspection: Inspection) -> list[Conflict]:
    """How often good parts score this high, as written, against the inspection's p-value, and how often they score
    above the threshold against the rate it keeps (none: any is wrong)."""
    out = []
    rate = false_alarm_rate(inspection)
    for pattern, value, missing in ((RARITY, inspection.p_value, "no p-value"), (RATE, rate, "no stated rate")):
        truth = None if value is None else 100 * value
        for found in pattern.finditer(text):
            if truth is None or not written_close(found.group(1), truth):
                out.append(Conflict("score", found.group(0), None, missing if truth is None else f"{truth:.3g}%"))
    return out


def verdict_conflicts(text: str, inspection: Inspection, question: Question | None, first: bool) -> list[Conflict]:
    """A verdict other than the Inspection's; an opening Yes/No counts in the answer's first sentence only."""
    asks = question is not None and question.kind == "anomaly" and first
    claims = answer_claims(text, question.text if asks and question is not None else "")
    wrong = [claim for claim in claims if claim != inspection.is_anomalous]
    return [Conflict("verdict", text, None, inspection.verdict)] if wrong else []


def sentence_level_conflicts(text: str, grounds: Grounds) -> list[Conflict]:
    """Facts about the image as a whole: counts, region and reference numbers, confidence, scores, boxes."""
    return (
        count_conflicts(text, grounds.inspection)
        + number_conflicts(text, grounds.inspection)
        + confidence_conflicts(text, grounds.inspection)
        + score_conflicts(text, grounds.inspection)
        + box_conflicts(text, grounds.inspection)
    )


def region_numbers(found: re.Match[str]) -> tuple[int, ...]:
    """'4, 5 and 7' -> (4, 5, 7); '2 to 5' or '2-5' -> (2, 3, 4, 5)."""
    text = found.group("nums")
    numbers: list[int] = []
    for part in re.split(r"\s*,\s*(?:and\s+)?|\s+and\s+|\s+or\s+", text):
        ends = [int(value) for value in re.split(r"\s+to\s+|\s*-\s*", part) if value]
        numbers += list(range(ends[0], ends[-1] + 1)) if len(ends) == 2 and ends[0] < ends[1] else ends
    return tuple(numbers)


def masked(text: str) -> str:
    """Region and reference numbers, boxes and decimals hidden, so counts are read from the rest."""
    text = REGION_REF.sub("region #", text)
    text = REFERENCE_REF.sub("reference #", text)
    text = BOX.sub("box #", text)
    return re.sub(r"\d+\.\d+|\d+\s?%|\d+\s+(px|gr[ae]y|normal)\b", "#", text)


def count_value(word: str) -> int:
    word = word.lower()
    if word.isdigit():
        return int(word)
    return 1 if word in ("a single", "only one") else NUMBER_WORDS.index(word)


def count_conflicts(text: str, inspection: Inspection) -> list[Conflict]:
    """'3 anomalous regions', 'the other 2 regions', 'two in the top left', '1 region at the bottom'."""
    regions, hidden, out = inspection.regions, masked(text), []
    for found in COUNT.finditer(hidden):
        number = count_value(found.group("num"))
        listed = re.match(r"\s*(,|and|or)\s+(in|at|on)\s+the\b", hidden[found.end() :])
        if found.group("where") and not listed:
            out += place_count_conflict(found.group(0), number, location_of(found.group("loc")), regions)
            continue
        expected = len(regions) - (1 if found.group("other") else 0)
        if number != expected:
            out.append(Conflict("count", found.group(0), None, f"{len(regions)} anomalous regions"))
    for found in PLACE_COUNT.finditer(hidden):
        out += place_count_conflict(
            found.group(0), count_value(found.group("num")), location_of(found.group("loc")), regions
        )
    return out


def place_count_conflict(said: str, number: int, location: str, regions: Sequence[Region]) -> list[Conflict]:
    actual = sum(location in region.places for region in regions)
    return [] if actual == number else [Conflict("count", said, None, f"{actual} regions {location}")]


def location_of(word: str) -> str:
    word = " ".join(word.lower().replace("-", " ").split())
    return LOCATION_SYNONYMS.get(word, word)


def number_conflicts(text: str, inspection: Inspection) -> list[Conflict]:
    """Region numbers beyond the regions found, reference numbers beyond the references given."""
    n, out = len(inspection.regions), []
    for found in REGION_REF.finditer(text):
        wrong = [number for number in region_numbers(found) if not 1 <= number <= n]
        if wrong:
            out.append(Conflict("region", found.group(0), None, f"{n} anomalous regions"))
    for found in REFERENCE_REF.finditer(text):
        if not 1 <= int(found.group(1)) <= inspection.n_references:
            out.append(Conflict("reference", found.group(0), None, f"{inspection.n_references} references"))
    return out


def confidence_conflicts(text: str, inspection: Inspection) -> list[Conflict]:
    out = []
    for found in CONFIDENCE.finditer(text):
        word = found.group("a") or found.group("b") or ADVERB_CONFIDENCE[found.group("adverb").lower()]
        if word.lower() != inspection.confidence:
            out.append(Conflict("confidence", found.group(0), None, inspection.confidence))
    if inspection.warnings:
        vouched = [found for found in VOUCH.finditer(text) if not negated(text, found.start())]
        out += [Conflict("confidence", found.group(0), None, UNTRUSTED) for found in vouched]
    return out


def written_close(written: str, truth: float, relative: float = 0.0) -> bool:
    """True when a written number is the truth rounded to its own last digit (or within `relative` of it)."""
    decimals = len(written.split(".")[1]) if "." in written else 0
    error = abs(abs(float(written)) - abs(truth))
    return error <= 0.5 * 10.0**-decimals + 1e-6 or error <= relative * abs(truth)


def score_conflicts(text: str, inspection: Inspection) -> list[Conflict]:
    """The anomaly score, threshold and margin as written, and which side of the threshold the score is on."""
    out = []
    checks = ((SCORE, inspection.score), (THRESHOLD, inspection.threshold), (SPREADS, inspection.margin))
    for pattern, truth in (*checks, (MARGIN, inspection.margin)):
        for found in pattern.finditer(text):
            if not written_close(found.group(1), truth):
                out.append(Conflict("score", found.group(0), None, f"{truth:.4f}"))
    for found in SIDE_OF.finditer(text):
        if negated(text, found.start()):
            continue
        if (found.group("above") is not None) != (inspection.score > inspection.threshold):
            out.append(
                Conflict("score", found.group(0), None, f"score {inspection.score:.4f} vs {inspection.threshold:.4f}")
            )
    return out


def box_conflicts(text: str, inspection: Inspection) -> list[Conflict]:
    """Pixel boxes, centres and the image size as written by grounded.box_phrase."""
    regions, out = inspection.regions, []
    for found in BOX.finditer(text):
        x0, x1, y0, y1 = (int(value) for value in found.groups())
        if not any(region.box == (x0, y0, x1 + 1, y1 + 1) for region in regions):
            out.append(Conflict("box", found.group(0), None, "no region has this box"))
    for found in CENTRE.finditer(text):
        point = (int(found.group(1)), int(found.group(2)))
        if not any(tuple(int(v) for v in region.centroid) == point for region in regions):
            out.append(Conflict("box", found.group(0), None, "no region is centred there"))
    height, width = inspection.image_size
    for found in IMAGE_SIZE.finditer(text):
        if (int(found.group(1)), int(found.group(2))) != (width, height):
            out.append(Conflict("box", found.group(0), None, f"{width}x{height} image"))
    return out


# ---------------------------------------------------------------- segments: which region a phrase is about


def rank_of(word: str, regions: Sequence[Region]) -> int | None:
    """The region index a superlative names: biggest = 1, smallest = last, most severe = highest peak."""
    word = word.lower()
    if not regions:
        return None
    if word in ("biggest", "largest", "first"):
        return 1
    if word in ("smallest", "tiniest", "last"):
        return len(regions)
    if word in ("second", "third"):
        return 2 if word == "second" else 3
    return most_severe(regions).index


def clause_segments(clause: str, grounds: Grounds, carried: int | None) -> list[Segment]:
    """The clause cut at every region it names; a leading part inherits `carried` when it opens with 'it'."""
    regions = grounds.regions
    refs = list(REGION_REF.finditer(clause))
    cuts = [found.start() for found in refs] + [len(clause)]
    lead = clause[: cuts[0]]
    segments = []
    if lead.strip():
        segments.append(Segment(*reference_split(lead, lead_binding(lead, refs, regions, carried))))
    for found, end in zip(refs, cuts[1:], strict=True):
        numbers = tuple(n for n in region_numbers(found) if 1 <= n <= len(regions))
        segments.append(Segment(*reference_split(clause[found.start() : end], numbers or None)))
    return segments


def lead_binding(
    lead: str, refs: Sequence[re.Match[str]], regions: Sequence[Region], carried: int | None
) -> tuple[int, ...] | None:
    """Regions of the text before the first 'region N': a superlative's, a carried 'it', or any."""
    sup = list(SUPERLATIVE.finditer(lead))
    if sup and not (refs and PAIR_GAP.match(lead[sup[-1].end() :])):
        rank = rank_of(sup[-1].group("sup"), regions)
        return None if rank is None else (rank,)
    if len(regions) == 1:
        return (1,)
    if carried is not None and PRONOUN_START.match(lead):
        return (carried,)
    if re.search(r"(?<!of )\b(all|every|each)\s+(of the\s+)?(\d+\s+)?(anomalous\s+)?regions?\b", lead, re.I):
        return tuple(region.index for region in regions)
    return None


def reference_split(text: str, regions: tuple[int, ...] | None) -> tuple[str, tuple[int, ...] | None, str]:
    """(region part, regions, reference part): places after 'reference N' are the reference's."""
    found = REFERENCE_REF.search(text)
    if found is None:
        return text, regions, ""
    return text[: found.start()], regions, text[found.start() :]


def rank_conflicts(clause: str, grounds: Grounds) -> list[Conflict]:
    """'The biggest is region 3' or 'region 3 ... is the most severe' when region 3 is not."""
    regions, out = grounds.regions, []
    refs = list(REGION_REF.finditer(clause))
    for sup in SUPERLATIVE.finditer(clause):
        rank = rank_of(sup.group("sup"), regions)
        after = [ref for ref in refs if ref.start() >= sup.end() and PAIR_GAP.match(clause[sup.end() : ref.start()])]
        before = [ref for ref in refs if ref.end() <= sup.start()]
        named = after[0] if after else (before[-1] if before and is_predicate(clause, sup) else None)
        if rank is None:
            out.append(Conflict("rank", sup.group(0), None, "no anomalous region"))
        elif named is not None and region_numbers(named) != (rank,):
            out.append(Conflict("rank", f"{named.group(0)} / {sup.group(0)}", rank, f"region {rank}"))
    return out


def driver_conflicts(clause: str, grounds: Grounds) -> list[Conflict]:
    """'region 2 drives the score' when another region has the highest peak score."""
    regions, out = grounds.regions, []
    refs = list(REGION_REF.finditer(clause))
    for found in DRIVES.finditer(clause):
        before = [ref for ref in refs if ref.end() <= found.start()]
        severe = most_severe(regions).index if regions else None
        if severe is None:
            out.append(Conflict("rank", found.group(0), None, "no anomalous region"))
        elif before and region_numbers(before[-1]) != (severe,):
            out.append(Conflict("rank", f"{before[-1].group(0)} {found.group(0)}", severe, f"region {severe}"))
    return out


def is_predicate(clause: str, sup: re.Match[str]) -> bool:
    """'... is the biggest', 'has the highest peak score': the superlative says something about a named region."""
    return re.search(r"\b(is|was|has|have)\s+(also\s+)?(the\s+)?$", clause[: sup.start()], re.IGNORECASE) is not None


# ---------------------------------------------------------------- the facts of one segment


def negated(text: str, position: int) -> bool:
    """True when a negation comes before `position` in the text (an opening Yes/No answer word aside)."""
    before = ANSWER_WORD.sub(" ", text[:position], count=1)
    return NEGATION.search(before) is not None


def segment_conflicts(segment: Segment, grounds: Grounds) -> list[Conflict]:
    regions = grounds.regions
    chosen = regions if segment.regions is None else [regions[i - 1] for i in segment.regions]
    text, out = segment.text, []
    text, edge = edge_conflicts(text, segment, chosen, grounds)
    out += edge
    text, reference = reference_conflicts(text + " " + segment.reference, segment, grounds)
    out += reference
    text, families = family_conflicts(text, segment, chosen, grounds)
    out += families
    out += attribute_conflicts(text, segment, chosen, grounds)
    return out


def holds(values: Sequence[bool], bound: bool, negative: bool) -> bool:
    """Bound: every named region has it (none when negated); any region: some has it (none when negated)."""
    if negative:
        return not any(values)
    return all(values) and bool(values) if bound else any(values)


def attribute_conflicts(text: str, segment: Segment, chosen: Sequence[Region], grounds: Grounds) -> list[Conflict]:
    """Places, size words, areas, shape and contrast words, peak scores, relative sizes."""
    region_part = text[: len(segment.text)] if segment.reference else text
    bound, out = segment.regions is not None, []
    where = region_of(segment)
    claims = list(read_attributes(region_part))
    for fact, value, said, position in claims:
        values = [has_attribute(region, fact, value) for region in chosen]
        negative = negated(region_part, position)
        # A negation after the word ("at the bottom and dark, so it is not ...") can be read as denying it: the
        # claim must hold both ways, so such a sentence is replaced unless the word is already negated.
        later = not negative and NEGATION.search(region_part, position) is not None
        if not holds(values, bound, negative) or (later and not holds(values, bound, True)):
            out.append(Conflict(fact, said, where, truth_of(fact, chosen)))
    out += percent_conflicts(region_part, segment, chosen, grounds.inspection)
    out += peak_conflicts(region_part, chosen, where)
    out += relative_conflicts(region_part, chosen, grounds.regions)
    return out


def read_attributes(text: str) -> Iterator[tuple[str, str, str, int]]:
    """(fact, value, words, position) of every place, size, shape and contrast word."""
    for found in LOCATION.finditer(text):
        single = " " not in found.group("loc") and "-" not in found.group("loc")
        if found.group("the") or not single:
            yield "location", location_of(found.group("loc")), found.group(0), found.start()
    for found in SIZE.finditer(text):
        yield "size", SIZE_WORDS[found.group(1).lower()], found.group(0), found.start()
    for found in SHAPE.finditer(text):
        yield "shape", "elongated" if found.group("long") else "compact", found.group(0), found.start()
    similar = [found.span() for found in SIMILAR.finditer(text)]
    for start, _ in similar:
        yield "contrast", "similar", text[start : start + 20], start
    for found in CONTRAST.finditer(text):
        if not any(start <= found.start() < end + 8 for start, end in similar):
            yield "contrast", "darker" if found.group("dark") else "brighter", found.group(0), found.start()


def attribute(region: Region, fact: str) -> str:
    """The region's word for a fact; its place phrase for location ('top left to center', 'widespread')."""
    return {"location": region.where(), "size": region.size, "shape": region.shape, "contrast": region.contrast}[fact]


def has_attribute(region: Region, fact: str, value: str) -> bool:
    """Whether a statement putting `value` as the region's `fact` is true; a region is in every cell it spans."""
    return value in region.places if fact == "location" else attribute(region, fact) == value


def truth_of(fact: str, regions: Sequence[Region]) -> str:
    if not regions:
        return "no anomalous region"
    if fact in ("location", "size", "shape", "contrast"):
        return "; ".join(f"region {r.index}: {attribute(r, fact)}" for r in regions)
    return "; ".join(f"region {r.index}: {r.area_pct:.3g}%" for r in regions)


def region_of(segment: Segment) -> int | None:
    return segment.regions[0] if segment.regions is not None and len(segment.regions) == 1 else None


def percent_conflicts(text: str, segment: Segment, chosen: Sequence[Region], inspection: Inspection) -> list[Conflict]:
    """Every area as written is a named region's, the named regions' sum, any region's or the total; with
    'each'/'every' it is every named region's."""
    areas = [region.area_pct for region in chosen]
    each = re.search(r"\b(each|every)\b", text, re.IGNORECASE) is not None
    allowed = [*areas, sum(areas)]
    if segment.regions is None:
        allowed.append(sum(region.area_pct for region in inspection.regions))
    out = []
    for found in PERCENT.finditer(text):
        written = found.group(1)
        if not inspection.regions:
            right = float(written) == 0
        elif float(written) == 0:  # "0%" says there is nothing
            right = False
        elif each:
            right = bool(areas) and all(written_close(written, area) for area in areas)
        else:
            right = any(written_close(written, area) for area in allowed)
        if not right:
            out.append(Conflict("area", found.group(0), region_of(segment), truth_of("area", chosen)))
    return out


def peak_conflicts(text: str, chosen: Sequence[Region], where: int | None) -> list[Conflict]:
    out = []
    for found in PEAK.finditer(text):
        if not any(written_close(found.group(1), region.peak_score) for region in chosen):
            out.append(Conflict("rank", found.group(0), where, "another peak score"))
    return out


def relative_conflicts(text: str, chosen: Sequence[Region], regions: Sequence[Region]) -> list[Conflict]:
    """'region 2 is larger than region 3' when it is not."""
    out = []
    for found in RELATIVE.finditer(text):
        other = int(found.group(2))
        if len(chosen) != 1 or not 1 <= other <= len(regions):
            continue
        larger = chosen[0].area_px > regions[other - 1].area_px
        if larger != (found.group(1).lower() in ("larger", "bigger")):
            out.append(Conflict("size", found.group(0), chosen[0].index, "the other way round"))
    return out


# Words for a generic family an answer may use instead of its name: checked as that family ("a foreign patch" is
# contamination, which a region about as bright as its surroundings does not fit).
FAMILY_WORDS = {
    "contamination": r"foreign (?:material|matter|bod(?:y|ies)|objects?|particles?|patch(?:es)?)|dirt|dust|debris"
    r"|residues?",
    "crack": r"fractures?|micro-?cracks?",
    "scratch": r"scrapes?|abrasions?",
    "spot": r"dots?|specks?",
    "stain": r"discolou?rations?|smudges?|blotch(?:es)?",
    "missing material": r"chips?|chipped|broken edges?",
}
# Defect kinds no region descriptor can support: the detector does not tell them apart, so naming one states a fact
# the inspection does not hold (unless the product's own defect types name it).
UNSUPPORTED_KINDS = re.compile(
    r"\b(holes?|dents?|bubbles?|burn(?:s| marks?)?|corrosion|rust|delamination|voids?|inclusions?|blisters?"
    r"|short circuits?|solder(?:ing)? (?:defects?|faults?)|cold joints?)\b(?!-)",
    re.IGNORECASE,
)


def family_conflicts(
    text: str, segment: Segment, chosen: Sequence[Region], grounds: Grounds
) -> tuple[str, list[Conflict]]:
    """Defect types (by name, or by a word for a generic one) the regions' descriptors do not fit, and kinds no
    descriptor supports; the words are blanked from the text afterwards."""
    size, out = grounds.inspection.image_size, []
    for kind in (*grounds.defect_types, *GENERIC_DEFECT_TYPES):
        words = rf"{re.escape(kind.name)}(s|es)?"
        if kind.name in FAMILY_WORDS and not any(own.name == kind.name for own in grounds.defect_types):
            words += "|" + FAMILY_WORDS[kind.name]
        pattern = re.compile(rf"\b(?:{words})\b(?!-)", re.IGNORECASE)
        for found in pattern.finditer(text):
            fits = [kind.fits(region, size) for region in chosen]
            if not holds(fits, segment.regions is not None, negated(text, found.start())):
                out.append(Conflict("family", found.group(0), region_of(segment), "descriptors do not fit"))
        text = blank(pattern, text)
    for found in UNSUPPORTED_KINDS.finditer(text):
        if not negated(text, found.start()):
            out.append(Conflict("family", found.group(0), region_of(segment), "the detector does not tell"))
    return blank(UNSUPPORTED_KINDS, text), out


def edge_conflicts(
    text: str, segment: Segment, chosen: Sequence[Region], grounds: Grounds
) -> tuple[str, list[Conflict]]:
    """Border contact as stated; the border words are blanked so they are not read as places."""
    height, width = grounds.inspection.image_size
    bound, out = segment.regions is not None, []
    for found in BORDER.finditer(text):
        sides = re.findall(r"top|bottom|left|right", found.group("sides"), re.IGNORECASE)
        values = [
            side_claim_holds(found, border_gaps(r, width, height), near_borders(r, width, height), sides)
            for r in chosen
        ]
        if not holds(values, bound, negated(text, found.start())):
            out.append(Conflict("edge", found.group(0), region_of(segment), "border gaps differ"))
    text = blank(BORDER, text)
    for found in EDGE.finditer(text):
        values = [bool(near_borders(region, width, height)) for region in chosen]
        if not holds(values, bound, negated(text, found.start())):
            out.append(Conflict("edge", found.group(0), region_of(segment), "no region is near the border"))
    for found in GAP.finditer(text):
        smallest = [min(border_gaps(region, width, height).values()) for region in chosen]
        if not smallest or int(found.group(1)) != min(smallest):
            out.append(Conflict("edge", found.group(0), region_of(segment), f"{min(smallest, default=0)} px"))
    return blank(EDGE, blank(GAP, text)), out


def blank(pattern: re.Pattern[str], text: str) -> str:
    """The text with every match of the pattern replaced by as many spaces (positions stay valid)."""
    return pattern.sub(lambda found: " " * len(found.group(0)), text)


def side_claim_holds(found: re.Match[str], by_side: dict[str, int], near: Sequence[str], sides: Sequence[str]) -> bool:
    """'touches the top border' (gap 0), 'comes within 3 px of ...' (smallest gap 3), 'near the left edge'."""
    gaps = [by_side[side.lower()] for side in sides]
    if found.group("verb").lower() == "touches":
        return all(gap == 0 for gap in gaps)
    if found.group("gap") is not None:
        return min(gaps) == int(found.group("gap")) and all(side.lower() in near for side in sides)
    return all(side.lower() in near for side in sides)


def reference_conflicts(text: str, segment: Segment, grounds: Grounds) -> tuple[str, list[Conflict]]:
    """A region's best-matching reference, its place there, and how much darker or brighter the region is."""
    found = None if segment.regions is None or len(segment.regions) != 1 else grounds.evidence_for(segment.regions[0])
    out: list[Conflict] = []
    if found is not None:
        where = found.region
        for ref in REFERENCE_REF.finditer(text):
            if MATCH_WORDS.search(text) and int(ref.group(1)) != found.reference + 1:
                out.append(Conflict("reference", ref.group(0), where, f"reference {found.reference + 1}"))
        out += reference_place_conflicts(segment.reference, found.location, where)
        out += shade_conflicts(text, found.difference, found.texture, where)
    text = blank(GREY, blank(REFERENCE_SAME, blank(REFERENCE_CONTRAST, text)))
    return blank(TEXTURE, text), out


def reference_place_conflicts(text: str, location: str, where: int) -> list[Conflict]:
    out = []
    for said in LOCATION.finditer(text):
        if (said.group("the") or " " in said.group("loc")) and location_of(said.group("loc")) != location:
            out.append(Conflict("reference", said.group(0), where, f"its match is in the {location}"))
    return out


def shade_conflicts(text: str, difference: float, texture: str, where: int) -> list[Conflict]:
    """'14 grey levels darker than that good area', 'about as bright as ...', 'rougher'."""
    out = []
    for said in GREY.finditer(text):
        darker = said.group(2).lower() == "darker"
        if darker != (difference < 0) or abs(float(said.group(1)) - abs(difference)) > 1.0:
            out.append(Conflict("reference", said.group(0), where, f"{difference:+.0f} grey levels"))
    for said in REFERENCE_CONTRAST.finditer(text):
        if (said.group(1).lower() == "darker") != (difference < 0) or abs(difference) < GREY_SAME:
            out.append(Conflict("reference", said.group(0), where, f"{difference:+.0f} grey levels"))
    for said in REFERENCE_SAME.finditer(text):
        if abs(difference) >= GREY_SAME + 0.5:
            out.append(Conflict("reference", said.group(0), where, f"{difference:+.0f} grey levels"))
    for said in TEXTURE.finditer(text):
        if said.group(1).lower() != texture:
            out.append(Conflict("reference", said.group(0), where, f"texture {texture}"))
    return out


# ---------------------------------------------------------------- repairs


def replacement(conflict: Conflict, grounds: Grounds, question: Question | None) -> str:
    """The grounded sentence for the fact a sentence got wrong."""
    inspection, regions = grounds.inspection, grounds.regions
    region = regions[conflict.region - 1] if conflict.region and conflict.region <= len(regions) else None
    plain = Question("", "anomaly")
    if conflict.fact == "verdict":
        return anomaly_answer(plain, grounds)[0]
    if not regions and conflict.fact not in ("confidence", "score"):
        return empty_sentence(inspection)
    builders: dict[str, Callable[[], str]] = {
        "count": lambda: count_answer(plain, grounds)[0],
        "region": lambda: count_answer(plain, grounds)[0],
        "confidence": lambda: UNTRUSTED_MARGIN if conflict.truth == UNTRUSTED else confidence_answer(plain, grounds)[0],
        "score": lambda: score_answer(plain, grounds)[0],
        "rank": lambda: rank_sentence(conflict, grounds, question),
        "family": lambda: kind_answer(Question("", "kind", conflict.region), grounds)[0],
        "reference": lambda: evidence_sentence(region or regions[0], grounds),
        "edge": lambda: edge_answer([region] if region else regions, grounds)[0],
        "box": lambda: where_exactly_answer(plain, grounds)[0],
    }
    if conflict.fact in builders:
        return builders[conflict.fact]()
    if region is not None:
        return region_sentence(region)
    if conflict.fact in ("size", "area"):
        return size_answer(plain, grounds)[0]
    if conflict.fact == "location":
        return where_answer(plain, grounds)[0]
    return " ".join(describe_answer(plain, grounds))


def rank_sentence(conflict: Conflict, grounds: Grounds, question: Question | None) -> str:
    severe = re.search(SEVERE, conflict.said, re.IGNORECASE) is not None
    return biggest_answer(Question("", "biggest", "severe" if severe else "biggest"), grounds)[0]


def loops(text: str) -> bool:
    """True when a sentence says one clause twice ('no region fits; no region fits'): the model is looping."""
    clauses = [normalised(part) for part in re.split(r"[;:,]", text) if len(part.split()) >= 3]
    return len(set(clauses)) < len(clauses)


def normalised(text: str) -> str:
    return " ".join(WORDS.findall(text.lower())).strip(" .")


def split_sentences(text: str) -> list[str]:
    """Sentences of a finished text, each with the whitespace before it."""
    out, start = [], 0
    for found in SENTENCE_END.finditer(text):
        out.append(text[start : found.end()])
        start = found.end()
    return [*out, text[start:]] if text[start:].strip() else out


class ClaimChecker:
    """Checks an answer sentence by sentence as it streams; `report` says what it did."""

    def __init__(self, grounds: Grounds, question: Question | None = None) -> None:
        self.grounds = grounds
        self.question = question
        self.report = CheckReport()
        self.said: list[str] = []  # normalised sentences shown so far
        self.carried: int | None = None
        self.truncated: Callable[[], bool] = lambda: False  # set by a generator that can stop mid-sentence

    def stream(self, pieces: Iterable[str], opening: str = "") -> Iterator[str]:
        """The opening at once (checked for the report only), then each generated sentence once checked."""
        shown: list[str] = []
        if opening:
            shown.append(opening)
            self.check_opening(opening)
            yield opening
        buffer, raw = "", opening
        for piece in pieces:
            buffer, raw = buffer + piece, raw + piece
            while (end := SENTENCE_END.search(buffer)) is not None:
                out = self.checked(buffer[: end.end()], "".join(shown), finished=True)
                buffer = buffer[end.end() :]
                if out:
                    shown.append(out)
                    yield out
        if buffer.strip():
            out = self.checked(buffer, "".join(shown), finished=False)
            if out:
                shown.append(out)
                yield out
        self.report.raw, self.report.answer = raw.strip(), "".join(shown).strip()

    def check_opening(self, opening: str) -> None:
        """Read the grounded opening for the report (its trust warnings are the Inspection's own words: skipped)."""
        warnings = " ".join(preamble(self.grounds.inspection, self.grounds.warned))
        self.said += [normalised(text) for text in split_sentences(warnings)]
        if warnings and opening.startswith(warnings):
            opening = opening[len(warnings) :]
        for index, text in enumerate(split_sentences(opening)):
            found, self.carried = sentence_conflicts(text, self.grounds, self.question, index == 0, self.carried)
            self.report.opening_conflicts += found
            self.said.append(normalised(text))

    def checked(self, text: str, shown: str, finished: bool) -> str:
        """The sentence, its grounded replacement, or '' (dropped); with the whitespace that came before it."""
        if not text.strip():
            return text if shown else ""
        self.report.sentences += 1
        lead = text[: len(text) - len(text.lstrip())] or (" " if shown and not shown[-1].isspace() else "")
        key = normalised(text)
        if key in self.said or loops(text):
            return self.dropped(text, "repeat")
        if self.off_topic(text):  # about regions the question did not ask for: dropped, right or wrong
            return self.dropped(text, "off_topic")
        conflicts, carried = sentence_conflicts(text, self.grounds, self.question, not shown, self.carried)
        if conflicts:
            return self.repaired(text, conflicts, lead)
        if not finished and self.truncated() and not text.rstrip().endswith((".", "!", "?")):
            return self.dropped(text, "unfinished")
        self.carried = carried
        self.said.append(key)
        return text

    def repaired(self, text: str, conflicts: Sequence[Conflict], lead: str) -> str:
        facts = tuple(dict.fromkeys(conflict.fact for conflict in conflicts))
        new = replacement(conflicts[0], self.grounds, self.question)
        if self.already_said(new) or self.off_topic(new):
            self.report.repairs.append(Repair(text.strip(), "dropped", facts))
            return ""
        self.report.repairs.append(Repair(text.strip(), "replaced", facts, new))
        self.said.append(normalised(new))
        self.carried = conflicts[0].region
        return lead + new

    def already_said(self, text: str) -> bool:
        """True when the sentence, without an opening Yes/No, is part of what was shown."""
        key = normalised(ANSWER_WORD.sub("", text))
        return any(key in said for said in self.said)

    def dropped(self, text: str, path: str) -> str:
        self.report.repairs.append(Repair(text.strip(), path, ()))
        return ""

    def off_topic(self, text: str) -> bool:
        """A sentence about other regions than the one the question singles out."""
        question, regions = self.question, self.grounds.regions
        if question is None or not regions or (question.focus is None and question.kind != "biggest"):
            return False
        focus = question if question.focus is not None else Question("", "biggest", "biggest")
        allowed = {region.index for region in focus_regions(focus, regions)}
        named = {n for found in REGION_REF.finditer(text) for n in region_numbers(found)}
        return bool(named - allowed)


def check_answer(text: str, grounds: Grounds, question: Question | None = None) -> list[Conflict]:
    """Every conflict in a finished answer, sentence by sentence (no repair); its opening trust warnings aside."""
    out, carried = [], None
    text = without_preamble(text, grounds.inspection)
    for index, sentence in enumerate(split_sentences(text)):
        found, carried = sentence_conflicts(sentence, grounds, question, index == 0, carried)
        out += found
    return out


def defect_type_names(defect_types: Sequence[DefectType] = ()) -> list[str]:
    return [kind.name for kind in (*defect_types, *GENERIC_DEFECT_TYPES)]
