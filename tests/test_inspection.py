import dataclasses
import json
import math

import numpy as np
import pytest
from conftest import texture_crops, with_dark_blob

from anomalygpt.claims import check_answer
from anomalygpt.config import ConfigError, Preset, load_preset
from anomalygpt.grounded import Grounds, answer_text
from anomalygpt.guard import read_question
from anomalygpt.inspection import InspectionError, Inspector, build_inspector
from anomalygpt.regions import format_pct
from anomalygpt.verdict import (
    BATCH_MODE_NOTE,
    BLANK_HEAD,
    RELIABLE_SHARE,
    SAME_PICTURE_HEAD,
    SMALL_HEAD,
    STEADY_REFERENCES,
    confidence_word,
    few_references_note,
    pixel_spread,
)


@pytest.fixture(scope="module")
def inspector(small_backbone):
    return Inspector(small_backbone, dataclasses.replace(load_preset("default")))


@pytest.fixture(scope="module")
def references(inspector):
    return inspector.fit(texture_crops(4, seed=11))


def test_default_preset_is_the_offline_efficientnet():
    preset = load_preset("default")
    assert preset.backbone.name == "efficientnet-lite0" and preset.backbone.stages == (4, 10)
    # Augmentation decided from the references; images standardised; pools retrieve 8 nearest (ELPV dev half).
    assert preset.memory.augment is None and preset.memory.standardize is True and preset.memory.retrieve == 8


def test_a_query_that_is_a_reference_blank_or_too_small_is_warned_of_first(inspector, references):
    """Whatever the references are worth, such a verdict says nothing: its warning comes first, on every path."""
    own = texture_crops(4, seed=11)  # the references' pictures
    other = texture_crops(1, seed=99)[0]
    same = inspector.inspect(own[2], references)
    assert same.warnings[0].startswith(f"{SAME_PICTURE_HEAD} reference 3:") and same.score < 1e-3
    found = list(inspector.inspect_many([own[0], other], references))
    assert found[0].warnings[0].startswith(f"{SAME_PICTURE_HEAD} reference 1:")
    assert found[1].warnings == inspector.inspect(other, references).warnings == []
    blank = inspector.inspect(np.full((128, 128, 3), 77, np.uint8), references)
    assert blank.warnings[0] == (
        f"{BLANK_HEAD} (its pixels vary by 0.0 grey levels): there is no product to inspect; check the camera, the "
        "lighting and the file"
    )
    assert pixel_spread(np.dstack([np.full((8, 8), v, np.uint8) for v in (255, 0, 0)])) == 0.0  # plain red: blank
    side = inspector.geometry.input_side
    small = math.ceil(RELIABLE_SHARE * side) - 1
    tiny_refs = inspector.fit(texture_crops(4, size=small, seed=11)[:3] + [texture_crops(1, size=small, seed=5)[0]])
    tiny = inspector.inspect(texture_crops(1, size=small, seed=98)[0], tiny_refs)
    assert tiny.warnings[0].startswith(f"{SMALL_HEAD} {small}x{small} px, enlarged {side / small:.1f} times")
    bigger = small + 1
    refs = inspector.fit(texture_crops(4, size=bigger, seed=11))
    assert inspector.inspect(texture_crops(1, size=bigger, seed=98)[0], refs).warnings == []
    answer = answer_text(read_question("What should I do?"), Grounds(tiny))
    assert answer.startswith("Warning: the image is only") and "can pass" not in answer


def test_unknown_preset_and_options_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'; known: default"):
        load_preset("nope")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"memory": {"augmnt": False}}))
    with pytest.raises(ConfigError, match="unknown option\\(s\\) augmnt"):
        load_preset(str(bad))
    bad.write_text(json.dumps({"memory": {"neighbourhood": "three"}}))
    with pytest.raises(ConfigError, match="memory:neighbourhood: expected int"):
        load_preset(str(bad))
    with pytest.raises(ConfigError, match="preset file not found"):
        load_preset(str(tmp_path / "missing.json"))


def test_defect_is_flagged_with_its_region_and_a_good_crop_is_not(inspector, references):
    good = texture_crops(1, seed=99)[0]
    bad = with_dark_blob(texture_crops(1, seed=98)[0], center=(100, 100), radius=9)
    ok = inspector.inspect(good, references)
    found = inspector.inspect(bad, references, class_name="brick wall")
    assert not ok.is_anomalous and ok.regions == [] and ok.margin < 0
    assert found.is_anomalous and found.margin > 0 and found.score > found.threshold
    assert found.verdict == "anomalous" and found.n_references == 4 and found.mode == "few-shot"
    top = found.regions[0]
    assert top.location == "bottom right" and top.contrast == "darker"
    x0, y0, x1, y1 = top.box
    assert x0 <= 100 <= x1 and y0 <= 100 <= y1
    assert "ANOMALOUS" in found.facts() and "bottom right" in found.facts() and "brick wall" in found.facts()
    assert found.anomaly_map.shape == (128, 128)


def test_inspection_serialises_to_json_without_the_map(inspector, references):
    insp = inspector.inspect(texture_crops(1, seed=5)[0], references, source="q.png")
    data = json.loads(insp.to_json())
    assert data["verdict"] == insp.verdict and data["source"] == "q.png"
    assert "anomaly_map" not in data and data["image_size"] == [128, 128]
    assert data["calibration"]["image_threshold"] == pytest.approx(insp.threshold)
    # 4 references: the record carries the note on a rough threshold beside its warnings, as the front ends show it
    assert data["notes"] == insp.notes == [few_references_note(4)] and data["n_references"] == 4
    assert data["p_value"] is None  # 4 references: no conformal threshold, no p-value
    assert dataclasses.replace(insp, n_references=16).to_dict()["notes"] == []
    assert dataclasses.replace(insp, mode="zero-shot-batch", n_references=0).notes == [BATCH_MODE_NOTE]


