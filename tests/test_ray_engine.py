"""`anomalygpt detect --engine ray` on a local Ray instance: the single-process path's records, resumable."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from anomalygpt.cli import main
from anomalygpt.verdict import few_references_note

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'anomalygpt[ray]')")

SIDE = 128
REFERENCE_CROPS = ((0, 0), (0, 256), (256, 0))  # (row, col) of skimage's 512x512 grass texture
QUERY_CROPS = ((384, 384), (200, 300), (300, 100), (100, 350), (384, 0), (50, 150), (250, 250), (150, 50))
BLOB_CENTRE, BLOB_RADIUS, BLOB_GREY = (40, 80), 14, 20  # drawn into every other query
VOLATILE = ("timings_ms",)  # what may differ between two runs of one inspection
# Other batch sizes or thread counts move float32 sums in the last bits.
TOLERANCE = 1e-5


def crop(row: int, col: int) -> np.ndarray:
    return np.ascontiguousarray(skimage.data.grass()[row : row + SIDE, col : col + SIDE])


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A profile fitted on 3 grass crops and 8 queries, half with a dark blob."""
    root = tmp_path_factory.mktemp("ray")
    for index, (row, col) in enumerate(REFERENCE_CROPS):
        save(root / "refs" / f"ref{index}.png", crop(row, col))
    for index, (row, col) in enumerate(QUERY_CROPS):
        pixels = crop(row, col)
        if index % 2:
            cv2.circle(pixels, BLOB_CENTRE, BLOB_RADIUS, BLOB_GREY, thickness=-1)
        save(root / "queries" / f"q{index}.png", pixels)
    preset = root / "preset.json"
    preset.write_text(
        json.dumps(
            {"name": "t", "backbone": {"name": "efficientnet-lite0", "image_size": SIDE}, "memory": {"augment": False}}
        )
    )
    profile = root / "grass.profile"
    argv = ["fit", str(root / "refs"), "--preset", str(preset), "--out", str(profile), "--class-name", "grass"]
    code, _, stderr = run(argv)
    assert code == 0, stderr
    return {"root": root, "queries": root / "queries", "profile": profile}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """One local Ray instance for the module; the CLI joins it (no address given) instead of starting its own."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_out(scene: dict[str, Path]) -> Path:
    out = scene["root"] / "local"
    code, _, stderr = run(["detect", str(scene["queries"]), "--profile", str(scene["profile"]), "--out", str(out)])
    assert code == 0, stderr
    return out


def stable(record: dict[str, object]) -> dict[str, object]:
    return {key: value for key, value in record.items() if key not in VOLATILE}


def records(out: Path) -> dict[str, dict[str, object]]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(out.glob("q*.json"))}


def test_ray_writes_the_single_process_records(scene: dict[str, Path], local_out: Path, local_ray: Any) -> None:
    """The local path's batch of 8 on one actor with its thread count: the same numbers, bit for bit."""
    out = scene["root"] / "ray"
    argv = ["detect", str(scene["queries"]), "--profile", str(scene["profile"]), "--out", str(out), "--engine", "ray"]
    code, stdout, stderr = run([*argv, "--ray-cpus", str(torch.get_num_threads())])
    assert code == 0, stderr
    assert "8 images: 8 inspected, 0 reused from an earlier run, 0 failed; 4 anomalous" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in local_out.iterdir())
    expected, found = records(local_out), records(out)
    assert len(found) == 8 and {stable(r)["verdict"] for r in found.values()} == {"normal", "anomalous"}
    assert found["q3"]["source_sha256"] == hashlib.sha256((scene["queries"] / "q3.png").read_bytes()).hexdigest()
    for stem, record in expected.items():
        assert stable(found[stem]) == stable(record), stem
        assert np.array_equal(np.load(out / f"{stem}_map.npy"), np.load(local_out / f"{stem}_map.npy"))
    local_summary = json.loads((local_out / "summary.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == local_summary["images"]
    assert summary["n_anomalous"] == local_summary["n_anomalous"] == 4
    assert summary["class_name"] == local_summary["class_name"] == "grass"  # the profile's
    assert summary["n_unfit"] == local_summary["n_unfit"]
    assert summary["complete"] is True and summary["failed"] == [] and summary["engine"] == "ray"


def test_a_failed_image_is_retried_alone_and_done_ones_are_reused(
    scene: dict[str, Path], local_out: Path, local_ray: Any
) -> None:
    queries = scene["root"] / "resume_queries"
    shutil.copytree(scene["queries"], queries)
    broken = queries / "q5.png"
    broken.write_bytes(broken.read_bytes()[:300])  # truncated: fails to decode
    out = scene["root"] / "resume"
    argv = ["detect", str(queries), "--profile", str(scene["profile"]), "--out", str(out), "--engine", "ray"]
    argv += ["--batch-size", "4", "--ray-actors", "1"]  # 2 chunks on one 1-thread actor (other float sums)
    code, stdout, stderr = run(argv)
    note, error = stderr.splitlines()  # the profile's few references get their note first
    assert note == f"anomalygpt detect: note: {few_references_note(len(REFERENCE_CROPS))}"
    assert code == 1 and error.startswith(f"anomalygpt detect: error: {broken}: ")
    assert "7 inspected, 0 reused from an earlier run, 1 failed" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and [f["source"] for f in summary["failed"]] == [str(broken)]
    assert not (out / "q5.json").exists() and len(records(out)) == 7
    first = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in out.iterdir()}
    del first["summary.json"]

    shutil.copy(scene["queries"] / "q5.png", broken)  # repaired
    code, stdout, stderr = run(argv)
    assert code == 0, stderr
    assert "8 images: 1 inspected, 7 reused from an earlier run, 0 failed; 4 anomalous" in stdout
    now = {name: ((out / name).stat().st_mtime_ns, (out / name).read_bytes()) for name in first}
    assert now == first  # done images were neither rewritten nor recomputed
    expected = records(local_out)
    for stem, record in records(out).items():  # other batches and threads than the local run: float sums differ
        assert (
            record["verdict"] == expected[stem]["verdict"]
            and record["source_sha256"] == expected[stem]["source_sha256"]
        )
        assert record["score"] == pytest.approx(expected[stem]["score"], rel=TOLERANCE), stem
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True and summary["n_images"] == 8 and summary["failed"] == []


def test_maps_flagged_on_ray_writes_what_the_local_run_writes_and_resumes(
    scene: dict[str, Path], local_ray: Any
) -> None:
    base = ["detect", str(scene["queries"]), "--profile", str(scene["profile"]), "--maps", "flagged"]
    local, out = scene["root"] / "flagged_local", scene["root"] / "flagged_ray"
    assert run([*base, "--out", str(local)])[0] == 0
    argv = [*base, "--out", str(out), "--engine", "ray", "--ray-cpus", str(torch.get_num_threads())]
    code, stdout, stderr = run(argv)
    assert code == 0, stderr
    names = sorted(p.name for p in out.iterdir())
    summary = json.loads((out / "summary.json").read_text())
    flagged = [image for image in summary["images"] if image["verdict"] == "anomalous" or image["fits"] is False]
    assert 4 <= len(flagged) < 8 and len(names) == 8 + 1 + 2 * len(flagged)  # records, summary, flagged pictures
    assert names == sorted(p.name for p in local.iterdir())
    assert (
        summary["maps"] == "flagged" and summary["images"] == json.loads((local / "summary.json").read_text())["images"]
    )
    code, stdout, _ = run(argv)  # resumed: every record and its pictures are there
    assert code == 0 and "8 images: 0 inspected, 8 reused from an earlier run, 0 failed" in stdout
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    code, _, stderr = run([*argv[:4], "--out", str(out), "--engine", "ray"])  # --maps all: another job
    assert code == 2 and "(maps differ)" in stderr
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_another_jobs_out_folder_is_refused_untouched(scene: dict[str, Path], local_out: Path) -> None:
    before = {path.name: path.read_bytes() for path in local_out.iterdir()}
    argv = ["detect", str(scene["queries"]), "--profile", str(scene["profile"]), "--out", str(local_out)]
    code, _, stderr = run([*argv, "--engine", "ray"])
    assert code == 2 and len(stderr.splitlines()) == 1
    assert stderr.startswith(f"anomalygpt detect: error: {local_out / 'summary.json'}: --out holds the results of ")
    assert {path.name: path.read_bytes() for path in local_out.iterdir()} == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--engine ray: needs --profile"),
        (["--profile", "p.profile", "--json"], "--json: not with --engine ray"),
        (["--profile", "p.profile", "--ray-actors", "0"], "--ray-actors: must be at least 1"),
        (["--profile", "p.profile", "--device", "cpu"], "--device: not with --engine ray"),
        (["--profile", "p.profile", "--processes", "2"], "--processes: not with --engine ray"),
    ],
)
def test_bad_ray_options_are_one_line_errors(
    scene: dict[str, Path], tmp_path: Path, extra: list[str], message: str
) -> None:
    argv = ["detect", str(scene["queries"]), "--out", str(tmp_path / "out"), "--engine", "ray", *extra]
    code, stdout, stderr = run(argv)
    assert (code, stdout) == (2, "") and stderr.startswith(f"anomalygpt detect: error: {message}")
    assert len(stderr.splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("address", ["ray://127.0.0.1:1", "127.0.0.1:1", "nowhere.invalid:6379"])
def test_an_unreachable_cluster_is_a_one_line_error(scene: dict[str, Path], tmp_path: Path, address: str) -> None:
    out = tmp_path / "out"
    argv = ["detect", str(scene["queries"]), "--profile", str(scene["profile"]), "--out", str(out)]
    code, stdout, stderr = run([*argv, "--engine", "ray", "--ray-address", address])
    assert (code, stdout) == (2, "") and len(stderr.splitlines()) == 1
    assert stderr.startswith(f"anomalygpt detect: error: --ray-address: cannot reach a Ray cluster at {address} (")
    assert not out.exists()


def mvtec_tree(root: Path) -> Path:
    """One MVTec-layout category of grass crops: 3 train/good, 3 test/good, 3 test/hole with masks."""
    corners = [(row, col) for row in (0, 128, 256, 384) for col in (0, 192, 384)][:9]
    for index, (row, col) in enumerate(corners):
        pixels = crop(row, col)
        folder = "train/good" if index < 3 else "test/good" if index < 6 else "test/hole"
        save(root / "grass" / folder / f"{index:03d}.png", pixels)
        if index >= 6:
            mask = np.zeros_like(pixels)
            cv2.circle(mask, BLOB_CENTRE, BLOB_RADIUS, 255, thickness=-1)
            save(root / "grass" / folder / f"{index:03d}.png", np.where(mask > 0, np.uint8(BLOB_GREY), pixels))
            save(root / "grass" / "ground_truth" / "hole" / f"{index:03d}_mask.png", mask)
    return root


def eval_run(*args: str | Path) -> tuple[int, str]:
    from eval.cli import main as eval_main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = eval_main([str(arg) for arg in args])
    return code, err.getvalue()


def test_eval_on_ray_gives_the_local_metrics(scene: dict[str, Path], local_ray: Any) -> None:
    root = mvtec_tree(scene["root"] / "mvtec")
    preset = scene["root"] / "preset.json"
    common = ("--dataset", "mvtec", "--root", root, "--shots", "1,2", "--seeds", "0,1", "--preset", preset)
    results = {}
    # One actor on 2 threads, as torch runs here: a convolution's float sums depend on the thread count.
    engines = {"local": ["--engine", "local"], "ray": ["--engine", "ray", "--ray-cpus", str(torch.get_num_threads())]}
    for engine, options in engines.items():
        out = scene["root"] / f"eval_{engine}"
        code, stderr = eval_run(*common, "--out", out, *options)
        assert code == 0, stderr
        results[engine] = json.loads((out / "results.json").read_text())["categories"]["grass"]
    timings = {"encode_ms_per_image", "score_ms_per_image", "ms_per_image", "index_ms", "peak_rss_mb"}
    for row in ("k=1", "k=2"):
        for seed in ("0", "1"):
            local, on_ray = (results[e][row]["seeds"][seed] for e in ("local", "ray"))
            assert {k: v for k, v in on_ray.items() if k not in timings} == {
                k: v for k, v in local.items() if k not in timings
            }, (row, seed)
    assert 0.5 < results["ray"]["k=2"]["seeds"]["0"]["auroc"] <= 1.0


@pytest.mark.parametrize("verb", ["detect", "eval"])
def test_ray_options_without_the_ray_engine_are_refused(scene: dict[str, Path], tmp_path: Path, verb: str) -> None:
    out = tmp_path / "out"
    if verb == "detect":
        code, stdout, stderr = run(
            ["detect", str(scene["queries"]), "--profile", str(scene["profile"])]
            + ["--out", str(out), "--ray-address", "auto"]
        )
    else:
        code, stderr = eval_run("--dataset", "elpv", "--out", out, "--ray-actors", "2")
        stdout = ""
    assert (code, stdout) == (2, "") and len(stderr.splitlines()) == 1 and not out.exists()
    assert stderr.startswith(f"anomalygpt {verb}: error: --ray-address, --ray-actors, --ray-cpus, --ray-gpus: only ")


def test_eval_on_ray_refuses_baselines(tmp_path: Path) -> None:
    code, stderr = eval_run("--dataset", "elpv", "--out", tmp_path / "out", "--engine", "ray", "--method", "patchcore")
    assert code == 2 and len(stderr.splitlines()) == 1
    assert stderr.startswith("anomalygpt eval: error: --engine ray: runs the inspector method only")


def test_an_image_the_encoders_refuse_is_named_as_the_local_run_names_it(tmp_path: Path) -> None:
    """What `eval --engine ray` reports when Ray says only that a block failed (no Ray needed to check it)."""
    from anomalygpt.engine_ray import refused_image

    paths = [save(tmp_path / f"{index}.png", crop(0, 64 * index)) for index in range(3)]
    assert refused_image(paths) is None
    save(paths[2], crop(0, 0)[:64])
    assert refused_image(paths) == f"{paths[2]}: 128x64 px but other images of its category are 128x128 px; " + (
        "a category must have one image size"
    )
    paths[1].write_bytes(paths[1].read_bytes()[:200])
    assert refused_image(paths).startswith(f"{paths[1]}: corrupt or truncated image")


def test_the_ray_line_counts_the_images_unlike_the_references(capsys: pytest.CaptureFixture[str]) -> None:
    from anomalygpt.engine_ray import Outcome, report

    images = [{"verdict": "anomalous", "fits": False}, {"verdict": "normal", "fits": True}, {"verdict": "normal"}]
    outcomes = [Outcome(i, "inspected", json.dumps(image)) for i, image in enumerate(images)]
    assert report(outcomes, images, [], Path("out/summary.json")) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("3 images: 3 inspected, 0 reused from an earlier run, 0 failed; 1 anomalous; 1 unlike the")
    assert report(outcomes[1:], images[1:], [], Path("s.json")) == 0  # an earlier run's entry without "fits" too
    assert "unlike" not in capsys.readouterr().out
