import hashlib
import json

import pytest
import torch
from torch import nn

from anomalygpt import weights
from anomalygpt.backbones import WeightsError
from anomalygpt.weights import file_record, load_into, load_module, save_module


def sample_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(4, 3, generator=generator)
    return {
        "proj.0.weight": shared.T,  # non-contiguous view
        "proj.0.bias": torch.arange(4, dtype=torch.float16),
        "tied.weight": shared,  # shares storage with proj.0.weight
        "step": torch.tensor(7, dtype=torch.int64),
    }


CONFIG = {"stages": [40, 112], "text_dim": 384, "encoder": {"name": "minilm"}, "temperature": 0.07}


def test_round_trip_keeps_values_dtypes_and_config(tmp_path):
    state = sample_state()
    paths = save_module(tmp_path / "decoder.v2", state, CONFIG)
    assert paths == (tmp_path / "decoder.v2.safetensors", tmp_path / "decoder.v2.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.v2.json", "decoder.v2.safetensors"]
    loaded, config = load_module(tmp_path / "decoder.v2", expected_keys=set(state))
    assert config == CONFIG
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value)
    assert loaded["proj.0.weight"].is_contiguous()
    assert float(loaded["proj.0.weight"][1, 2]) == float(state["tied.weight"][2, 1])


def test_key_mismatch_names_the_first_missing_and_unexpected_keys(tmp_path):
    save_module(tmp_path / "part", {"a": torch.zeros(1), "c": torch.zeros(1)}, {})
    with pytest.raises(WeightsError, match=r"missing 1 \(b\); unexpected 1 \(c\)"):
        load_module(tmp_path / "part", expected_keys={"a", "b"})
    with pytest.raises(WeightsError) as caught:
        load_module(tmp_path / "part", expected_keys={"a", "k1", "k2", "k3", "k4"})
    message = str(caught.value)
    assert "missing 4 (k1, k2, k3, ...); unexpected 1 (c)" in message
    assert "\n" not in message and "part.safetensors" in message


def test_missing_files_are_named(tmp_path):
    tensors, config = save_module(tmp_path / "part", {"a": torch.zeros(1)}, {})
    config.unlink()
    with pytest.raises(WeightsError, match=f"{config}: config file not found"):
        load_module(tmp_path / "part")
    with pytest.raises(WeightsError, match=f"{tmp_path / 'nothing.safetensors'}: weights file not found"):
        load_module(tmp_path / "nothing")


def test_corrupt_files_raise_weights_errors(tmp_path):
    tensors, config = save_module(tmp_path / "part", {"a": torch.ones(100)}, {"k": 1})
    data = tensors.read_bytes()
    tensors.write_bytes(data[:-8])
    with pytest.raises(WeightsError, match="corrupt safetensors file"):
        load_module(tmp_path / "part")
    tensors.write_bytes(data)
    config.write_text('{"k": ')
    with pytest.raises(WeightsError, match="corrupt JSON config"):
        load_module(tmp_path / "part")
    config.write_text("[1, 2]")
    with pytest.raises(WeightsError, match="must be a JSON object, got list"):
        load_module(tmp_path / "part")


