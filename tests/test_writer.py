"""Tests for simulation.writer: a small real run, exact resume, refusals, manifest and the CLI entry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

import simulation.writer as writer
from anomalygpt.regions import find_regions
from simulation.writer import WriterError, run_simulate, write_dataset

N = 8
SIZE = 64
SEED = 1
NAMES = ("brick", "grass", "gravel", "camera", "coins")


@pytest.fixture(scope="module")
def normals_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five grey texture PNGs of 96x80 px (not square, so the square resize is exercised)."""
    folder = tmp_path_factory.mktemp("normals")
    for name in NAMES:
        Image.fromarray(getattr(skimage.data, name)()[:80, :96]).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def normals(normals_dir: Path) -> list[Path]:
    return sorted(normals_dir.glob("*.png"))


@pytest.fixture(scope="module")
def dataset(normals: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run of N samples at SIZE px, shared by the read-only tests."""
    out = tmp_path_factory.mktemp("data") / "sim"
    write_dataset(normals, out, N, SEED, None, size=SIZE, progress=False)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every sample file and the JSONL, by relative path."""
    paths = [*sorted((folder / "images").iterdir()), *sorted((folder / "masks").iterdir())]
    return {str(p.relative_to(folder)): p.read_bytes() for p in [*paths, folder / "conversations.jsonl"]}


def test_small_run_writes_consistent_samples(dataset: Path) -> None:
    records = [json.loads(line) for line in (dataset / "conversations.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"{i:06d}" for i in range(N)]
    for record in records:
        image = np.asarray(Image.open(dataset / record["image"]))
        mask = np.asarray(Image.open(dataset / record["mask"]))
        assert image.shape == (SIZE, SIZE, 3) and mask.shape == (SIZE, SIZE)
        assert set(np.unique(mask)) <= {0, 255}
        regions = [r.to_dict() for r in find_regions((mask > 0).astype(np.float32), 0.5, image)]
        assert regions == record["regions"]  # the saved PNGs reproduce the conversation's regions
        assert (record["family"] is None) == (not mask.any())


def test_manifest_counts_and_command(dataset: Path, normals_dir: Path) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    records = [json.loads(line) for line in (dataset / "conversations.jsonl").read_text().splitlines()]
    counts = manifest["counts"]
    assert manifest["complete"] is True and counts["samples"] == N
    assert sum(counts["families"].values()) == N
    assert counts["families"]["normal"] == sum(r["family"] is None for r in records)
    assert counts["anomalous"] == sum(np.asarray(Image.open(dataset / r["mask"])).any() for r in records)
    assert counts["regions"] == sum(len(r["regions"]) for r in records)
    assert counts["turns"] == sum(len(r["turns"]) for r in records) == sum(counts["intents"].values())
    assert manifest["parameters"] | {"normals": None, "normals_sha256": None} == {
        "normals": None,
        "normals_sha256": None,
        "n": N,
        "seed": SEED,
        "category": None,
        "anomaly_fraction": 0.5,
        "size": SIZE,
    }
    assert manifest["sim_params"]["category"] == "generic" and "numpy" in manifest["versions"]
    expected = f"anomalygpt simulate --normals {normals_dir.resolve()} --out {dataset.resolve()} --n {N}"
    assert manifest["command"] == f"{expected} --seed {SEED} --size {SIZE}"


def test_contact_sheet_has_one_cell_per_sample_up_to_twelve(dataset: Path) -> None:
    sheet = Image.open(dataset / "contact_sheet.png")
    cell_w = 2 * writer.THUMB + 3 * writer.PAD
    cell_h = writer.THUMB + 3 * writer.PAD + writer.TEXT_LINES * writer.LINE_HEIGHT
    assert sheet.size == (4 * cell_w, 2 * cell_h)  # 8 samples: 2 rows of 4


def test_resume_redoes_only_missing_samples_exactly(
    dataset: Path, normals: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sim"
    write_dataset(normals, out, N, SEED, None, size=SIZE, progress=False)
    before = snapshot(out)
    assert before == snapshot(dataset)  # same parameters, same bytes
    (out / "images" / "000003.png").unlink()
    lines = (out / "conversations.jsonl").read_text().splitlines(keepends=True)
    # Sample 5 loses its line; sample 6 ends the file cut short, as a crash mid-write leaves it.
    (out / "conversations.jsonl").write_text("".join(lines[:5] + lines[7:] + [lines[6][:40]]))
    drawn = []
    original = writer.draw_sample

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        drawn.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(writer, "draw_sample", counting)
    write_dataset(normals, out, N, SEED, None, size=SIZE, progress=False)
    assert drawn == [3, 5, 6]
    assert snapshot(out) == before


def test_refuses_a_foreign_folder(normals: list[Path], tmp_path: Path) -> None:
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(WriterError, match=re.escape("has no manifest.json")):
        write_dataset(normals, foreign, N, SEED, None, size=SIZE, progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]


def test_refuses_a_stray_file_in_its_own_folder(normals: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "sim"
    write_dataset(normals, out, 2, SEED, None, size=SIZE, progress=False)
    (out / "masks" / "notes.txt").write_text("mine")
    with pytest.raises(WriterError, match=r"notes\.txt: not written by anomalygpt simulate"):
        write_dataset(normals, out, 2, SEED, None, size=SIZE, progress=False)


@pytest.mark.parametrize(("change", "field"), [({"seed": 2}, "seed"), ({"size": 32}, "size"), ({"n": 9}, "n")])
def test_refuses_a_parameter_change(
    dataset: Path, normals: list[Path], change: dict[str, int], field: str, tmp_path: Path
) -> None:
    manifest = (dataset / "manifest.json").read_bytes()
    arguments = {"seed": SEED, "size": SIZE, "n": N} | change
    with pytest.raises(WriterError, match=rf"different {field}; re-run with the same parameters"):
        write_dataset(normals, dataset, arguments["n"], arguments["seed"], None, size=arguments["size"], progress=False)
    assert (dataset / "manifest.json").read_bytes() == manifest


def test_anomaly_fraction_zero_and_one(normals: list[Path], tmp_path: Path) -> None:
    none = json.loads(write_dataset(normals, tmp_path / "a", 4, 0, None, 0.0, SIZE, False).read_text())
    every = json.loads(write_dataset(normals, tmp_path / "b", 4, 0, None, 1.0, SIZE, False).read_text())
    assert none["counts"]["anomalous"] == 0 and every["counts"]["anomalous"] == 4
    assert none["command"] is None  # no CLI flag for anomaly_fraction


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n": 0}, "n: need at least 1 sample, got 0"),
        ({"seed": -1}, "seed: must be >= 0, got -1"),
        ({"anomaly_fraction": 1.5}, "anomaly_fraction: must be in [0, 1], got 1.5"),
        ({"size": 8}, "size: must be at least 16 px, got 8"),
    ],
)
def test_bad_arguments(normals: list[Path], tmp_path: Path, arguments: dict[str, float], message: str) -> None:
    settings = {"n": 2, "seed": 0, "anomaly_fraction": 0.5, "size": SIZE} | arguments
    with pytest.raises(WriterError, match=re.escape(message)):
        write_dataset(normals, tmp_path / "out", category=None, progress=False, **settings)  # type: ignore[arg-type]


def test_run_simulate_exit_codes_and_one_line_errors(
    normals_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_simulate(str(tmp_path / "absent"), str(tmp_path / "o1"), 2, 0, None, SIZE) == 2
    assert capsys.readouterr().err == f"anomalygpt simulate: error: --normals {tmp_path / 'absent'}: no such folder\n"
    (tmp_path / "empty").mkdir()
    assert run_simulate(str(tmp_path / "empty"), str(tmp_path / "o2"), 2, 0, None, SIZE) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "folder has no images" in err
    assert run_simulate(str(normals_dir), str(tmp_path / "o3"), 0, 0, None, SIZE) == 2
    assert "n: need at least 1 sample" in capsys.readouterr().err
    assert run_simulate(str(normals_dir), str(tmp_path / "o4"), 3, 0, "bottle", SIZE) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("wrote 3 samples (") and captured.out.count("\n") == 1
    assert json.loads((tmp_path / "o4" / "manifest.json").read_text())["sim_params"]["category"] == "bottle"
