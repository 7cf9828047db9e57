"""Stage 2: train the prompt learner, image projection and LoRA on simulated conversations (`anomalygpt train
assistant`).

Data is an `anomalygpt simulate` folder: every conversation is one example, laid out exactly as the chat prompts
it (anomalygpt.assistant.conversation_example), with the loss on the answer tokens only. The backbone and the LLM
stay frozen; image embeddings and training maps are computed once and cached in <out>/features.safetensors.
Caches and checkpoints are state files (anomalygpt.state: safetensors, never pickles). Every step's randomness
is a function of (seed, step): its batch (seeded epoch permutations) and its LoRA dropout (torch seeded per step),
and build_assistant draws the trained parts' initial weights from the preset's seed, so a killed run resumed
with --resume, or one that finds its features cached, ends bit-identical to an uninterrupted one on the CPU.

The training map. The answers and the facts text of a simulated conversation are computed from its true mask,
so the map the prompt learner sees must say the same thing: the mask itself, made soft and scaled so that the
image threshold is 1, as the chat's normalised maps are (0 = typical good image, 1 = threshold). It is
2 * sigmoid(signed distance to the mask edge / softness): above 1 on exactly the mask's pixels and below 1
elsewhere, smooth like a detector's map. A plain Gaussian blur would leave thin scratches and specks below 1
while their facts say "anomalous". Smooth noise of about a normal map's spread is added so that a good image
is not a flat 0. Facts use the same Inspection.facts() as the chat, with a threshold scale and a margin drawn
to match the conversation's confidence word.

Runs on accelerate: one process on CPU here; several GPUs with train/deepspeed_zero2.yaml.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from anomalygpt.assistant import (
    IGNORE_INDEX,
    Assistant,
    Example,
    build_assistant,
    conversation_example,
    save_assistant,
    system_text,
)
from anomalygpt.config import Preset, load_preset, to_dict
from anomalygpt.devices import training_accelerator, with_device
from anomalygpt.inspection import Inspection
from anomalygpt.io import load_image, write_bytes_atomic, write_json_atomic
from anomalygpt.prompt_learner import normalised_map
from anomalygpt.regions import Region
from anomalygpt.state import load_cache, load_state, note_ignored_pickles, remove_orphaned_temps, save_state
from simulation.writer import CONVERSATIONS, FORMAT, MANIFEST
from train.losses import answer_loss, answer_positions

CHECKPOINT = "checkpoint.safetensors"
FEATURES = "features.safetensors"
LEGACY_CHECKPOINT, LEGACY_FEATURES = "checkpoint.pt", "features.pt"  # pickles of older versions: never loaded
WEIGHTS = "assistant"  # <out>/assistant/: the trained parts, as build_assistant loads them
# What a run writes atomically: temp files (and save_assistant's temp folder) a killed run left are removed on restart.
RUN_FILES = (CHECKPOINT, FEATURES, LEGACY_CHECKPOINT, LEGACY_FEATURES, WEIGHTS, "history.json", "loss.png")
# |margin| drawn per confidence word, inside the ranges verdict.confidence_word maps back to that word.
MARGINS = {"low": (0.05, 0.95), "medium": (1.0, 2.95), "high": (3.0, 10.0)}
THRESHOLD_RANGE = (0.05, 2.0)  # raw image thresholds differ by backbone and product; the facts print them
MEAN_FRACTION = (0.3, 0.8)  # normal mean as a fraction of the threshold
MAX_REFERENCES = 8  # facts state 1..8 good references
NOISE_CELLS = 16  # smooth noise varies over about 1/16 of the image side
MAX_GRAD_NORM = 1.0
MIN_LR_FRACTION = 0.1  # cosine decay ends at this fraction of the peak learning rate
ENCODE_BATCH = 16


@dataclass(frozen=True)
class AssistantTrainConfig:
    data: Path  # an `anomalygpt simulate` output folder
    out: Path
    preset: str = "default"
    steps: int = 2000
    batch_size: int = 4  # per process
    lr: float = 2e-4  # LoRA
    visual_lr: float = 1e-3  # prompt learner and image projection, trained from scratch
    warmup_steps: int = 50
    checkpoint_every: int = 100
    max_samples: int = 0  # 0 = every conversation in data
    max_tokens: int = 1024  # longer conversations are cut (the placeholders must fit)
    softness: float = 0.01  # training-map edge width, as a fraction of the image side
    map_noise: float = 0.1  # std of the smooth noise added to training maps, in threshold units
    seed: int = 0
    resume: bool = False
    device: str | None = None  # --device: overrides the preset's


@dataclass
class TrainingSet:
    examples: list[Example]
    embeddings: torch.Tensor  # (N, D) global image embeddings
    maps: torch.Tensor  # (N, 1, S, S) float16 normalised training maps


class Batch(NamedTuple):
    input_ids: torch.Tensor  # (B, L), right-padded
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L), IGNORE_INDEX on padding and non-answer tokens
    embedding: torch.Tensor  # (B, D)
    maps: torch.Tensor  # (B, 1, S, S)


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------- data


def read_conversations(data: Path, max_samples: int = 0) -> list[dict[str, Any]]:
    """The records of a finished `anomalygpt simulate` folder, in id order."""
    manifest_path = data / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{data}: no {MANIFEST}; give a folder written by anomalygpt simulate")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: not a manifest written by anomalygpt simulate ({FORMAT})")
    if not manifest.get("complete"):
        raise ValueError(f"{data}: the simulation did not finish; resume it with the same anomalygpt simulate command")
    lines = (data / CONVERSATIONS).read_text(encoding="utf-8").splitlines()
    records = sorted((json.loads(line) for line in lines if line.strip()), key=lambda r: r["id"])
    if not records:
        raise ValueError(f"{data / CONVERSATIONS}: no conversations")
    return records[:max_samples] if max_samples > 0 else records


def soft_mask_map(mask: np.ndarray, softness_px: float) -> np.ndarray:
    """(H, W) float32: 2 * sigmoid(signed distance to the mask edge / softness); > 1 exactly on mask pixels."""
    inside = np.asarray(mask, dtype=bool)
    if not inside.any():
        return np.zeros(inside.shape, np.float32)
    if inside.all():
        return np.full(inside.shape, 2.0, np.float32)
    # Mask pixels are >= 1 px from the nearest outside pixel and outside pixels <= -1 px: never exactly 0.
    distance = ndimage.distance_transform_edt(inside) - ndimage.distance_transform_edt(~inside)
    return (2.0 / (1.0 + np.exp(-distance / softness_px))).astype(np.float32)


def smooth_noise(shape: tuple[int, int], std: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float32 low-frequency noise with the given standard deviation."""
    if std <= 0:
        return np.zeros(shape, np.float32)
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(shape) / NOISE_CELLS)
    return (field_ * (std / max(float(field_.std()), 1e-12))).astype(np.float32)


