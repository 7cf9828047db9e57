"""AnomalyDecoder arithmetic, stage-1 training (tiny), its weights in a preset, zero-shot and fused inspection."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import texture_crops, with_dark_blob
from PIL import Image

from anomalygpt.backbones import WeightsError
from anomalygpt.config import load_preset
from anomalygpt.decoder import AnomalyDecoder, DecoderSpec, anchor_cosines, projection
from anomalygpt.grounded import Grounds, answer_text
from anomalygpt.guard import read_question
from anomalygpt.inspection import InspectionError, build_inspector
from anomalygpt.state import load_state
from anomalygpt.verdict import ZERO_SHOT_TEXT_CAVEAT
from anomalygpt.weights import load_module
from train.cli import main as train_main

TINY = {"name": "tiny", "backbone": {"name": "efficientnet-lite0", "image_size": 64, "stages": [4, 10]}}


def test_decoder_logits_are_cosines_over_temperature():
    decoder = AnomalyDecoder(DecoderSpec(stage_dims=(2,), text_dim=2, temperature=0.5))
    with torch.no_grad():
        decoder.projections[0].weight.copy_(torch.eye(2))
        decoder.projections[0].bias.zero_()
    feats = [torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)]  # unit direction (0.6, 0.8)
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # normal, abnormal
    out = decoder(feats, anchors)
    assert out.logits[0].flatten().tolist() == pytest.approx([0.6 / 0.5, 0.8 / 0.5])
    expected = math.exp(1.6) / (math.exp(1.2) + math.exp(1.6))
    assert out.abnormal[0].item() == pytest.approx(expected, rel=1e-6)


def test_stacked_stages_read_the_coarser_features_upsampled_to_their_grid():
    decoder = AnomalyDecoder(DecoderSpec(stage_dims=(2, 3), text_dim=4, stack_coarser=True))
    assert [p.in_features for p in decoder.projections] == [5, 3]
    fine, coarse = torch.randn(1, 2, 4, 4), torch.randn(1, 3, 2, 2)
    inputs = decoder.stage_inputs([fine, coarse])
    assert inputs[0].shape == (1, 5, 4, 4) and torch.equal(inputs[0][:, :2], fine) and torch.equal(inputs[1], coarse)
    # bilinear, half-pixel centres: fine cell (1, 1) sits at coarse (0.25, 0.25), a quarter of the way to (1, 1)
    c = coarse[0]
    expected = 0.75**2 * c[:, 0, 0] + 0.75 * 0.25 * (c[:, 0, 1] + c[:, 1, 0]) + 0.25**2 * c[:, 1, 1]
    assert torch.allclose(inputs[0][0, 2:, 1, 1], expected, atol=1e-6)
    out = decoder([fine, coarse], torch.nn.functional.normalize(torch.randn(2, 4), dim=1))
    assert [a.shape for a in out.abnormal] == [(1, 4, 4), (1, 2, 2)]


def write_preset(path: Path, **decoder: object) -> Path:
    path.write_text(json.dumps({**TINY, "memory": {"augment": False}, "decoder": decoder}))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny decoder trained through the CLI with its defaults: 64 px, 32 simulated images, 4 epochs."""
    base = tmp_path_factory.mktemp("decoder")
    preset = write_preset(base / "preset.json")
    args = ["decoder", "--out", str(base / "run"), "--preset", str(preset), "--train-samples", "32"]
    assert train_main([*args, "--val-samples", "16", "--epochs", "2", "--batch-size", "8"]) == 0
    assert train_main([*args, "--val-samples", "16", "--epochs", "4", "--batch-size", "8", "--resume"]) == 0
    return base / "run"


def test_training_writes_weights_curves_and_resumes(trained):
    history = json.loads((trained / "history.json").read_text())
    assert history["epochs"] == [0, 1, 2, 3]  # two epochs, then two more after --resume
    assert history["train_loss"][-1] < history["train_loss"][0]
    config = json.loads((trained / "decoder.json").read_text())
    assert config["spec"]["stage_dims"] == [40, 112] and config["spec"]["text_dim"] == 384
    assert config["spec"]["stack_coarser"] and config["training"]["stack_coarser"]
    # the weights written are the epoch with the best validation pixel AUROC, not the last one
    best = int(np.argmax(history["val_pixel_auroc"]))
    assert history["best_epoch"] == config["validation"]["epoch"] == best
    assert config["validation"]["pixel_auroc"] == history["val_pixel_auroc"][best]
    kept = load_state(trained / "checkpoint.safetensors")["best"]
    written = load_module(trained / "decoder")[0]
    assert kept.keys() == written.keys() and all(torch.equal(kept[k], written[k]) for k in kept)
    assert config["backbone"] == TINY["backbone"] and config["text"]["name"] == "minilm"
    zero_shot = config["zero_shot"]
    assert 0 < zero_shot["normal_mean"] < 1 and zero_shot["normal_spread"] > 0 and zero_shot["n_normals"] >= 2
    assert (trained / "curves.png").stat().st_size > 5000
    assert not list(trained.glob("*.tmp")) and not list(trained.glob(".*.tmp"))