def test_a_pool_with_a_conformal_threshold_gives_each_inspection_its_p_value(small_backbone):
    preset = load_preset("default")
    preset = dataclasses.replace(
        preset,
        memory=dataclasses.replace(preset.memory, retrieve=2),
        calibration=dataclasses.replace(preset.calibration, false_alarm_rate=0.25),  # 3 held out are enough
    )
    inspector = Inspector(small_backbone, preset)
    pool = inspector.fit(texture_crops(7, seed=30))
    assert pool.mode == "pool" and pool.calibration.false_alarm_rate == 0.25
    good, defect = texture_crops(1, seed=31)[0], with_dark_blob(texture_crops(1, seed=32)[0], (64, 64), 14)
    found = [inspector.inspect(image, pool) for image in (good, defect)]
    assert [i.verdict for i in found] == ["normal", "anomalous"]
    scores = pool.calibration.reference_scores
    for inspection in found:  # the share of the 7 references scoring as high, the query counted
        assert inspection.p_value == pytest.approx((1 + sum(s >= inspection.score for s in scores)) / 8)
        assert (inspection.p_value <= 0.25) == inspection.is_anomalous
        assert json.loads(inspection.to_json())["p_value"] == inspection.p_value
    assert found[1].p_value == pytest.approx(1 / 8)
    for inspection in found:  # the why answer states the rate, the claim checker holds it to the inspection
        grounds = Grounds(inspection, ())
        why = answer_text(read_question("Why is this the verdict?"), grounds)
        assert f"score above it at most {format_pct(25.0)} of the time" in why
        assert check_answer(why, grounds) == []
        sure = answer_text(read_question("How sure are you?"), grounds)
        assert f"about {format_pct(100 * inspection.p_value)} of the time" in sure
        assert check_answer(sure, grounds) == []


def test_bad_inputs_get_clear_errors(inspector, references):
    with pytest.raises(InspectionError, match="no good reference images"):
        inspector.fit([])
    with pytest.raises(InspectionError, match="at most 10,000"):
        inspector.fit([np.zeros((32, 32, 3), np.uint8)] * 10_001)
    with pytest.raises(InspectionError, match="q.png: 96x64 px but the references are 128x128 px"):
        inspector.inspect(np.zeros((64, 96, 3), np.uint8), references, source="q.png")
    crops = texture_crops(2)
    with pytest.raises(InspectionError, match="references differ in size"):
        inspector.fit([crops[0][:64, :64], crops[1][:64]])
    with pytest.raises(InspectionError, match="reference 2: blank reference"):
        inspector.fit([crops[0], np.zeros((128, 128, 3), np.uint8)])


def test_only_two_to_fifteen_references_get_the_note_on_a_rough_threshold():
    assert STEADY_REFERENCES == 16
    notes = {n: few_references_note(n) for n in (0, 1, 2, 4, 15, 16, 300)}
    assert [n for n, note in notes.items() if note] == [2, 4, 15]  # one reference has its own caveat
    assert notes[4] is not None and notes[4].startswith("a threshold from 4 good references is rough")


def test_confidence_words_follow_the_margin():
    assert [confidence_word(m) for m in (0.2, -0.9, 1.5, -2.9, 3.0, -7.0)] == [
        "low",
        "low",
        "medium",
        "medium",
        "high",
        "high",
    ]


def test_factory_accepts_a_preset_object():
    inspector = build_inspector(Preset(name="t", backbone=dataclasses.replace(Preset("t").backbone, image_size=64)))
    assert inspector.backbone.image_size == 64


def test_many_references_are_decoded_when_read_and_give_the_same_result(inspector, tmp_path, monkeypatch):
    from PIL import Image

    import anomalygpt.inspection as inspection_module

    crops = texture_crops(4, seed=31)
    paths = []
    for i, crop in enumerate([*crops, crops[1]]):  # the last is the same picture as the second
        paths.append(tmp_path / f"good{i}.png")
        Image.fromarray(crop).save(paths[-1])
    in_memory = inspector.fit(paths)
    monkeypatch.setattr(inspection_module, "MAX_REFERENCES_IN_MEMORY", 2)
    assert isinstance(inspection_module.reference_images(paths, [str(p) for p in paths]), inspection_module.LazyImages)
    lazy = inspector.fit(paths)
    assert lazy.names == in_memory.names == [str(p) for p in paths[:4]]
    assert lazy.calibration == in_memory.calibration and lazy.warnings == in_memory.warnings
    assert lazy.warnings[0].startswith("2 references are the same picture")


def test_with_preset_shares_the_models_and_loads_no_decoder(small_backbone):
    """The service fits a profile at its own false-alarm rate on the models it has: no second backbone, and the
    decoder (seconds to load, unused by few-shot maps at fusion weight 0) is not loaded for it."""
    from anomalygpt.config import with_false_alarm_rate

    inspector = Inspector(small_backbone, load_preset("default"))
    other = inspector.with_preset(with_false_alarm_rate(inspector.preset, 0.1))
    assert other.backbone is inspector.backbone and other.preset.calibration.false_alarm_rate == 0.1
    assert inspector.preset.decoder.weights and other._prior is None and inspector._prior is None
