"""Stage 2 training on a tiny simulated dataset, a tiny random Llama and the real 64 px backbone."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import texture_crops
from pickle_probe import plant
from PIL import Image
from tiny_llm import save_chat_llm

import train.assistant as trainer
from anomalygpt.assistant import IGNORE_INDEX, ChatSession, build_assistant
from anomalygpt.config import load_preset
from anomalygpt.io import load_image
from anomalygpt.state import load_state
from anomalygpt.verdict import confidence_word
from simulation.writer import write_dataset
from train.assistant import (
    AssistantTrainConfig,
    Batch,
    batch_indices,
    collate,
    lr_factor,
    read_conversations,
    record_inspection,
    soft_mask_map,
    training_map,
)
from train.cli import main as train_main
from train.losses import answer_loss, answer_positions

N_SAMPLES = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    normals = tmp_path_factory.mktemp("normals")
    for index, crop in enumerate(texture_crops(5, size=96, seed=3)):
        Image.fromarray(crop).save(normals / f"n{index}.png")
    out = tmp_path_factory.mktemp("sim") / "data"
    write_dataset(sorted(normals.glob("*.png")), out, N_SAMPLES, seed=2, category=None, size=64, progress=False)
    return out


@pytest.fixture(scope="module")
def preset_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    llm = save_chat_llm(tmp_path_factory.mktemp("chat-llm"))
    path = tmp_path_factory.mktemp("preset") / "tiny.json"
    preset = {"backbone": {"image_size": 64}, "llm": {"model": str(llm)}, "assistant": {"max_new_tokens": 8}}
    path.write_text(json.dumps(preset))
    return path


def config(data: Path, out: Path, preset_path: Path, **changes: object) -> AssistantTrainConfig:
    base = AssistantTrainConfig(data=data, out=out, preset=str(preset_path), steps=5, batch_size=2, warmup_steps=2)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_soft_mask_is_above_the_threshold_exactly_on_the_mask() -> None:
    mask = np.zeros((64, 64), bool)
    mask[10:30, 12:40] = True  # a patch
    mask[50, 5:60] = True  # a 1 px scratch: a Gaussian blur would leave it below 1
    mask[58, 58] = True  # a single-pixel speck
    soft = soft_mask_map(mask, softness_px=0.64)
    assert soft.dtype == np.float32 and soft.shape == (64, 64)
    assert np.array_equal(soft > 1.0, mask)
    assert soft.max() <= 2.0 and soft.min() >= 0.0
    assert soft[20, 25] > 1.9 and soft[0, 63] < 0.01  # deep inside ~2, far outside ~0
    assert np.array_equal(soft_mask_map(np.zeros((8, 8), bool), 1.0), np.zeros((8, 8), np.float32))


def test_training_map_of_a_good_image_is_smooth_noise_around_0(data: Path, preset_path: Path, tmp_path: Path) -> None:
    cfg = config(data, tmp_path, preset_path, map_noise=0.1)
    values = training_map(np.zeros((64, 64), bool), cfg, np.random.default_rng(0))
    assert abs(float(values.mean())) < 0.1 and float(values.std()) == pytest.approx(0.1, rel=1e-4)
    assert float(np.abs(np.diff(values, axis=0)).mean()) < 0.02  # smooth: neighbours nearly equal


def test_facts_state_what_the_conversation_states(data: Path) -> None:
    records = read_conversations(data)
    assert len(records) == N_SAMPLES and any(r["regions"] for r in records) and any(not r["regions"] for r in records)
    for record in records:
        rng = np.random.default_rng(int(record["id"]))
        inspection = record_inspection(record, (64, 64), z=3.0, rng=rng)
        assert inspection.is_anomalous == bool(record["regions"]) == record["turns"][0]["truth"]["anomalous"]
        assert confidence_word(inspection.margin) == record["confidence"] == inspection.confidence
        assert (
            inspection.score > inspection.threshold
            if inspection.is_anomalous
            else inspection.score <= inspection.threshold
        )
        facts = inspection.facts()
        assert ("ANOMALOUS" in facts) == inspection.is_anomalous
        assert all(location in facts for location in record["turns"][0]["truth"]["locations"])


def test_read_conversations_refuses_other_folders(tmp_path: Path, data: Path) -> None:
    with pytest.raises(ValueError, match="no manifest.json; give a folder written by anomalygpt simulate"):
        read_conversations(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "anomalygpt-simulated-conversations/1"}))
    with pytest.raises(ValueError, match="did not finish"):
        read_conversations(tmp_path)
    assert len(read_conversations(data, max_samples=3)) == 3


def test_batches_are_seeded_epochs_and_split_across_processes() -> None:
    epoch = [i for step in range(5) for i in batch_indices(10, 2, seed=4, step=step)]
    assert sorted(epoch) == list(range(10)) and epoch != list(range(10))
    assert batch_indices(10, 2, seed=4, step=7) == batch_indices(10, 2, seed=4, step=7)
    assert batch_indices(10, 2, seed=5, step=0) != batch_indices(10, 2, seed=4, step=0)
    # two processes: each takes its own half of the global batch of 4
    shared = batch_indices(10, 2, 4, step=1, rank=0, world=2) + batch_indices(10, 2, 4, step=1, rank=1, world=2)
    assert shared == batch_indices(10, 4, 4, step=1)


def test_answer_loss_by_hand() -> None:
    logits = torch.zeros(1, 3, 4)  # (B, L, V)
    logits[0, 0] = torch.tensor([0.0, math.log(3.0), 0.0, 0.0])  # predicts token 1 with p = 3/6
    logits[0, 1] = torch.tensor([5.0, 0.0, 0.0, 0.0])  # predicts the next token, which is not labelled
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX]])
    assert answer_loss(logits, labels).item() == pytest.approx(-math.log(0.5), rel=1e-6)
    positions = answer_positions(labels)
    assert positions.tolist() == [0]  # only position 0 predicts a labelled token
    assert answer_loss(logits[:, positions], labels, positions).item() == pytest.approx(-math.log(0.5), rel=1e-6)


def test_lr_warms_up_then_decays_to_a_tenth() -> None:
    assert lr_factor(0, warmup=4, total=100) == pytest.approx(0.25, rel=1e-3)
    assert lr_factor(3, warmup=4, total=100) == pytest.approx(1.0, rel=1e-2)
    assert lr_factor(100, warmup=4, total=100) == pytest.approx(0.1)


def test_three_steps_write_a_checkpoint_and_a_resume_continues(
    data: Path, preset_path: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    common = ["assistant", "--data", str(data), "--out", str(out), "--preset", str(preset_path), "--batch-size", "2"]
    assert train_main([*common, "--steps", "3", "--checkpoint-every", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["examples"] == N_SAMPLES
    assert load_state(out / trainer.CHECKPOINT)["step"] == 3
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "assistant").iterdir()) == ["lora", "visual.json", "visual.safetensors"]
    assert train_main([*common, "--steps", "5"]) == 2  # an existing run needs --resume
    assert "pass --resume" in capsys.readouterr().err
    assert train_main([*common, "--steps", "5", "--resume"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert history["steps"] == [1, 2, 3, 4, 5] and all(np.isfinite(history["loss"]))
    # the trained parts load into a working chat
    preset = load_preset(str(preset_path))
    preset = dataclasses.replace(
        preset, assistant=dataclasses.replace(preset.assistant, weights=str(out / "assistant"))
    )
    session = ChatSession(build_assistant(preset))
    record = read_conversations(data)[0]
    session.set_references(texture_crops(3, size=64, seed=8))
    session.show(load_image(data / record["image"]))
    assert session.ask("Is there an anomaly in this image?").startswith(
        "Yes" if session.inspection.is_anomalous else "No"
    )


@pytest.fixture(scope="module")
def straight(data: Path, preset_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 5-step run that computed its own training set."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert trainer.train_assistant(config(data, out, preset_path, checkpoint_every=1))["steps"] == 5
    return out


def assert_same_run(a: Path, b: Path) -> None:
    """torch.equal on every trained weight and optimizer moment; equal losses and learning rates."""
    state_a, state_b = load_state(a / trainer.CHECKPOINT), load_state(b / trainer.CHECKPOINT)
    assert state_a["step"] == state_b["step"] and state_a["trained"].keys() == state_b["trained"].keys()
    assert all(torch.equal(state_a["trained"][k], state_b["trained"][k]) for k in state_a["trained"])
    moments_a, moments_b = state_a["optimizer"]["state"], state_b["optimizer"]["state"]
    assert moments_a.keys() == moments_b.keys()
    assert all(torch.equal(moments_a[i][k], moments_b[i][k]) for i in moments_a for k in moments_a[i])
    assert state_a["history"]["loss"] == state_b["history"]["loss"]
    assert state_a["history"]["lr"] == state_b["history"]["lr"]


def test_an_interrupted_run_resumes_bit_identically(
    straight: Path, data: Path, preset_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[int] = []
    real_build, real_step = trainer.build_training_set, trainer.train_step

    def counted_build(*args: object) -> trainer.TrainingSet:
        builds.append(1)
        return real_build(*args)  # type: ignore[arg-type]

    def crash_after_three(
        accelerator: object, model: object, optimizer: object, scheduler: object, batch: Batch
    ) -> float:
        if scheduler.last_epoch >= 3:  # type: ignore[attr-defined]
            raise KeyboardInterrupt
        return real_step(accelerator, model, optimizer, scheduler, batch)

    monkeypatch.setattr(trainer, "build_training_set", counted_build)
    monkeypatch.setattr(trainer, "train_step", crash_after_three)
    interrupted = config(data, tmp_path / "resumed", preset_path, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_assistant(interrupted)
    assert load_state(interrupted.out / trainer.CHECKPOINT)["step"] == 3
    monkeypatch.setattr(trainer, "train_step", real_step)
    resumed = trainer.train_assistant(dataclasses.replace(interrupted, resume=True))
    assert builds == [1]  # the resumed run reads the cached features
    assert resumed["steps"] == 5
    assert_same_run(straight, interrupted.out)


def test_a_run_that_finds_its_training_set_cached_is_bit_identical(
    straight: Path, data: Path, preset_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(straight / trainer.FEATURES, out / trainer.FEATURES)
    monkeypatch.setattr(trainer, "build_training_set", lambda *args: pytest.fail("the cached set was not used"))
    torch.manual_seed(12345)  # whatever the process drew before, the run starts from its seed
    trainer.train_assistant(config(data, out, preset_path, checkpoint_every=1))
    assert_same_run(straight, out)


def test_planted_pickles_never_run_and_a_restart_cleans_its_temp_files(
    straight: Path, data: Path, preset_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys
) -> None:
    marker = tmp_path / "pickle-ran"
    common = ["assistant", "--data", str(data), "--preset", str(preset_path), "--batch-size", "2", "--steps", "2"]
    fresh = tmp_path / "fresh"  # a new run finding caches of both formats: computed again, never unpickled
    plant(fresh / "features.pt", marker)
    plant(fresh / "features.safetensors", marker)
    with caplog.at_level(logging.WARNING):
        assert train_main([*common, "--out", str(fresh)]) == 0
    notes = " | ".join(record.getMessage() for record in caplog.records)
    assert "features.pt: old pickle format, not loaded" in notes and "not a readable state file" in notes
    old = tmp_path / "old"  # an old pickle checkpoint: refused without --resume, ignored with it
    plant(old / "checkpoint.pt", marker)
    shutil.copy(straight / trainer.FEATURES, old / trainer.FEATURES)
    orphans = [
        ".checkpoint.pt.0123456789ab.tmp",
        ".features.safetensors.0123456789ab.tmp",
        ".loss.png.0123456789ab.tmp",
    ]
    for name in orphans:
        (old / name).write_bytes(b"x")
    (old / ".assistant.0123456789ab.tmp" / "lora").mkdir(parents=True)  # save_assistant's temp folder
    (old / ".mine.0123456789ab.tmp").write_bytes(b"kept")
    assert train_main([*common, "--out", str(old)]) == 2
    assert "holds a training run (checkpoint.pt)" in capsys.readouterr().err
    assert train_main([*common, "--out", str(old), "--resume"]) == 0
    assert load_state(old / trainer.CHECKPOINT)["history"]["steps"] == [1, 2]
    assert sorted(p.name for p in old.iterdir() if p.name.startswith(".")) == [".mine.0123456789ab.tmp"]
    planted = tmp_path / "planted"  # a pickle under the new checkpoint name: --resume refuses it on one line
    plant(planted / "checkpoint.safetensors", marker)
    capsys.readouterr()
    assert train_main([*common, "--out", str(planted), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.safetensors: not a readable state file" in err and err.count("\n") == 1
    assert not marker.exists()


def test_loss_on_a_fixed_batch_falls(data: Path, preset_path: Path, tmp_path: Path) -> None:
    from accelerate import Accelerator

    cfg = config(data, tmp_path, preset_path, lr=1e-2, visual_lr=1e-2, warmup_steps=1, steps=20)
    assistant = build_assistant(load_preset(str(preset_path)))
    training = trainer.build_training_set(data, read_conversations(data), assistant, cfg)
    assert training.embeddings.shape == (N_SAMPLES, assistant.projection.linear.in_features)
    assert training.maps.shape == (N_SAMPLES, 1, 96, 96)
    shortest = sorted(range(N_SAMPLES), key=lambda i: len(training.examples[i].input_ids))[:2]
    batch = collate(training, shortest, pad_id=int(assistant.tokenizer.eos_token_id))
    assert batch.labels.shape == batch.input_ids.shape and bool((batch.labels != IGNORE_INDEX).any())
    lengths = [len(training.examples[i].input_ids) for i in shortest]
    assert batch.attention_mask.sum(1).tolist() == lengths and bool(
        (batch.labels[1, lengths[1] :] == IGNORE_INDEX).all()
    )
    inputs = (batch.input_ids, batch.attention_mask, batch.embedding, batch.maps)
    positions = answer_positions(batch.labels)
    with torch.no_grad():  # logits at the answer positions only give the same loss as all logits
        full = answer_loss(assistant(*inputs).logits, batch.labels)
        kept = assistant(*inputs, positions=positions).logits
    assert kept.shape[1] == positions.numel() < batch.input_ids.shape[1]
    assert answer_loss(kept, batch.labels, positions).item() == pytest.approx(full.item(), rel=1e-5)
    optimizer = trainer.make_optimizer(assistant, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(assistant, optimizer)
    torch.manual_seed(0)
    losses = [trainer.train_step(accelerator, model, optimizer, scheduler, batch) for _ in range(20)]
    assert losses[-1] < 0.75 * losses[0] and max(losses[-5:]) < min(losses[:5]), losses
    trained = trainer.trainable_parameters(assistant)
    assert any(name.startswith("prompt_learner.") for name in trained) and any("lora_" in n for n in trained)
    assert all(n.startswith(("prompt_learner.", "projection.")) or "lora_" in n for n in trained)


def test_cli_rejects_bad_options_on_one_line(tmp_path: Path, capsys) -> None:
    assert train_main(["assistant", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data" in err and "no such folder" in err
    assert train_main(["assistant", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "0"]) == 2
    assert "--steps: must be positive" in capsys.readouterr().err