def training_map(mask: np.ndarray, cfg: AssistantTrainConfig, rng: np.random.Generator) -> np.ndarray:
    """The normalised map the prompt learner is trained on: soft mask (threshold 1) plus smooth noise."""
    softness = max(cfg.softness * max(mask.shape), 0.5)
    return soft_mask_map(mask, softness) + smooth_noise(mask.shape, cfg.map_noise, rng)


def record_inspection(
    record: dict[str, Any], image_size: tuple[int, int], z: float, rng: np.random.Generator
) -> Inspection:
    """An Inspection stating what the conversation's answers state: its regions, verdict and confidence word."""
    regions = [Region.from_dict(region) for region in record["regions"]]
    anomalous = bool(regions)
    low, high = MARGINS[record["confidence"]]
    margin = float(rng.uniform(low, high)) * (1.0 if anomalous else -1.0)
    threshold = float(np.exp(rng.uniform(*np.log(THRESHOLD_RANGE))))
    normal_mean = threshold * float(rng.uniform(*MEAN_FRACTION))
    spread = (threshold - normal_mean) / z
    return Inspection(
        is_anomalous=anomalous,
        score=threshold + margin * spread,
        threshold=threshold,
        margin=margin,
        confidence=record["confidence"],
        pixel_threshold=threshold,
        regions=regions,
        mode="few-shot",
        n_references=int(rng.integers(1, MAX_REFERENCES + 1)),
        image_size=image_size,
        calibration={"normal_mean": normal_mean, "image_threshold": threshold, "normal_spread": spread},
        class_name=record.get("category"),
        source=record["image"],
    )


