"""Stage-1 training state: bit-identical resume, no unpickling of planted files, orphaned temp files cleaned."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from pickle_probe import plant

import train.decoder as trainer
from anomalygpt.state import load_state
from anomalygpt.weights import load_module
from train.cli import main as train_main

TINY = {"name": "tiny", "backbone": {"name": "efficientnet-lite0", "image_size": 64, "stages": [4, 10]}}
EPOCHS = 3


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("preset") / "tiny.json"
    path.write_text(json.dumps({**TINY, "memory": {"augment": False}}))
    return path


def config(out: Path, preset: Path, **changes: Any) -> trainer.DecoderTrainConfig:
    base = trainer.DecoderTrainConfig(
        out=out, preset=str(preset), train_samples=32, val_samples=16, epochs=EPOCHS, batch_size=8
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def straight(preset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted tiny run that computed its own features."""
    out = tmp_path_factory.mktemp("straight") / "run"
    trainer.train_decoder(config(out, preset))
    return out


def assert_same_run(a: Path, b: Path) -> None:
    """torch.equal on every written weight, every checkpointed tensor, and equal histories."""
    weights_a, weights_b = load_module(a / "decoder")[0], load_module(b / "decoder")[0]
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    state_a, state_b = load_state(a / trainer.CHECKPOINT), load_state(b / trainer.CHECKPOINT)
    for part in ("decoder", "best"):
        assert all(torch.equal(state_a[part][k], state_b[part][k]) for k in state_a[part])
    moments_a, moments_b = state_a["optimizer"]["state"], state_b["optimizer"]["state"]
    assert moments_a.keys() == moments_b.keys()
    assert all(torch.equal(moments_a[i][k], moments_b[i][k]) for i in moments_a for k in moments_a[i])
    history_a, history_b = state_a["history"], state_b["history"]
    for key in ("epochs", "train_loss", "val_pixel_auroc", "val_image_auroc", "best_epoch"):
        assert history_a[key] == history_b[key], key


def test_a_killed_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(
    straight: Path, preset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save, saves = trainer.save_checkpoint, []

    def save_then_die(*args: Any) -> None:
        real_save(*args)
        saves.append(args[1])
        if len(saves) == 2:  # killed right after the checkpoint of epoch 1
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    cfg = config(tmp_path / "run", preset)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_decoder(cfg)
    assert load_state(cfg.out / trainer.CHECKPOINT)["epoch"] == 1 and not (cfg.out / "decoder.json").exists()
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    trainer.train_decoder(dataclasses.replace(cfg, resume=True))
    assert load_state(cfg.out / trainer.CHECKPOINT)["history"]["epochs"] == list(range(EPOCHS))
    assert_same_run(straight, cfg.out)


def test_a_run_that_finds_its_features_cached_is_bit_identical(
    straight: Path, preset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(straight / trainer.FEATURES, out / trainer.FEATURES)
    monkeypatch.setattr(trainer, "encode_split", lambda *args: pytest.fail("the cached features were not used"))
    trainer.train_decoder(config(out, preset))
    assert_same_run(straight, out)


def test_planted_pickles_never_run(
    straight: Path, preset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "pickle-ran"
    common = ["decoder", "--preset", str(preset), "--train-samples", "32", "--val-samples", "16", "--epochs", "1"]
    # A fresh run (no --resume) finding a features cache of each format: recomputed, never unpickled.
    fresh = tmp_path / "fresh"
    plant(fresh / "features.pt", marker)
    plant(fresh / "features.safetensors", marker)
    with caplog.at_level(logging.WARNING):
        assert train_main([*common, "--out", str(fresh)]) == 0
    notes = [record.getMessage() for record in caplog.records]
    assert any("features.pt: old pickle format, not loaded" in note for note in notes)
    assert any("features.safetensors: not a readable state file" in note for note in notes)
    assert load_state(fresh / "features.safetensors")["fingerprint"]["train_samples"] == 32  # rebuilt
    # An old pickle checkpoint: a run without --resume refuses the folder; with --resume it starts at epoch 0.
    old = tmp_path / "old"
    plant(old / "checkpoint.pt", marker)
    shutil.copy(straight / trainer.FEATURES, old / trainer.FEATURES)
    assert train_main([*common, "--out", str(old)]) == 2
    assert "holds a training run (checkpoint.pt)" in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert train_main([*common, "--out", str(old), "--resume"]) == 0
    assert any("checkpoint.pt: old pickle format" in record.getMessage() for record in caplog.records)
    assert load_state(old / trainer.CHECKPOINT)["history"]["epochs"] == [0]
    # A pickle under the new checkpoint name: --resume refuses it on one line.
    planted = tmp_path / "planted"
    plant(planted / "checkpoint.safetensors", marker)
    shutil.copy(straight / trainer.FEATURES, planted / trainer.FEATURES)
    capsys.readouterr()
    assert train_main([*common, "--out", str(planted), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.safetensors: not a readable state file" in err and err.count("\n") == 1
    assert not marker.exists()


def test_a_restart_removes_the_temp_files_a_killed_run_left(straight: Path, preset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    orphans = [
        ".features.pt.0123456789ab.tmp",  # the examples, as older versions named them
        ".checkpoint.pt.0123456789ab.tmp",
        "..decoder.safetensors.0123456789ab.pair.ba9876543210.tmp",
        ".decoder.json.0123456789ab.pair",
        ".checkpoint.safetensors.0123456789ab.tmp",
        ".features.safetensors.0123456789ab.tmp",
    ]
    others = [".notes.txt.0123456789ab.tmp", "mine.tmp"]  # not this run's: kept
    for name in orphans + others:
        (out / name).write_bytes(b"x" * 10)
    trainer.train_decoder(config(out, preset, epochs=EPOCHS + 1, resume=True))
    left = {p.name for p in out.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")}
    assert left == set(others)
