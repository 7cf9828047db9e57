import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import texture_crops, with_dark_blob
from PIL import Image
from test_backbones import TINY_CLIP

from anomalygpt import cli, memory, references
from anomalygpt.config import Preset, load_preset
from anomalygpt.export import ExportError, ExportOptions, export_profile
from anomalygpt.inspection import build_inspector
from anomalygpt.runtime import RuntimeBundleError, RuntimeInspectionError, RuntimeInspector, scoring
from anomalygpt.runtime.bundle import MANIFEST, MEMORY
from anomalygpt.verdict import SAME_PICTURE_HEAD, fit_of_distances

SCORE_TOLERANCE = 1e-4  # the promise: exported scores within this of the torch path's
SIDE = 176  # px of the test images: downscaled to the test preset's 160 px input (as ELPV's 300 px to 320 px)
ROOT = Path(__file__).resolve().parent.parent


def queries() -> list[np.ndarray]:
    """A good crop, two with dark blobs, and a much brighter one (the reference-fit warning's path)."""
    good = texture_crops(1, SIDE, seed=60)[0]
    return [
        good,
        with_dark_blob(texture_crops(1, SIDE, seed=61)[0], center=(40, 120), radius=10),
        with_dark_blob(texture_crops(1, SIDE, seed=62)[0], center=(130, 50), radius=11),
        np.clip(good.astype(np.int32) + 90, 0, 255).astype(np.uint8),
    ]


def small_preset() -> Preset:
    """The default preset with a 160 px backbone input: the same graph, a quarter of the default's work."""
    preset = load_preset("default")
    return dataclasses.replace(preset, backbone=dataclasses.replace(preset.backbone, image_size=160))


def fitted(preset: Preset, folder: Path, n: int = 4, augment: bool = False):
    """A profile of n brick crops; augmentation set, not decided (the decision costs seconds and is not exported)."""
    folder.mkdir(exist_ok=True)
    preset = dataclasses.replace(preset, memory=dataclasses.replace(preset.memory, augment=augment))
    inspector = build_inspector(preset)
    refs = inspector.fit(texture_crops(n, SIDE, seed=21), class_name="brick wall")
    return inspector, refs, inspector.save_profile(refs, folder / "brick.profile")