def test_a_failed_save_leaves_the_previous_pair_and_no_temp_files(tmp_path, monkeypatch):
    old = save_module(tmp_path / "part", {"a": torch.zeros(2)}, {"version": 1})
    old_bytes = [p.read_bytes() for p in old]
    real_write = weights.write_bytes_atomic
    calls = []

    def write_then_fail(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(path, data)

    monkeypatch.setattr(weights, "write_bytes_atomic", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_module(tmp_path / "part", {"a": torch.ones(2)}, {"version": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.json", "part.safetensors"]
    assert [p.read_bytes() for p in old] == old_bytes
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        save_module(tmp_path / "fresh", {"a": torch.ones(2)}, {"version": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.json", "part.safetensors"]


def test_bad_input_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="not plain JSON"):
        save_module(tmp_path / "part", {"a": torch.zeros(1)}, {"x": float("nan")})
    with pytest.raises(TypeError, match="'a' holds ndarray"):
        save_module(tmp_path / "part", {"a": torch.zeros(1).numpy()}, {})
    assert list(tmp_path.iterdir()) == []


def test_load_into_restores_a_module_and_reports_mismatches_on_one_line(tmp_path):
    torch.manual_seed(0)
    trained = nn.Linear(3, 2)
    save_module(tmp_path / "head", trained.state_dict(), {"in": 3, "out": 2})
    state, _ = load_module(tmp_path / "head")
    fresh = nn.Linear(3, 2)
    load_into(fresh, state)
    x = torch.tensor([[1.0, -2.0, 0.5]])
    assert torch.equal(fresh(x), trained(x))
    with pytest.raises(WeightsError) as caught:
        load_into(nn.Linear(4, 2), state, where="head.safetensors")
    assert str(caught.value) == "head.safetensors: 1 shape mismatch(es), saved vs model: weight (2, 3) vs (2, 4)"
    with pytest.raises(WeightsError, match=r"missing 1 \(bias\); unexpected 0$"):
        load_into(nn.Linear(3, 2), {"weight": state["weight"]})


def test_file_record_hashes_in_chunks(tmp_path):
    small = tmp_path / "abc.bin"
    small.write_bytes(b"abc")
    assert file_record(small) == {
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "size_bytes": 3,
    }
    big = tmp_path / "big.bin"
    data = bytes(range(256)) * (3 * 4096 + 1)  # just over 3 MiB: several chunks
    big.write_bytes(data)
    assert file_record(big) == {"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}
    json.dumps(file_record(big))  # goes straight into MANIFEST.json
    with pytest.raises(WeightsError, match="nope.bin: file not found"):
        file_record(tmp_path / "nope.bin")


def test_every_shipped_weight_file_is_recorded_with_its_hash():
    from anomalygpt.inspection import WEIGHTS_DIR

    recorded = json.loads((WEIGHTS_DIR / "MANIFEST.json").read_text())["files"]
    shipped = {
        path.relative_to(WEIGHTS_DIR).as_posix()
        for path in WEIGHTS_DIR.rglob("*")
        if path.suffix in {".safetensors", ".json"} and path.name != "MANIFEST.json"  # what loads (not plots)
    }
    assert shipped == set(recorded)
    for name, entry in recorded.items():
        assert {key: entry[key] for key in ("sha256", "size_bytes")} == file_record(WEIGHTS_DIR / name), name
        assert entry["command"] and entry["data"] and isinstance(entry["seed"], int)


KILL_BETWEEN_RENAMES = """
import os, sys, torch
from anomalygpt.weights import save_module
real_replace, calls = os.replace, []
def replace_then_die(src, dst):
    calls.append(dst)
    if len(calls) == 4:  # two staged halves written, the config renamed: die before the tensors' rename
        os._exit(9)
    real_replace(src, dst)
os.replace = replace_then_die
save_module(sys.argv[1], {"a": torch.ones(2)}, {"version": 2})
"""


def test_a_pair_torn_by_a_kill_is_refused_and_the_next_save_cleans_up(tmp_path):
    import subprocess
    import sys

    old_tensors, config = save_module(tmp_path / "part", {"a": torch.zeros(2)}, {"version": 1})
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(tmp_path / "part")], check=False)
    assert killed.returncode == 9
    assert json.loads(config.read_text())["version"] == 2  # the new config beside the old tensors
    staged = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(staged) == 1 and staged[0].startswith(".part.safetensors.") and staged[0].endswith(".pair")
    with pytest.raises(WeightsError) as caught:
        load_module(tmp_path / "part")
    assert "the pair is torn" in str(caught.value) and "\n" not in str(caught.value)
    save_module(tmp_path / "part", {"a": torch.ones(2)}, {"version": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.json", "part.safetensors"]
    state, loaded = load_module(tmp_path / "part")
    assert loaded == {"version": 3} and torch.equal(state["a"], torch.ones(2))


def test_the_config_records_the_tensor_checksum_and_old_pairs_without_it_still_load(tmp_path):
    tensors, config = save_module(tmp_path / "part", {"a": torch.ones(3)}, {"k": 1})
    recorded = json.loads(config.read_text())["safetensors_sha256"]
    assert recorded == hashlib.sha256(tensors.read_bytes()).hexdigest()
    other = save_module(tmp_path / "other", {"a": torch.zeros(3)}, {"k": 1})[0]
    tensors.write_bytes(other.read_bytes())  # a valid tensor file, but not the one this config was saved with
    with pytest.raises(WeightsError, match="not the tensor file part.json was saved with"):
        load_module(tmp_path / "part")
    config.write_text(json.dumps({"k": 1}))  # a pair saved before checksums (as the shipped weights may be)
    state, loaded = load_module(tmp_path / "part")
    assert loaded == {"k": 1} and torch.equal(state["a"], torch.zeros(3))
    with pytest.raises(ValueError, match="'safetensors_sha256' is reserved"):
        save_module(tmp_path / "part", {"a": torch.ones(3)}, {"safetensors_sha256": "x"})
