"""Grounded answers: defect types (validation, preset parsing, which fit), focus, warnings first."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest
from chat_cases import LOW, MANY, NORMAL

from anomalygpt.assistant import AssistantConfig
from anomalygpt.config import load_preset
from anomalygpt.grounded import (
    CONTRASTS,
    GENERIC_DEFECT_TYPES,
    SHAPES,
    SIZES,
    DefectType,
    Grounds,
    answer_text,
    fitting_types,
    most_severe,
    preamble,
    warned_before,
    without_preamble,
)
from anomalygpt.guard import read_question
from anomalygpt.verdict import fit_warning


def test_every_descriptor_combination_fits_a_generic_family() -> None:
    region = MANY.regions[0]
    for shape, contrast, size in itertools.product(SHAPES, CONTRASTS, SIZES):
        probe = replace(region, shape=shape, contrast=contrast, size=size)
        assert fitting_types(probe, MANY.image_size), (shape, contrast, size)
    line = replace(region, shape="elongated", contrast="darker")
    assert [kind.name for kind in fitting_types(line, MANY.image_size)][:2] == ["crack", "scratch"]
    blob = replace(region, shape="compact", contrast="darker", size="large")
    assert "dead area" in [kind.name for kind in fitting_types(blob, MANY.image_size)]


def test_product_types_come_first_and_generic_ones_only_when_none_fits() -> None:
    region = MANY.regions[0]  # compact, darker, medium, top left (5 px from the borders: near the edge)
    assert region.shape == "compact" and region.contrast == "darker"
    own = (
        DefectType("dark area", "an inactive part", ("compact",), ("darker",)),
        DefectType("hot spot", "", (), ("brighter",)),
    )
    assert [kind.name for kind in fitting_types(region, MANY.image_size, own)] == ["dark area"]
    alien = (DefectType("hot spot", "", (), ("brighter",)),)
    assert fitting_types(region, MANY.image_size, alien) == fitting_types(region, MANY.image_size)
    answer = answer_text(read_question("What kind of defect could it be?"), Grounds(MANY, defect_types=own))
    assert answer.startswith("Region 1 in the top left (medium, compact, darker than its surroundings")
    assert "dark area (an inactive part)" in answer and "hot spot" not in answer


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": ""}, "must be non-empty"),
        ({"name": "crack; or not"}, "without"),
        ({"name": "x", "shapes": ["round"]}, "unknown shapes \\['round'\\]"),
        ({"name": "x", "contrasts": ["dim"]}, "unknown contrasts"),
        ({"name": "x", "sizes": ["huge"]}, "unknown sizes"),
        ({"name": "x", "positions": ["corner"]}, "unknown positions"),
    ],
)
def test_defect_types_are_validated(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DefectType(**{key: tuple(v) if isinstance(v, list) else v for key, v in fields.items()})  # type: ignore[arg-type]


def test_a_preset_names_defect_types(tmp_path: Path) -> None:
    kinds = [
        {"name": "crack", "description": "a dark line", "shapes": ["elongated"], "contrasts": ["darker"]},
        {"name": "dark area", "contrasts": ["darker"], "sizes": ["medium", "large"]},
    ]
    path = tmp_path / "solar.json"
    path.write_text(json.dumps({"name": "solar", "assistant": {"defect_types": kinds}}))
    preset = load_preset(str(path))
    assert preset.assistant.defect_types == (
        DefectType("crack", "a dark line", ("elongated",), ("darker",)),
        DefectType("dark area", "", (), ("darker",), ("medium", "large")),
    )
    path.write_text(json.dumps({"name": "solar", "assistant": {"defect_types": [{"name": "x", "shapes": ["oval"]}]}}))
    with pytest.raises(ValueError, match="unknown shapes"):
        load_preset(str(path))
    with pytest.raises(ValueError, match="names must be unique"):
        AssistantConfig(defect_types=(DefectType("crack"), DefectType("Crack")))


def test_a_focused_question_is_about_one_region() -> None:
    grounds = Grounds(MANY)
    severe = most_severe(MANY.regions)
    assert severe.index == 2  # the highest peak, not the biggest
    assert answer_text(read_question("Which is the most severe?"), grounds).startswith(
        "The most severe is region 2 in the top right: its peak score, 1.0000, is the highest of all regions"
    )
    assert answer_text(read_question("How large is the biggest one?"), grounds) == (
        "The biggest anomalous region (region 1) in the top left is medium: it covers 1.8% of the image."
    )
    assert "numbered as regions 1 to 3" in answer_text(read_question("Where is region 7?"), grounds)


@pytest.mark.parametrize(
    ("question", "many", "normal"),
    [
        ("Is there a defect in the top left?", "Yes: region 1 is in the top left.", "No: "),
        ("Is the top left clean?", "No: region 1 is in the top left.", "Yes: "),
        ("Is the bottom right corner OK?", "No: region 3 is from the bottom to the bottom right.", "Yes: "),
        ("Is the center free of defects?", "Yes: no anomalous region is in the center; the anomalous regions", "Yes: "),
        ("Is the edge clean?", "No: region 2 touches the top border.", "Yes: "),
        ("Does it touch the border?", "Yes: region 2 touches the top border.", "No: "),
    ],
)
def test_a_place_question_is_answered_by_its_polarity(question: str, many: str, normal: str) -> None:
    """'Is the top left clean?' is answered No where a region is: Yes means what the question asks, which for a
    question whether a place is clean is that no region is there."""
    assert answer_text(read_question(question), Grounds(MANY)).startswith(many)
    assert answer_text(read_question(question), Grounds(NORMAL)).startswith(normal)


def test_whether_the_references_suit_the_image_is_the_fit_check_and_their_number() -> None:
    fitting = {"distance": 0.01, "ratio": 1.23, "brightness": 0.2, "fits": True, "nearest": ["a.png"]}
    unlike = {"distance": 0.2, "ratio": 7.5, "brightness": 0.2, "fits": False, "nearest": ["a.png"]}
    ask = read_question("Is the reference set OK?")
    assert answer_text(ask, Grounds(replace(MANY, reference_fit=fitting))) == (
        "Yes: the image's distance to the nearest reference is 1.2 times the references' typical spacing (up to 3 "
        "counts as like them), and its brightness is like theirs. A threshold from 2 good references is rough: which "
        "2 they are can move it enough to flag many good parts or to miss most defects; 16 or more make it steadier."
    )
    enough = answer_text(read_question("Are there enough references?"), Grounds(replace(MANY, reference_fit=fitting)))
    assert enough.startswith("No: a threshold from 2 good references is rough")  # the number first
    assert enough.endswith("The image's distance to the nearest reference is 1.2 times the references' typical "
                           "spacing (up to 3 counts as like them), and its brightness is like theirs.")  # fmt: skip
    warned = replace(MANY, reference_fit=unlike, warnings=[str(fit_warning(unlike))], n_references=64)
    answer = answer_text(ask, Grounds(warned))
    assert answer.startswith("Warning: the image does not look like the good references")
    assert "No: the image does not look like them" in answer and "64 good references are enough" in answer
    many = answer_text(read_question("Are there enough references?"), Grounds(warned))
    assert "Yes: 64 good references are enough for a steady threshold (16 or more)." in many
    assert answer_text(ask, Grounds(replace(NORMAL, n_references=0, mode="zero-shot-batch"))).startswith(
        "There are no good references: this inspection is zero-shot-batch."
    )


def test_warnings_and_low_confidence_come_first_in_every_kind() -> None:
    opening = " ".join(preamble(LOW))
    assert opening.startswith("Warning: the references do not fit this image. Note: my confidence in this verdict")
    for text in ("Is there a defect?", "Where is it?", "What should I do next?", "Compare it with the references."):
        assert answer_text(read_question(text), Grounds(LOW)).startswith(opening + " "), text
    assert preamble(NORMAL) == [] and preamble(MANY) == []


def test_later_answers_recall_the_warnings_in_one_sentence_until_they_change() -> None:
    fit = (
        "the image does not look like the good references (it is 3.2 times farther from the nearest one than the "
        "references are from each other): another product, design or lighting, or a defect over much of it? The "
        "verdict compares it with references that do not fit"
    )
    inspection = replace(LOW, warnings=[fit, "one reference: its threshold cannot see how good parts vary"])
    question = read_question("Where is it?")
    first = answer_text(question, Grounds(inspection))
    assert first.startswith(f"Warning: {fit}. Warning: one reference: its threshold")
    assert warned_before(inspection, ["Hello.", first]) and not warned_before(inspection, ["Hello."])
    later = answer_text(question, Grounds(inspection, warned=True))
    assert later.startswith(
        "Warning (as above): the image does not look like the good references; one reference. Note: my confidence"
    )
    assert len(later) < len(first) - 200 and later.endswith(first[-60:])  # the same answer after the reminder
    for text in (first, later):
        assert without_preamble(text, inspection) == without_preamble(first, inspection) != text
    # Other warnings (the sensitivity or the references changed) are given in full again; none, no reminder.
    moved = replace(inspection, warnings=[fit.replace("3.2", "4.1")])
    assert not warned_before(moved, [first]) and not warned_before(NORMAL, [first])
    assert preamble(NORMAL, warned=True) == [] and preamble(LOW, warned=True)[0] == (
        "Warning (as above): the references do not fit this image."
    )


def test_generic_types_are_valid() -> None:
    assert len({kind.name for kind in GENERIC_DEFECT_TYPES}) == len(GENERIC_DEFECT_TYPES)


@pytest.mark.parametrize(
    ("mode", "n_references", "source"),
    [
        ("few-shot", 4, "from the good references alone"),
        ("pool", 300, "from the good references alone"),
        ("zero-shot-text", 0, "fixed from simulated normal images"),
        ("zero-shot-batch", 0, "from this batch's own scores"),
    ],
)
def test_why_says_where_this_mode_s_threshold_comes_from(mode: str, n_references: int, source: str) -> None:
    inspection = replace(MANY, mode=mode, n_references=n_references)
    why = answer_text(read_question("Why do you think so?"), Grounds(inspection))
    assert source in why
    assert ("good references alone" in why) == (n_references > 0)
    assert (f"from {n_references} good references is rough" in why) == (mode == "few-shot")  # 4: a rough threshold
    sure = answer_text(read_question("How sure are you?"), Grounds(inspection))
    assert (f"from {n_references} good references is rough" in sure) == (mode == "few-shot")
    compare = answer_text(read_question("Compare it with the good references."), Grounds(inspection))
    assert ("no good references to compare with" in compare) == (n_references == 0)


def test_a_trust_warning_keeps_the_confidence_answer_from_vouching_for_the_verdict() -> None:
    sure = replace(MANY, margin=4.7, confidence="high")
    unfit = replace(sure, warnings=["the image does not look like the good references"])
    for text in ("Are you sure?", "Should I trust this result?"):
        assert "The evidence is clear." in answer_text(read_question(text), Grounds(sure))
        answer = answer_text(read_question(text), Grounds(unfit))
        assert answer.startswith("Warning: the image does not look like the good references.")
        assert "My confidence is high" in answer and "The evidence is clear" not in answer
        assert "this margin does not make the verdict reliable: check it by eye." in answer


def test_a_normal_verdict_that_cannot_be_trusted_does_not_pass_the_part() -> None:
    ask = read_question("What should I check next?")
    assert answer_text(ask, Grounds(NORMAL)).startswith("Nothing here needs a closer look: the part can pass")
    for doubtful in (replace(NORMAL, margin=-0.6, confidence="low"), replace(NORMAL, warnings=["one reference"])):
        answer = answer_text(ask, Grounds(doubtful))
        assert "the part can pass" not in answer and "Nothing here needs a closer look" not in answer
        assert "do not pass the part on this verdict alone" in answer


def test_a_generic_family_s_description_names_no_shade_its_regions_may_lack() -> None:
    """'crack (a thin dark line)' was said of regions 'about as bright as their surroundings'."""
    shades = {"darker": "dark", "brighter": "bright"}
    for kind in GENERIC_DEFECT_TYPES:
        named = {word for word in ("dark", "bright") if word in kind.description.split()}
        for contrast in kind.contrasts or CONTRASTS:
            assert not named or shades.get(contrast) in named, (kind.name, contrast)
    line = replace(MANY.regions[2], shape="elongated", contrast="similar")
    answer = answer_text(read_question("What kind of defect is it?"), Grounds(replace(MANY, regions=[line])))
    assert "about as bright as its surroundings" in answer and "crack (a thin break in the material)" in answer
