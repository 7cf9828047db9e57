"""State files (safetensors + JSON tree): exact round trips, no unpickling, orphaned temp files."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pickle_probe import plant
from safetensors.torch import save_file

from anomalygpt.state import StateError, load_state, remove_orphaned_temps, save_state


def test_round_trip_keeps_optimizer_state_tensors_and_plain_values(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(4, 3)).square().sum().backward()
    optimizer.step()
    shared = torch.arange(6.0)
    tree = {
        "optimizer": optimizer.state_dict(),  # int keys, tuples (betas), None, bools
        "views": [shared[:3], shared, shared.view(2, 3).T],  # views and shared storage
        "rng": torch.get_rng_state(),
        "odd": {"$tensor": 1, "nan": float("nan"), "inf": float("-inf"), "big": 2**70, "flag": True, 3: "x"},
    }
    back = load_state(save_state(tmp_path / "state.safetensors", tree))
    assert torch.equal(back["views"][2], shared.view(2, 3).T) and torch.equal(back["views"][0], shared[:3])
    assert torch.equal(back["rng"], tree["rng"])
    odd = back["odd"]
    assert odd["$tensor"] == 1 and odd["nan"] != odd["nan"] and odd["inf"] == float("-inf")
    assert odd["big"] == 2**70 and odd["flag"] is True and odd[3] == "x"
    saved, restored = tree["optimizer"], back["optimizer"]
    assert restored["param_groups"] == saved["param_groups"] and restored["param_groups"][0]["betas"] == (0.9, 0.999)
    assert set(restored["state"]) == {0, 1}
    assert all(torch.equal(restored["state"][0][k], saved["state"][0][k]) for k in saved["state"][0])
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(restored)  # loads as torch's own state dict
    outline = load_state(tmp_path / "state.safetensors", with_tensors=False)
    assert outline["views"] == [None, None, None] and outline["odd"]["big"] == 2**70


def test_a_planted_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = plant(tmp_path / "checkpoint.safetensors", marker)
    with pytest.raises(StateError) as caught:
        load_state(path)
    assert str(caught.value).startswith(f"{path}: not a readable state file") and "\n" not in str(caught.value)
    assert not marker.exists()
    torch.load(io.BytesIO(path.read_bytes()), weights_only=False)  # the probe is live: unpickling it runs code
    assert marker.read_text() == "pickle ran"


def test_other_files_are_refused_on_one_line(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(StateError, match="not a state file written by anomalygpt"):
        load_state(tmp_path / "plain.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(save_state(tmp_path / "s", {"a": torch.ones(9)}).read_bytes()[:-4])
    with pytest.raises(StateError, match="not a readable state file"):
        load_state(tmp_path / "cut.safetensors")
    with pytest.raises(StateError, match="state file not found"):
        load_state(tmp_path / "none.safetensors")
    with pytest.raises(TypeError, match="cannot hold a set"):
        save_state(tmp_path / "bad.safetensors", {"a": {1, 2}})
    assert not (tmp_path / "bad.safetensors").exists()


KILLED_WRITE = """
import os, sys
from anomalygpt.io import write_bytes_atomic
os.replace = lambda src, dst: os._exit(9)  # killed after the temp file is written, before its rename
write_bytes_atomic(sys.argv[1], b"data")
"""


def test_orphaned_temps_of_the_named_files_are_removed_and_nothing_else(tmp_path: Path) -> None:
    for name in ("checkpoint.safetensors", "history.json"):
        run = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(tmp_path / name)], check=False)
        assert run.returncode == 9
    orphans = sorted(p.name for p in tmp_path.iterdir())
    assert len(orphans) == 2 and all(n.startswith((".checkpoint.safetensors.", ".history.json.")) for n in orphans)
    (tmp_path / ".decoder.json.0123456789ab.pair").write_text("staged")
    (tmp_path / "..decoder.json.0123456789ab.pair.ba9876543210.tmp").write_text("staging")
    (tmp_path / ".assistant.0123456789ab.tmp").mkdir()  # save_assistant's temp folder
    kept = [".other.json.0123456789ab.tmp", ".checkpoint.safetensors.tmp", "checkpoint.safetensors", "notes.tmp"]
    for name in kept:
        (tmp_path / name).write_text("keep")
    names = ["checkpoint.safetensors", "history.json", "decoder.json", "assistant"]
    removed = remove_orphaned_temps(tmp_path, names)
    assert len(removed) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert remove_orphaned_temps(tmp_path / "missing", names) == []