def test_training_refuses_a_used_folder_without_resume(trained, capsys):
    preset = trained.parent / "preset.json"
    before = (trained / "decoder.safetensors").read_bytes()
    code = train_main(["decoder", "--out", str(trained), "--preset", str(preset), "--train-samples", "32"])
    assert code == 2
    assert "holds a training run" in capsys.readouterr().err
    assert (trained / "decoder.safetensors").read_bytes() == before


@pytest.mark.parametrize("option", ["--epochs", "--train-samples", "--lr"])
def test_training_rejects_non_positive_options(tmp_path, capsys, option):
    assert train_main(["decoder", "--out", str(tmp_path / "run"), option, "0"]) == 2
    assert f"{option}: must be positive" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_zero_shot_inspection_uses_the_stored_threshold(trained, tmp_path):
    inspector = build_inspector(load_preset(str(write_preset(tmp_path / "p.json", weights=str(trained / "decoder")))))
    stats = json.loads((trained / "decoder.json").read_text())["zero_shot"]
    image = texture_crops(1, size=64)[0]
    result = inspector.inspect(image, class_name="brick wall")
    assert result.mode == "zero-shot-text" and result.n_references == 0
    assert result.threshold == pytest.approx(stats["normal_mean"] + 3.0 * stats["normal_spread"])
    assert "zero-shot" in result.calibration["method"] and "simulated validation" in result.calibration["method"]
    assert result.is_anomalous == (result.score > result.threshold)
    # the decoder alone is much weaker on real products: every front end shows that first
    assert result.warnings == [ZERO_SHOT_TEXT_CAVEAT] and result.facts().startswith(f"Warning: {ZERO_SHOT_TEXT_CAVEAT}")
    answer = answer_text(read_question("Are you sure?"), Grounds(result))
    assert answer.startswith(f"Warning: {ZERO_SHOT_TEXT_CAVEAT}.") and "The evidence is" not in answer


def test_fusion_adds_the_weighted_decoder_map(trained, tmp_path):
    refs, query = texture_crops(2, size=64, seed=1), with_dark_blob(texture_crops(1, size=64, seed=2)[0], (30, 30), 6)
    memory_only = build_inspector(load_preset(str(write_preset(tmp_path / "a.json"))))
    fused = build_inspector(
        load_preset(str(write_preset(tmp_path / "b.json", weights=str(trained / "decoder"), fusion_weight=0.5)))
    )
    plain = memory_only.inspect(query, refs).anomaly_map
    both = fused.inspect(query, refs).anomaly_map
    zero = fused.inspect(query).anomaly_map  # the decoder's own map, same smoothing
    assert np.allclose(both, plain + 0.5 * zero, atol=1e-4)


def test_decoder_of_another_backbone_size_is_refused(trained, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(
        json.dumps(
            {
                **TINY,
                "backbone": {**TINY["backbone"], "image_size": 96},
                "decoder": {"weights": str(trained / "decoder")},
            }
        )
    )
    with pytest.raises(WeightsError, match="decoder trained for another backbone"):
        build_inspector(load_preset(str(other))).zero_shot_prior()  # loaded on first use


def test_no_references_without_a_decoder_is_a_clear_error(tmp_path):
    inspector = build_inspector(load_preset(str(write_preset(tmp_path / "p.json"))))
    with pytest.raises(InspectionError, match="no trained decoder for zero-shot"):
        inspector.inspect(texture_crops(1, size=64)[0])


def test_eval_zero_shot_scores_with_the_decoder_alone(trained, tmp_path):
    from test_eval_runner import twin_tree

    from eval.cli import main as eval_main

    root = twin_tree(tmp_path / "data", ("tile",))
    preset = write_preset(tmp_path / "p.json", weights=str(trained / "decoder"))
    out = tmp_path / "out"
    assert (
        eval_main(
            ["--dataset", "mvtec", "--root", str(root), "--zero-shot", "--preset", str(preset), "--out", str(out)]
        )
        == 0
    )
    block = json.loads((out / "results.json").read_text())["categories"]["tile"]
    assert list(block) == ["k=0"]  # zero-shot: one setting, no references
    cached = json.loads((out / "cache" / "tile" / "k0_seed0.json").read_text())["result"]
    assert cached["references"] == [] and "zero-shot" in cached["calibration"]["method"]
    assert cached["labels"] == [0, 0, 1, 1]  # MVTec: test/good and test/hole; train/good is the unused pool
    inspector = build_inspector(load_preset(str(preset)))
    image = np.asarray(Image.open(cached["paths"][0]).convert("RGB"))
    # float16 patch cache vs the direct path: the same score to a few decimals
    assert cached["scores"][0] == pytest.approx(inspector.inspect(image).score, abs=2e-3)


@pytest.mark.parametrize("hidden", [0, 16])
def test_projection_cosines_equal_the_materialised_ones(hidden):
    torch.manual_seed(0)
    project = projection(40, 384, hidden)
    x = torch.randn(2, 5, 5, 40)
    anchors = torch.nn.functional.normalize(torch.randn(2, 384), dim=1)
    direct = torch.nn.functional.normalize(project(x), dim=-1) @ anchors.T
    assert torch.allclose(anchor_cosines(x, project, anchors), direct, atol=1e-6)
