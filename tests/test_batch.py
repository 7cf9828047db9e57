"""Inspector.inspect_many: batched inspection gives what `inspect` gives each image."""

import dataclasses
import errno
import hashlib
import json
import multiprocessing
import os

import cv2
import numpy as np
import pytest
import torch
from conftest import texture_crops, with_dark_blob
from scipy.ndimage import gaussian_filter

from anomalygpt import inspection, shared_batch
from anomalygpt.config import load_preset
from anomalygpt.inspection import Inspection, InspectionError, Inspector
from anomalygpt.memory import fused_tensor, gaussian_smooth, top_mean, top_means


@pytest.fixture(scope="module")
def inspector(small_backbone):
    return Inspector(small_backbone, load_preset("default"))


@pytest.fixture(scope="module")
def queries():
    """Two good crops and three with a dark blob in different places: both verdicts, regions of each."""
    goods = texture_crops(5, seed=21)
    centres = [(30, 40), (90, 90), (64, 20)]
    return goods[:2] + [with_dark_blob(image, c, 12) for image, c in zip(goods[2:], centres, strict=True)]


def region_facts(inspection: Inspection) -> list[dict[str, object]]:
    """Every region field but the two map statistics, which may differ by float rounding."""
    return [
        {key: value for key, value in region.to_dict().items() if key not in ("peak_score", "mean_score")}
        for region in inspection.regions
    ]


def assert_same(batched: Inspection, single: Inspection) -> None:
    assert batched.score == pytest.approx(single.score, abs=1e-5)
    assert batched.is_anomalous == single.is_anomalous
    assert batched.threshold == single.threshold
    assert region_facts(batched) == region_facts(single)
    assert batched.mode == single.mode and batched.source == single.source
    assert batched.reference_fit is not None and single.reference_fit is not None
    for key, value in single.reference_fit.items():  # rounded numbers, the fit flag and the nearest names
        assert batched.reference_fit[key] == (pytest.approx(value, abs=0.011) if isinstance(value, float) else value)
    assert batched.warnings == single.warnings
    assert batched.anomaly_map is not None and single.anomaly_map is not None
    assert np.abs(batched.anomaly_map - single.anomaly_map).max() < 1e-5


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_inspect_many_matches_inspect_per_image(inspector, queries, batch_size):
    references = inspector.fit(texture_crops(4, seed=11))
    single = [inspector.inspect(image, references, source=f"q{i}") for i, image in enumerate(queries)]
    batched = list(
        inspector.inspect_many(queries, references, sources=[f"q{i}" for i in range(5)], batch_size=batch_size)
    )
    assert [i.verdict for i in single] == ["normal", "normal", "anomalous", "anomalous", "anomalous"]
    assert all(i.regions for i in single[2:])
    assert len(batched) == len(single)
    for b, s in zip(batched, single, strict=True):
        assert_same(b, s)


def test_inspect_many_matches_inspect_in_a_pool(small_backbone, queries):
    """More references than `retrieve`: each query is still matched against its own nearest references."""
    preset = load_preset("default")
    pool_inspector = Inspector(
        small_backbone, dataclasses.replace(preset, memory=dataclasses.replace(preset.memory, retrieve=2))
    )
    references = pool_inspector.fit(texture_crops(5, seed=31))
    assert references.mode == "pool"
    single = [pool_inspector.inspect(image, references) for image in queries]
    batched = list(pool_inspector.inspect_many(queries, references, batch_size=3))
    for b, s in zip(batched, single, strict=True):
        assert_same(b, s)


def test_inspect_many_decodes_files_and_records_downscaled_sizes(inspector, queries, tmp_path, monkeypatch):
    monkeypatch.setattr("anomalygpt.verdict.MAX_WORKING_SIDE", 64)
    references = inspector.fit([cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA) for image in queries[:2]])
    paths = []
    for index, image in enumerate(queries):
        paths.append(tmp_path / f"q{index}.png")
        cv2.imwrite(str(paths[-1]), image[:, :, ::-1])
    single = [inspector.inspect(path, references, source=str(path)) for path in paths]
    batched = list(inspector.inspect_many(paths, references, sources=[str(p) for p in paths], batch_size=2))
    for b, s in zip(batched, single, strict=True):
        assert_same(b, s)
        assert b.image_size == (64, 64) and b.source_size == (128, 128)


