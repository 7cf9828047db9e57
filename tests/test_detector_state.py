"""Baseline checkpoints in a Detector's work folder: state files only, planted pickles never run, temps cleaned."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pickle_probe import plant

from anomalygpt.baselines.feature_ae import FeatureAEConfig
from anomalygpt.baselines.patchcore import PatchCoreConfig
from anomalygpt.baselines.simplenet import SimpleNetConfig
from anomalygpt.baselines.unet_ae import UNetAEConfig
from anomalygpt.detector import BASELINES
from anomalygpt.state import load_state

# name -> (checkpoint file, a config small enough for a test); every baseline build_detector knows is here
TINY: dict[str, tuple[str, Any]] = {
    "patchcore": ("patchcore.safetensors", PatchCoreConfig(min_coreset=50)),
    "simplenet": ("simplenet.safetensors", SimpleNetConfig(steps=4, checkpoint_every=2, positions_per_step=256)),
    "unet-ae": ("unet-ae.safetensors", UNetAEConfig(image_size=32, width=4, depth=2, epochs=2, batch_size=8)),
    "feature-ae": ("feature-ae.safetensors", FeatureAEConfig(epochs=2, batch_images=4)),
}


def test_every_baseline_is_covered() -> None:
    assert set(TINY) == set(BASELINES)


@pytest.mark.parametrize("name", sorted(TINY))
def test_planted_pickles_in_the_workdir_never_run(
    name: str, feature_cache, blob_data, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    filename, config = TINY[name]
    module, function = BASELINES[name]
    build = getattr(importlib.import_module(module), function)
    marker, workdir = tmp_path / "pickle-ran", tmp_path / "work"
    plant(workdir / filename, marker)  # under the checkpoint's own name
    plant(workdir / filename.replace(".safetensors", ".pt"), marker)  # where older versions pickled it
    orphan = workdir / f".{filename}.0123456789ab.tmp"  # a killed fit's temp file
    orphan.write_bytes(b"x")
    normals = blob_data["normals"]
    fitted = build(feature_cache, 0, config)
    with caplog.at_level(logging.WARNING):
        report = fitted.fit(normals, workdir)
    notes = " | ".join(record.getMessage() for record in caplog.records)
    assert not marker.exists() and not report.resumed
    assert f"{filename}: not a readable state file" in notes and "old pickle format, not loaded" in notes
    assert not orphan.exists()
    assert load_state(workdir / filename)["fingerprint"]["method"] == name  # replaced by a state file
    again = build(feature_cache, 0, config)  # resumes the finished fit from its state file, exactly
    assert again.fit(normals, workdir).resumed and again.threshold == report.threshold
    images = blob_data["anomalous"][:2]
    np.testing.assert_array_equal(fitted.predict(images).maps, again.predict(images).maps)
    assert not marker.exists()