@pytest.fixture(scope="module")
def fitted_profile(tmp_path_factory):
    return fitted(small_preset(), tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def runtimes(fitted_profile):
    _, _, profile = fitted_profile
    return {
        engine: export_profile(ExportOptions(profile, engine, profile.parent / engine, overwrite=False)).out
        for engine in ("onnx", "openvino")
    }


def assert_same_inspection(torch_result, runtime_result) -> None:
    expected, found = torch_result.to_dict(), runtime_result.to_dict()
    assert set(found) == set(expected)
    assert abs(found["score"] - expected["score"]) < SCORE_TOLERANCE
    assert found["threshold"] == expected["threshold"] and found["verdict"] == expected["verdict"]
    assert abs(found["margin"] - expected["margin"]) < SCORE_TOLERANCE / expected["calibration"]["normal_spread"]
    assert np.abs(runtime_result.anomaly_map - torch_result.anomaly_map).max() < SCORE_TOLERANCE
    assert [r["box"] for r in found["regions"]] == [r["box"] for r in expected["regions"]]
    assert abs(found["reference_fit"]["distance"] - expected["reference_fit"]["distance"]) <= 2e-5
    same = ("confidence", "mode", "n_references", "image_size", "calibration", "class_name", "warnings", "notes")
    same += ("p_value", "source_sha256")
    assert {key: found[key] for key in same} == {key: expected[key] for key in same}
    assert found["reference_fit"]["nearest"] == expected["reference_fit"]["nearest"]


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_exported_runtime_scores_as_the_torch_path(fitted_profile, runtimes, engine, tmp_path):
    inspector, refs, _ = fitted_profile
    runtime = RuntimeInspector.open(runtimes[engine])
    verdicts = []
    batched = list(runtime.inspect_many(queries(), batch_size=3))  # batches of 3 and 1
    for query, in_batch in zip(queries(), batched, strict=True):
        expected = inspector.inspect(query, refs)
        assert_same_inspection(expected, runtime.inspect(query))
        assert_same_inspection(expected, in_batch)
        verdicts.append(expected.verdict)
    lowered = inspector.inspect(queries()[0], refs, sensitivity=4.0)
    assert_same_inspection(lowered, runtime.inspect(queries()[0], sensitivity=4.0))
    assert verdicts[:3] == ["normal", "anomalous", "anomalous"]  # the parity covers both verdicts and regions
    assert runtime.inspect(queries()[3]).warnings[0].startswith("the image does not look like the good references")
    reference = texture_crops(4, SIDE, seed=21)[2]  # one of the profile's own pictures: both say so first
    assert_same_inspection(inspector.inspect(reference, refs), runtime.inspect(reference))
    assert runtime.inspect(reference).warnings[0].startswith(SAME_PICTURE_HEAD)
    if engine == "onnx":  # a file: both name the bytes inspected
        path = tmp_path / "query.png"
        Image.fromarray(queries()[1]).save(path)
        assert_same_inspection(inspector.inspect(path, refs), runtime.inspect(path))
        assert runtime.inspect(path).source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_pool_profile_retrieves_the_same_nearest_references(tmp_path):
    preset = small_preset()
    preset = dataclasses.replace(preset, memory=dataclasses.replace(preset.memory, retrieve=2))
    inspector, refs, profile = fitted(preset, tmp_path, n=5)
    out = export_profile(ExportOptions(profile, "onnx", tmp_path / "pool", overwrite=False)).out
    runtime = RuntimeInspector.open(out)
    for query in queries()[:3]:
        expected, found = inspector.inspect(query, refs), runtime.inspect(query)
        assert found.mode == "pool" and expected.mode == "pool"
        assert_same_inspection(expected, found)


@pytest.mark.slow
def test_a_fused_decoder_prior_is_part_of_the_exported_graph(tmp_path):
    preset = load_preset("default")  # the shipped decoder was trained for its 320 px input
    preset = dataclasses.replace(preset, decoder=dataclasses.replace(preset.decoder, fusion_weight=0.5))
    inspector, refs, profile = fitted(preset, tmp_path, n=2)
    out = export_profile(ExportOptions(profile, "onnx", tmp_path / "prior", overwrite=False)).out
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["outputs"]["prior"] == ["prior0", "prior1"]
    runtime = RuntimeInspector.open(out)
    for query in queries()[:2]:
        assert_same_inspection(inspector.inspect(query, refs), runtime.inspect(query))


def test_a_clip_backbone_exports_with_the_same_scores(tmp_path):
    (tmp_path / "tiny-export-vit.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(1)
    torch.save(open_clip.create_model("tiny-export-vit", pretrained=None).state_dict(), tmp_path / "tiny.pt")
    preset = load_preset("default")
    clip = dataclasses.replace(preset.backbone, name="clip", clip_model="tiny-export-vit", stages=())
    preset = dataclasses.replace(preset, backbone=dataclasses.replace(clip, pretrained=str(tmp_path / "tiny.pt")))
    inspector, refs, profile = fitted(preset, tmp_path, n=3)
    runtime = RuntimeInspector.open(export_profile(ExportOptions(profile, "onnx", tmp_path / "clip", False)).out)
    for query in queries()[:2]:
        assert_same_inspection(inspector.inspect(query, refs), runtime.inspect(query))
    random = dataclasses.replace(preset, backbone=dataclasses.replace(clip, pretrained="random"))
    _, _, unexportable = fitted(random, tmp_path / "random", n=2)
    with pytest.raises(ExportError, match="randomly initialised CLIP backbone"):
        export_profile(ExportOptions(unexportable, "onnx", tmp_path / "no", False))
    assert not (tmp_path / "no").exists()


def test_the_runtime_cli_prints_detects_records_without_importing_torch(fitted_profile, runtimes, tmp_path):
    inspector, refs, _ = fitted_profile
    paths = []
    for i, query in enumerate(queries()[:2]):
        paths.append(tmp_path / f"q{i}.png")
        Image.fromarray(query).save(paths[-1])
    code = (  # the CLI on the OpenVINO folder, the API on the ONNX one: neither engine's path imports torch
        "import sys; from anomalygpt.runtime.__main__ import main; code = main(sys.argv[2:]); "
        "from anomalygpt.runtime import RuntimeInspector; RuntimeInspector.open(sys.argv[1]).inspect(sys.argv[3]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(runtimes["onnx"]), str(runtimes["openvino"]), *map(str, paths)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    for path, record in zip(paths, records, strict=True):
        expected = inspector.inspect(path, refs, source=str(path)).to_dict()
        assert record["source"] == str(path) and record["verdict"] == expected["verdict"]
        assert abs(record["score"] - expected["score"]) < SCORE_TOLERANCE


def test_the_runtime_cli_refuses_an_out_of_range_sensitivity(runtimes, tmp_path, capsys):
    from anomalygpt.runtime.__main__ import main as runtime_main

    query = tmp_path / "q.png"
    Image.fromarray(queries()[0]).save(query)
    assert runtime_main([str(runtimes["onnx"]), str(query), "--sensitivity", "6"]) == 2
    err = capsys.readouterr().err
    assert err == "python -m anomalygpt.runtime: error: --sensitivity: must be a number from -5 to 5, got 6\n"


def run_export(*argv: str) -> tuple[int, str]:
    """cli.main(["export", ...]) -> (exit code, stderr's one line)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["export", *argv])
    return code, err.getvalue()


def test_export_refuses_bad_input_in_one_line_and_writes_nothing(fitted_profile, runtimes, tmp_path):
    _, _, profile = fitted_profile
    flipped = bytearray(profile.read_bytes())
    flipped[-100] ^= 0xFF
    (tmp_path / "flipped.profile").write_bytes(bytes(flipped))
    (tmp_path / "foreign.profile").write_bytes(b"not a profile at all")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    cases = [
        (["--profile", str(tmp_path / "flipped.profile"), "--format", "onnx"], "corrupted profile"),
        (["--profile", str(tmp_path / "foreign.profile"), "--format", "onnx"], "not a readable profile"),
        (["--profile", str(tmp_path / "missing.profile"), "--format", "onnx"], "--profile file not found"),
        (["--profile", str(profile), "--format", "tflite"], "unknown format 'tflite'; known: onnx, openvino"),
    ]
    before = sorted(tmp_path.iterdir())
    for argv, message in cases:
        code, err = run_export(*argv, "--out", str(tmp_path / "new"))
        assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("anomalygpt export: error:")
    code, err = run_export("--profile", str(profile), "--format", "onnx", "--out", str(tmp_path / "taken"))
    assert code == 2 and "already exists; pass --overwrite" in err
    code, err = run_export(
        "--profile", str(profile), "--format", "onnx", "--out", str(tmp_path / "taken"), "--overwrite"
    )
    assert code == 2 and "not an anomalygpt runtime folder" in err
    assert sorted(tmp_path.iterdir()) == before and (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_a_runtime_folder_with_the_other_format(fitted_profile, runtimes, tmp_path):
    _, _, profile = fitted_profile
    out = Path(shutil.copytree(runtimes["onnx"], tmp_path / "rt"))
    code, _ = run_export("--profile", str(profile), "--format", "openvino", "--out", str(out), "--overwrite")
    assert code == 0 and sorted(p.name for p in out.iterdir()) == [
        "backbone.bin",
        "backbone.xml",
        MEMORY,
        MANIFEST,
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["rt"]  # no temporary or replaced folder left behind
    assert json.loads((out / MANIFEST).read_text())["engine"] == "openvino"


def test_incomplete_tampered_or_newer_runtime_folders_are_refused(runtimes, tmp_path):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(runtimes["onnx"], tmp_path / name))

    (copy("incomplete") / "backbone.onnx").unlink()
    with pytest.raises(RuntimeBundleError, match="backbone.onnx: missing"):
        RuntimeInspector.open(tmp_path / "incomplete")
    with (copy("tampered") / MEMORY).open("r+b") as handle:
        handle.seek(-8, 2)
        handle.write(b"\x00" * 8)
    with pytest.raises(RuntimeBundleError, match="does not match its sha256"):
        RuntimeInspector.open(tmp_path / "tampered")
    manifest = json.loads((copy("newer") / MANIFEST).read_text())
    (tmp_path / "newer" / MANIFEST).write_text(json.dumps({**manifest, "version": 7}))
    with pytest.raises(RuntimeBundleError, match="version 7 is newer than this anomalygpt reads"):
        RuntimeInspector.open(tmp_path / "newer")
    del manifest["calibration"]
    (copy("lacking") / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RuntimeBundleError, match="runtime.json: lacks calibration; export again"):
        RuntimeInspector.open(tmp_path / "lacking")
    calibration = json.loads((tmp_path / "newer" / MANIFEST).read_text())["calibration"]
    (copy("edited") / MANIFEST).write_text(
        json.dumps({**manifest, "calibration": calibration | {"reference_scores": ["x"]}})
    )
    with pytest.raises(RuntimeBundleError, match="lacks valid memory, calibration, fit_stats and outputs sections"):
        RuntimeInspector.open(tmp_path / "edited")
    with pytest.raises(RuntimeBundleError, match="runtime folder not found"):
        RuntimeInspector.open(tmp_path / "nowhere")
    with pytest.raises(RuntimeInspectionError, match="64x64 px but the references are 176x176 px"):
        RuntimeInspector.open(runtimes["onnx"]).inspect(texture_crops(1, size=64)[0])


def test_the_numpy_mirrors_compute_what_their_torch_originals_do():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(2, 16, 7, 9)).astype(np.float32)
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(feats), 4).numpy()
    assert np.allclose(scoring.adaptive_average(feats, 4), pooled, atol=1e-6)
    expected_descriptor = memory.global_descriptor(torch.from_numpy(feats), 4).numpy()
    assert np.allclose(scoring.global_descriptor(feats, 4), expected_descriptor, atol=1e-6)
    assert np.allclose(scoring.appearance(feats), memory.appearance(torch.from_numpy(feats)).numpy(), atol=1e-6)
    queries_, bank = (
        scoring.normalized(feats[0].reshape(16, -1).T, 1),
        scoring.normalized(feats[1].reshape(16, -1).T, 1),
    )
    expected_distance = memory.nearest_distance(torch.from_numpy(queries_), torch.from_numpy(bank), 100).numpy()
    assert np.allclose(scoring.nearest_distance(queries_, bank, 100), expected_distance, atol=1e-6)
    names = ["a", "b", "c", "d"]
    appearances = scoring.normalized(rng.normal(size=(4, 8)).astype(np.float32), 1)
    stats = references.fit_statistics(torch.from_numpy(appearances), [100.0, 110.0, 105.0, 95.0])
    for query, light in ((appearances[1] + 0.05, 103.0), (-appearances[0], 100.0), (appearances[2], 200.0)):
        query = scoring.normalized(query[None], 1)[0]
        mine = fit_of_distances(scoring.appearance_distance(query, appearances), light, stats, names)
        theirs = references.reference_fit(torch.from_numpy(query), light, torch.from_numpy(appearances), stats, names)
        assert mine == theirs