def test_inspect_many_names_the_bad_image(inspector, queries, tmp_path):
    references = inspector.fit(texture_crops(2, seed=11))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    with pytest.raises(ValueError, match="broken.png"):
        list(inspector.inspect_many([queries[0], broken], references, sources=["a", str(broken)]))
    with pytest.raises(InspectionError, match="small: 64x64 px but the references are 128x128 px"):
        list(inspector.inspect_many([queries[0][:64, :64]], references, sources=["small"]))
    with pytest.raises(InspectionError, match="1 sources given for 2 images"):
        list(inspector.inspect_many(queries[:2], references, sources=["a"]))
    with pytest.raises(InspectionError, match="batch_size must be at least 1"):
        list(inspector.inspect_many(queries[:2], references, batch_size=0))


def test_worker_processes_give_what_threads_give_and_name_the_bad_image(inspector, queries, tmp_path, monkeypatch):
    """processes=2: files decoded and tails (fit check, verdict, regions) finished in spawned worker processes,
    in chunks of consecutive images, pixels and maps shared through each batch's file: the threads' records and
    maps to the last bit (the same code on the same numbers); a file that does not decode, or a query of another
    size, raises, named, when its batch is reached; however the run ends, its shared files are removed."""
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(shared_batch, "SHM", shm)
    monkeypatch.setattr(inspection, "WORKER_CHUNK", 2)  # a batch of 3 in two tasks
    references = inspector.fit(texture_crops(4, seed=11))
    paths = []
    for index, image in enumerate(queries):
        paths.append(tmp_path / f"q{index}.png")
        cv2.imwrite(str(paths[-1]), image[:, :, ::-1])
    sources = [str(path) for path in paths]
    threads = list(inspector.inspect_many(paths, references, sources=sources, batch_size=3))
    many = inspector.inspect_many(paths, references, sources=sources, batch_size=3, processes=2)
    first = next(many)
    assert len(list(shm.iterdir())) == 2  # this batch's and the next one's, decoding ahead
    processes = [first, *many]
    assert not list(shm.iterdir())
    assert [i.verdict for i in processes] == ["normal", "normal", "anomalous", "anomalous", "anomalous"]
    hashes = [hashlib.sha256(path.read_bytes()).hexdigest() for path in paths]  # of the bytes inspected
    assert [i.source_sha256 for i in processes] == hashes == [i.source_sha256 for i in threads]
    assert inspector.inspect(paths[2], references).source_sha256 == hashes[2]
    assert inspector.inspect(queries[2], references).source_sha256 is None  # an array has no file
    for ours, theirs in zip(processes, threads, strict=True):
        assert {**ours.to_dict(), "timings_ms": None} == {**theirs.to_dict(), "timings_ms": None}
        assert ours.anomaly_map is not None and theirs.anomaly_map is not None
        assert np.array_equal(ours.anomaly_map, theirs.anomaly_map)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    found = inspector.inspect_many([paths[0], broken], references, sources=[sources[0], str(broken)], processes=2)
    with pytest.raises(ValueError, match="broken.png"):
        list(found)
    wide = tmp_path / "wide.png"
    cv2.imwrite(str(wide), np.zeros((128, 160, 3), np.uint8))
    found = inspector.inspect_many(
        [paths[0], wide], references, sources=[sources[0], str(wide)], batch_size=1, processes=2
    )
    with pytest.raises(InspectionError, match="wide.png: 160x128 px but the references are 128x128"):
        list(found)
    stopped = inspector.inspect_many(paths, references, batch_size=2, processes=1)
    next(stopped)
    stopped.close()  # a caller that stops reading
    assert not list(shm.iterdir())
    with pytest.raises(InspectionError, match="processes must be 0"):
        list(inspector.inspect_many(paths, references, processes=-1))


