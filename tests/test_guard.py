"""Reading operators' questions: kind, the region singled out, the place and the defect type named."""

from __future__ import annotations

import pytest

from anomalygpt.grounded import DefectType
from anomalygpt.guard import Question, read_question


@pytest.mark.parametrize(
    ("text", "kind", "focus", "place", "family", "polarity"),
    [
        ("Is there any defect?", "anomaly", None, None, None, "defect"),
        ("Is this part OK?", "anomaly", None, None, None, "normal"),
        ("What is wrong with it?", "anomaly", None, None, None, None),
        ("Where is the biggest defect?", "where", "biggest", None, None, None),
        ("How large is the biggest one?", "size", "biggest", None, None, None),
        ("Which one is the most severe?", "biggest", "severe", None, None, None),
        ("Which region is the largest?", "biggest", "biggest", None, None, None),
        ("Tell me about the second region.", "describe", 2, None, None, None),
        ("Where is region 3?", "where", 3, None, None, None),
        ("Is it near the top?", "near", None, "top", None, "defect"),  # near: Yes = a region is there
        ("Is the bottom right corner clean?", "near", None, "bottom right", None, "normal"),  # Yes = none is
        ("Is the top left OK?", "near", None, "top left", None, "normal"),  # the place as the subject
        ("Is the edge free of defects?", "near", None, "edge", None, "normal"),
        ("Does the top look damaged?", "near", None, "top", None, "defect"),
        ("Is there a defect in the bottom left corner?", "near", None, "bottom left", None, "defect"),
        ("Does it touch the border?", "near", None, "edge", None, "defect"),
        ("Is that right?", "other", None, None, None, None),  # 'right' after no preposition is not a place
        ("Is it a crack?", "kind", None, None, "crack", "defect"),
        ("Could it be a blotch?", "kind", None, None, "blotch", None),
        ("What could have caused this?", "kind", None, None, None, None),
        ("Compare it with the good references.", "compare", None, None, None, None),
        ("Is the reference set OK?", "references", None, None, None, None),
        ("Are there enough good examples?", "references", "number", None, None, None),
        ("Do the references fit this image?", "references", None, None, None, None),
        ("Does it match the references?", "compare", None, None, None, None),
        ("Does it look like the good ones?", "compare", None, None, None, None),
        ("Why do you think so?", "why", None, None, None, None),
        ("Why is the score so high?", "why", None, None, None, None),
        ("What is the anomaly score?", "score", None, None, None, None),
        ("Where should I look?", "where", None, None, None, None),
        ("What should I check next?", "next_check", None, None, None, None),
        ("Should I reject this cell?", "next_check", None, None, None, None),
        ("Can I trust this result?", "confidence", None, None, None, None),
        ("Give me the exact coordinates.", "where_exactly", None, None, None, None),
        ("Hello there", "other", None, None, None, None),
    ],
)
def test_questions_are_read(
    text: str, kind: str, focus: str | int | None, place: str | None, family: str | None, polarity: str | None
) -> None:
    own = (DefectType("blotch", "a soft patch"),)
    assert read_question(text, own) == Question(text, kind, focus, place, family, polarity)