def record_example(
    record: dict[str, Any], image_size: tuple[int, int], assistant: Assistant, cfg: AssistantTrainConfig
) -> Example:
    """Token ids and answer labels of one conversation, cut at cfg.max_tokens."""
    rng = np.random.default_rng([cfg.seed, int(record["id"]), 1])
    inspection = record_inspection(record, image_size, assistant.preset.calibration.z, rng)
    turns = [(turn["question"], turn["answer"]) for turn in record["turns"]]
    example = conversation_example(assistant.tokenizer, system_text(inspection), turns, assistant.n_visual)
    last_placeholder = max(i for i, token in enumerate(example.input_ids) if token == assistant.placeholder_id)
    if last_placeholder >= cfg.max_tokens:
        raise ValueError(f"conversation {record['id']}: the image tokens end past --max-tokens {cfg.max_tokens}")
    return Example(example.input_ids[: cfg.max_tokens], example.labels[: cfg.max_tokens])


def record_map(data: Path, record: dict[str, Any], assistant: Assistant, cfg: AssistantTrainConfig) -> torch.Tensor:
    """(1, S, S) float16 normalised training map of one record."""
    mask = load_image(data / record["mask"])[:, :, 0] > 127  # (H, W) bool
    rng = np.random.default_rng([cfg.seed, int(record["id"]), 2])
    values = training_map(mask, cfg, rng)
    return normalised_map(values, 0.0, 1.0, assistant.prompt_learner.cfg).half()


@torch.inference_mode()
def build_training_set(
    data: Path, records: Sequence[dict[str, Any]], assistant: Assistant, cfg: AssistantTrainConfig
) -> TrainingSet:
    """Examples, image embeddings (frozen backbone, computed once) and training maps for every record."""
    if assistant.inspector is None:
        raise ValueError("the assistant was built without its Inspector: no backbone to embed images")
    backbone = assistant.inspector.backbone
    examples, embeddings, maps = [], [], []
    for first in tqdm(range(0, len(records), ENCODE_BATCH), desc="encode", unit="batch", leave=False, disable=None):
        chunk = records[first : first + ENCODE_BATCH]
        images = [load_image(data / record["image"]) for record in chunk]
        embeddings.append(backbone.encode(images, batch_size=ENCODE_BATCH, embedding=True).embedding.float().cpu())
        for record, image in zip(chunk, images, strict=True):
            examples.append(record_example(record, (image.shape[0], image.shape[1]), assistant, cfg))
            maps.append(record_map(data, record, assistant, cfg))
    return TrainingSet(examples, torch.cat(embeddings), torch.stack(maps))


def features_fingerprint(cfg: AssistantTrainConfig, preset: Preset) -> dict[str, Any]:
    manifest = (cfg.data / MANIFEST).read_bytes()
    keys = ("max_samples", "max_tokens", "softness", "map_noise", "seed")
    return {
        "data": str(cfg.data.resolve()),
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "backbone": asdict(preset.backbone),
        "assistant": asdict(preset.assistant.prompt_learner),
        "llm": preset.llm.model,
        **{key: getattr(cfg, key) for key in keys},
    }


def load_or_build_training_set(cfg: AssistantTrainConfig, assistant: Assistant) -> TrainingSet:
    """The training set, cached in <out>/features.safetensors (reused when nothing it depends on changed)."""
    path, fingerprint = cfg.out / FEATURES, features_fingerprint(cfg, assistant.preset)
    cached = load_cache(path)
    if isinstance(cached, dict) and cached.get("fingerprint") == fingerprint:
        return training_set(cached["set"])
    note_ignored_pickles(cfg.out, [LEGACY_FEATURES], "the training set is computed again")
    records = read_conversations(cfg.data, cfg.max_samples)
    training = build_training_set(cfg.data, records, assistant, cfg)
    save_state(path, {"fingerprint": fingerprint, "set": training_tree(training)})
    return training


def training_tree(training: TrainingSet) -> dict[str, torch.Tensor]:
    """The training set as flat tensors: every example's token ids and labels concatenated, with their lengths."""
    examples = training.examples
    return {
        "lengths": torch.tensor([len(example.input_ids) for example in examples]),
        "input_ids": torch.tensor([token for example in examples for token in example.input_ids]),
        "labels": torch.tensor([label for example in examples for label in example.labels]),
        "embeddings": training.embeddings,
        "maps": training.maps,
    }