def test_worker_processes_without_room_for_shared_files_fail_cleanly(inspector, queries, tmp_path, monkeypatch):
    """A full /dev/shm or disk: the batch's space is reserved when its file is made, so the run stops with a
    one-line OSError naming the folder (not a SIGBUS in a worker later), and leaves no file."""
    monkeypatch.setattr(shared_batch, "SHM", tmp_path)

    def full(descriptor, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shared_batch, "reserve", full)
    references = inspector.fit(texture_crops(4, seed=11))
    with pytest.raises(OSError, match=f"no room for a batch's shared file .* in {tmp_path}: No space left"):
        list(inspector.inspect_many(queries, references, batch_size=2, processes=1))
    assert not list(tmp_path.iterdir())


def test_a_worker_process_that_dies_is_a_one_line_error_and_leaves_no_files(inspector, queries, tmp_path, monkeypatch):
    """A worker process killed mid-run (the kernel's out-of-memory killer, an operator): the run stops with a
    ChildProcessError (an OSError: the command line's one-line error), not the pool's traceback, and its shared
    files are removed."""
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(shared_batch, "SHM", shm)
    references = inspector.fit(texture_crops(4, seed=11))
    paths = []
    for index in range(40):
        paths.append(tmp_path / f"q{index:02d}.png")
        cv2.imwrite(str(paths[-1]), queries[index % len(queries)][:, :, ::-1])
    before = set(multiprocessing.active_children())
    found = inspector.inspect_many(paths, references, batch_size=2, processes=1)
    next(found)
    for worker in set(multiprocessing.active_children()) - before:
        worker.kill()
    with pytest.raises(ChildProcessError, match="a worker process ended abruptly"):
        list(found)
    assert not list(shm.iterdir())


