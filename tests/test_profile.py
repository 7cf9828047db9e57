import dataclasses
import time

import numpy as np
import pytest
from conftest import texture_crops, with_dark_blob
from safetensors import safe_open

from anomalygpt.config import load_preset
from anomalygpt.inspection import Inspector
from anomalygpt.profile import PROFILE_FORMAT, ProfileError, chosen_preset, read_header, read_profile
from anomalygpt.state import load_state, save_state


@pytest.fixture(scope="module")
def inspector(small_backbone):
    return Inspector(small_backbone, load_preset("default"))


@pytest.fixture(scope="module")
def saved(inspector, tmp_path_factory):
    folder = tmp_path_factory.mktemp("profile")
    files = []
    for i, crop in enumerate(texture_crops(5, seed=21)):
        path = folder / f"good{i}.npy"
        np.save(path, crop)
        files.append(path)
    references = inspector.fit([np.load(f) for f in files], class_name="brick wall")
    path = inspector.save_profile(references, folder / "brick.profile", files)
    return references, path


def queries():
    return [texture_crops(1, seed=60)[0], with_dark_blob(texture_crops(1, seed=61)[0], center=(40, 90), radius=9)]


def test_a_loaded_profile_inspects_exactly_as_the_fitted_references(inspector, saved):
    references, path = saved
    loaded = inspector.load_profile(path)
    assert loaded.names == references.names and loaded.calibration == references.calibration
    assert len(loaded.calibration.reference_scores) == len(references.names) >= 2  # saved with the thresholds
    assert loaded.augmentation == references.augmentation and loaded.fit_stats == references.fit_stats
    assert loaded.class_name == "brick wall" and loaded.memory.augment == references.memory.augment
    for query in queries():
        fitted, again = inspector.inspect(query, references), inspector.inspect(query, loaded)
        assert again.score == fitted.score and again.verdict == fitted.verdict and again.regions == fitted.regions
        assert again.reference_fit == fitted.reference_fit and again.class_name == "brick wall"


def test_a_profile_is_one_safetensors_file_with_its_json_header(saved):
    _, path = saved
    assert [p.name for p in path.parent.iterdir() if "profile" in p.name] == ["brick.profile"]
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["format"] == "anomalygpt-state/1"  # the header is JSON, nothing is pickled
    header, tensors = read_profile(path)
    assert header["format"] == PROFILE_FORMAT and header["version"] == 1 and len(header["references"]) == 5
    assert len(header["reference_sha256"]) == 5 and all(len(h) == 64 for h in header["reference_sha256"])
    assert header["preset"]["name"] == "default" and header["calibration"]["method"].startswith("leave-one-out")
    assert tensors["stage0.features"].dtype.itemsize == 2 and tensors["descriptors"].shape[0] == 5
    start = time.perf_counter()
    read_profile(path)
    assert time.perf_counter() - start < 1.0


class CountingOpen:
    """safe_open, counting the tensors read through it."""

    def __init__(self):
        self.tensors = 0

    def __call__(self, *args, **kwargs):
        return CountedHandle(safe_open(*args, **kwargs), self)


class CountedHandle:
    def __init__(self, handle, counter):
        self.handle, self.counter = handle, counter

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def metadata(self):
        return self.handle.metadata()

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, key):
        self.counter.tensors += 1
        return self.handle.get_tensor(key)


def test_the_preset_is_chosen_from_the_header_without_reading_tensors(saved, tmp_path, monkeypatch):
    _, path = saved
    counting = CountingOpen()
    monkeypatch.setattr("anomalygpt.state.safe_open", counting)
    assert chosen_preset(None, path).name == "default" and chosen_preset(None, path).device == "auto"
    assert counting.tensors == 0
    header, tensors = read_profile(path)
    assert counting.tensors == len(tensors) > 0 and read_header(path) == header
    flipped = bytearray(path.read_bytes())
    flipped[-100] ^= 0xFF  # the tensors are not read, so only the full read sees it
    (tmp_path / "flipped.profile").write_bytes(bytes(flipped))
    assert read_header(tmp_path / "flipped.profile") == header


def test_corrupt_newer_foreign_and_mismatched_profiles_get_one_line_errors(inspector, saved, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # a flipped bit in the tensor bytes
    (tmp_path / "flipped.profile").write_bytes(bytes(data))
    with pytest.raises(ProfileError, match="corrupted profile"):
        inspector.load_profile(tmp_path / "flipped.profile")
    (tmp_path / "cut.profile").write_bytes(path.read_bytes()[:500])
    (tmp_path / "empty.profile").write_bytes(b"")
    tree = load_state(path)
    tree["header"]["version"] = 99
    save_state(tmp_path / "newer.profile", tree)
    save_state(tmp_path / "other.profile", {"header": {"format": "something"}})
    refusals = {
        "cut": "not a readable profile \\(cut short, or not written by anomalygpt: ",
        "empty": "empty.profile: an empty file, not a profile",
        "newer": "version 99 is newer",
        "other": "not an anomalygpt profile",
        "missing": "missing.profile: profile not found",
    }
    for name, problem in refusals.items():
        for read in (inspector.load_profile, read_header, lambda p: chosen_preset(None, p)):
            with pytest.raises(ProfileError, match=problem):
                read(tmp_path / f"{name}.profile")
    preset = inspector.preset
    coarse = Inspector(
        inspector.backbone, dataclasses.replace(preset, memory=dataclasses.replace(preset.memory, sigma=8.0))
    )
    with pytest.raises(ProfileError, match="whose memory differ from preset"):
        coarse.load_profile(path)