def training_set(tree: dict[str, torch.Tensor]) -> TrainingSet:
    lengths = tree["lengths"].tolist()
    pairs = zip(tree["input_ids"].split(lengths), tree["labels"].split(lengths), strict=True)
    examples = [Example(ids.tolist(), labels.tolist()) for ids, labels in pairs]
    return TrainingSet(examples, tree["embeddings"], tree["maps"])


@functools.lru_cache(maxsize=4)
def permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, seed: int, step: int, rank: int = 0, world: int = 1) -> list[int]:
    """This process's examples for global batch `step`. Epochs are seeded permutations, so any step's batch can be
    recomputed: resuming at step s sees exactly the batches an uninterrupted run would have seen."""
    first = (step * world + rank) * batch_size
    return [int(permutation(n, seed, p // n)[p % n]) for p in range(first, first + batch_size)]


def collate(training: TrainingSet, indices: Sequence[int], pad_id: int) -> Batch:
    """Right-padded batch of the given examples."""
    examples = [training.examples[i] for i in indices]
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        size = len(example.input_ids)
        input_ids[row, :size] = torch.tensor(example.input_ids)
        labels[row, :size] = torch.tensor(example.labels)
        attention[row, :size] = 1
    index = torch.tensor(list(indices))
    return Batch(input_ids, attention, labels, training.embeddings[index], training.maps[index].float())


# ---------------------------------------------------------------- training


def trainable_parameters(assistant: Assistant) -> dict[str, torch.Tensor]:
    """Prompt learner, projection and LoRA parameters (everything else stays frozen)."""
    named = dict(assistant.named_parameters())
    frozen_wrong = [
        name for name, p in named.items() if p.requires_grad and name.startswith("llm.") and "lora_" not in name
    ]
    if frozen_wrong:
        raise ValueError(f"LLM parameters outside LoRA are trainable: {frozen_wrong[:3]}")
    return {name: p for name, p in named.items() if p.requires_grad}


def make_optimizer(assistant: Assistant, cfg: AssistantTrainConfig) -> torch.optim.Optimizer:
    params = trainable_parameters(assistant)
    lora = [p for name, p in params.items() if name.startswith("llm.")]
    visual = [p for name, p in params.items() if not name.startswith("llm.")]
    groups = [{"params": lora, "lr": cfg.lr}, {"params": visual, "lr": cfg.visual_lr}]
    return torch.optim.AdamW(groups, weight_decay=0.0)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to MIN_LR_FRACTION at `total`."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    progress = min(1.0, step / max(total, 1))
    return warm * (MIN_LR_FRACTION + (1.0 - MIN_LR_FRACTION) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_step(accelerator: Any, model: Any, optimizer: Any, scheduler: Any, batch: Batch) -> float:
    """One optimizer step on batch; returns the loss (mean over this process's answer tokens)."""
    model.train()
    device = accelerator.device
    labels = batch.labels.to(device)
    positions = answer_positions(labels)
    inputs = (batch.input_ids, batch.attention_mask, batch.embedding, batch.maps)
    logits = model(*(tensor.to(device) for tensor in inputs), positions=positions).logits  # (B, K, V)
    loss = answer_loss(logits, labels, positions)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def trained_state(assistant: Assistant) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in assistant.named_parameters() if p.requires_grad}


def save_checkpoint(
    path: Path, step: int, assistant: Assistant, optimizer: Any | None, scheduler: Any, history: History
) -> None:
    """Trained weights, optimizer (None: not saved, as under DeepSpeed, which shards it) and schedule after
    `step` steps, written atomically. No RNG state: step s draws from (seed, s) only."""
    optimizer_state = None if optimizer is None else optimizer.state_dict()
    state = {"step": step, "trained": trained_state(assistant), "optimizer": optimizer_state}
    save_state(path, {**state, "scheduler": scheduler.state_dict(), "history": asdict(history)})


def read_checkpoint(out: Path) -> dict[str, Any] | None:
    """The last checkpoint's state (read before anything is built, so a bad one fails fast); None without one."""
    path = out / CHECKPOINT
    if not path.is_file():
        note_ignored_pickles(out, [LEGACY_CHECKPOINT], "training starts from step 0")
        return None
    return load_state(path)


def resume_state(
    state: dict[str, Any] | None, path: Path, assistant: Assistant, optimizer: Any, scheduler: Any
) -> tuple[int, History]:
    """(steps done, history) from the checkpoint state read from path; (0, empty) when there is none."""
    if state is None:
        return 0, History()
    params = dict(assistant.named_parameters())
    if set(state["trained"]) != {name for name, p in params.items() if p.requires_grad}:
        raise ValueError(f"{path}: checkpoint holds other trained parameters than this preset's assistant")
    with torch.no_grad():
        for name, value in state["trained"].items():
            params[name].copy_(value)
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), History(**state["history"])


def loss_png(history: History) -> bytes:
    """Training loss per step (and its running mean) as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.plot(history.steps, history.loss, alpha=0.35, label="loss")
    window = max(1, len(history.loss) // 20)
    if len(history.loss) >= window:
        smooth = np.convolve(history.loss, np.ones(window) / window, mode="valid")
        axes.plot(history.steps[window - 1 :], smooth, label=f"mean of {window}")
    axes.set(title="assistant: answer-token loss", xlabel="step", ylabel="cross-entropy")
    axes.legend(loc="upper right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def train_assistant(cfg: AssistantTrainConfig) -> dict[str, Any]:
    """Build, train (checkpointing every cfg.checkpoint_every steps), save the trained parts; returns a summary."""

    found = [name for name in (CHECKPOINT, LEGACY_CHECKPOINT) if (cfg.out / name).is_file()]
    if found and not cfg.resume:
        raise ValueError(f"{cfg.out} holds a training run ({found[0]}); pass --resume or choose another --out")
    remove_orphaned_temps(cfg.out, RUN_FILES)  # left by a killed run
    checkpoint = read_checkpoint(cfg.out)
    preset = with_device(load_preset(cfg.preset), cfg.device)
    accelerator = training_accelerator(preset.device)
    assistant = build_assistant(preset)
    training = load_or_build_training_set(cfg, assistant)
    optimizer = make_optimizer(assistant, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    start, history = resume_state(checkpoint, cfg.out / CHECKPOINT, assistant, optimizer, scheduler)
    sharded = accelerator.state.deepspeed_plugin is not None
    if sharded:  # no DataLoader to read the micro-batch size from
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    # The schedule counts global steps, so it stays out of prepare (accelerate would step it once per process).
    model, optimizer = accelerator.prepare(assistant, optimizer)
    pad = assistant.tokenizer.pad_token_id
    pad = pad if pad is not None else assistant.tokenizer.eos_token_id
    n = len(training.examples)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train assistant", disable=None)
    for step in bar:
        begin = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # LoRA dropout of step s depends on (seed, s) only
        indices = batch_indices(n, cfg.batch_size, cfg.seed, step, accelerator.process_index, accelerator.num_processes)
        loss = train_step(accelerator, model, optimizer, scheduler, collate(training, indices, int(pad)))
        history.steps.append(step + 1)
        history.loss.append(loss)
        history.lr.append(float(scheduler.get_last_lr()[0]))
        history.seconds += time.perf_counter() - begin
        bar.set_postfix(loss=f"{loss:.3f}")
        done = step + 1
        if accelerator.is_main_process and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            kept = None if sharded else optimizer
            save_checkpoint(cfg.out / CHECKPOINT, done, accelerator.unwrap_model(model), kept, scheduler, history)
    return finish(cfg, accelerator.unwrap_model(model), history, n) if accelerator.is_main_process else {}


def finish(cfg: AssistantTrainConfig, assistant: Assistant, history: History, n_examples: int) -> dict[str, Any]:
    """The trained parts (<out>/assistant/), history.json and loss.png; returns the summary."""
    tail = history.loss[-10:]
    summary = {
        "steps": len(history.loss),
        "examples": n_examples,
        "final_loss": float(np.mean(tail)) if tail else None,
        "seconds": round(history.seconds, 1),
        "seconds_per_step": round(history.seconds / max(len(history.loss), 1), 3),
        "weights": str(cfg.out / WEIGHTS),
    }
    training = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(cfg).items()}
    extra = {"training": {**training, **summary, "preset": to_dict(assistant.preset)}}
    save_assistant(assistant, cfg.out / WEIGHTS, extra)
    write_json_atomic(cfg.out / "history.json", asdict(history))
    write_bytes_atomic(cfg.out / "loss.png", loss_png(history))
    return summary