def test_detect_batch_size_keeps_every_output(tmp_path):
    """detect inspects in batches with references: the same table, records and files for any --batch-size, and
    in worker processes (--processes 2)."""
    from test_cli import run

    goods = texture_crops(6, seed=41)
    paths = []
    for index, image in enumerate(goods[:2] + [with_dark_blob(goods[2], (64, 64), 12)] + goods[3:]):
        paths.append(tmp_path / ("ref" if index < 2 else "q") / f"{index}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        cv2.imwrite(str(paths[-1]), image[:, :, ::-1])
    preset = tmp_path / "preset.json"
    preset.write_text('{"backbone": {"name": "efficientnet-lite0", "image_size": 128}, "memory": {"augment": false}}')
    runs = {}
    for size, processes in (("1", "0"), ("3", "0"), ("3", "2")):
        out = tmp_path / f"out{size}_{processes}"
        argv = ["detect", str(tmp_path / "q"), "--ref", str(tmp_path / "ref"), "--preset", str(preset)]
        code, table, _ = run([*argv, "--out", str(out), "--batch-size", size, "--processes", processes])
        assert code == 0
        records = [json.loads((out / f"{i}.json").read_text()) for i in range(2, 6)]
        runs[size, processes] = (table, records, sorted(p.name for p in out.iterdir()))
    (table1, records1, files1), (table3, records3, files3) = runs["1", "0"], runs["3", "0"]
    in_processes = runs["3", "2"]
    assert in_processes[0] == table3 and in_processes[2] == files3
    assert [{**r, "timings_ms": None} for r in in_processes[1]] == [{**r, "timings_ms": None} for r in records3]
    assert table1 == table3 and files1 == files3 and len(files1) == 4 * 3 + 1
    assert [r["verdict"] for r in records1] == ["anomalous", "normal", "normal", "normal"]
    for one, three in zip(records1, records3, strict=True):
        assert three["score"] == pytest.approx(one["score"], abs=1e-5)
        assert {k: v for k, v in three.items() if k not in ("score", "margin", "timings_ms", "regions")} == {
            k: v for k, v in one.items() if k not in ("score", "margin", "timings_ms", "regions")
        }


@pytest.mark.parametrize(
    ("shape", "sigma"), [((3, 300, 300), 4.0), ((2, 7, 5), 4.0), ((1, 40, 33), 0.7), ((1, 5, 5), 0.0)]
)
def test_gpu_smoothing_and_scoring_match_scipy_and_numpy(shape, sigma):
    """The GPU path's Gaussian (run here on the CPU) is scipy's, edges and kernels wider than the map included."""
    maps = np.random.default_rng(0).random(shape, dtype=np.float32)
    expected = np.stack([gaussian_filter(m, sigma=sigma) for m in maps])
    smoothed = gaussian_smooth(torch.from_numpy(maps), sigma).numpy()
    assert np.abs(smoothed - expected).max() < 1e-6
    scores = top_means(torch.from_numpy(maps), 0.01).numpy()
    assert np.abs(scores - [top_mean(m, 0.01) for m in maps]).max() < 1e-6


def test_search_banks_are_made_once(inspector):
    memory = inspector.fit(texture_crops(2, seed=11)).memory
    first = memory.search_banks()
    assert memory.search_banks() is first and first[0].dtype == torch.float32
    assert torch.equal(first[1], memory.banks[1].features.float())


@pytest.fixture
def on_device_path(inspector, monkeypatch):
    """The inspector taking its GPU code path on this CPU; counts the batches whose maps that path smoothed."""
    smoothed = []

    def counted(*args, **kwargs):
        smoothed.append(args[0][0].shape[0])
        return fused_tensor(*args, **kwargs)

    monkeypatch.setattr("anomalygpt.inspection.fused_tensor", counted)
    monkeypatch.setattr(inspector, "device_path", True)
    return smoothed


def test_the_gpu_code_path_run_on_the_cpu_matches_inspect(inspector, queries, on_device_path):
    """The device path (a backbone pass per batch, maps smoothed and scored by torch) gives `inspect`'s results."""
    references = inspector.fit(texture_crops(4, seed=11))
    single = [inspector.inspect(image, references, source=f"q{i}") for i, image in enumerate(queries)]
    batched = list(inspector.inspect_many(queries, references, sources=[f"q{i}" for i in range(5)], batch_size=3))
    assert on_device_path == [3, 2]
    for b, s in zip(batched, single, strict=True):
        assert_same(b, s)


def test_half_precision_keeps_verdicts_and_is_ignored_off_the_device_path(inspector, queries, monkeypatch):
    """half=True (float16 autocast and search, here on the CPU) moves scores a little and no verdict; off the device
    path it changes nothing."""
    references = inspector.fit(texture_crops(4, seed=11))
    runs = {}
    for path in (None, True):
        monkeypatch.setattr(inspector, "device_path", path)
        for half in (False, True):
            runs[path, half] = list(inspector.inspect_many(queries, references, batch_size=4, half=half))
    assert [i.score for i in runs[None, True]] == [i.score for i in runs[None, False]]
    full, half = runs[True, False], runs[True, True]
    assert [h.is_anomalous for h in half] == [f.is_anomalous for f in full] == [False, False, True, True, True]
    differences = [abs(h.score - f.score) for h, f in zip(half, full, strict=True)]
    assert 0 < max(differences) < 5e-3


@pytest.mark.cuda
def test_half_precision_on_cuda_keeps_verdicts(small_backbone, queries):
    """half=True (float16 autocast and search) moves scores little and no verdict."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    inspector = Inspector(small_backbone.to("cuda"), dataclasses.replace(load_preset("default"), device="cuda"))
    try:
        references = inspector.fit(texture_crops(4, seed=11))
        full = list(inspector.inspect_many(queries, references, batch_size=4))
        half = list(inspector.inspect_many(queries, references, batch_size=4, half=True))
    finally:
        small_backbone.to("cpu")
    assert [h.is_anomalous for h in half] == [f.is_anomalous for f in full] == [False, False, True, True, True]
    assert max(abs(h.score - f.score) for h, f in zip(half, full, strict=True)) < 5e-3
