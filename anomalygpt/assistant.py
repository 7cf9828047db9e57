"""The chat assistant: a causal LM with LoRA that explains an Inspection, and a ChatSession that caches it.

Input layout, the same in training and in chat (LLaVA-style):
    system:    SYSTEM_PROMPT + Inspection.facts()
    user:      IMAGE_PLACEHOLDER x (1 + prompt tokens) + "\\n" + first question
    assistant: answer ... later turns ... assistant cue (+ the grounded opening, anomalygpt.guard)
The placeholder positions are filled with [image token][prompt tokens] by masked_scatter, after a count check.
In chat, each answer is prefilled with the grounded answer to its question (trust warnings first), the model
continues it (at most MAX_SENTENCES sentences), and every sentence it adds is checked against the Inspection
before it is shown (anomalygpt.claims). The keys/values of the prompt so far are kept for the next turn.
transformers and peft are imported inside the functions that need them, so parsing a preset stays cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import secrets
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from anomalygpt.backbones import WeightsError
from anomalygpt.claims import SENTENCE_END, CheckReport, CheckTally, ClaimChecker, check_answer
from anomalygpt.evidence import ChoosesReferences
from anomalygpt.grounded import DefectType, Grounds, answer_text, chat_grounds
from anomalygpt.guard import Question, read_question
from anomalygpt.io import ImageSource, load_image
from anomalygpt.llm import attach_lora, chat_prompt_ids, load_llm, quantize_llm
from anomalygpt.prompt_learner import ImageProjection, PromptLearner, PromptLearnerConfig, normalised_map
from anomalygpt.weights import check_keys, load_into, load_module, save_module

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from anomalygpt.config import Preset
    from anomalygpt.evidence import EvidenceSource, RegionEvidence
    from anomalygpt.inspection import Inspection, Inspector, References

IMAGE_PLACEHOLDER = "<|anomalygpt_image|>"  # one token per visual embedding; added to the tokenizer as special
IGNORE_INDEX = -100  # label of every token the loss skips (all but the answers)
SYSTEM_PROMPT = (
    "You are an industrial inspection assistant. An anomaly detector inspected the image; its result follows. "
    "Answer the operator's questions from this result, briefly, and never contradict it."
)
WEIGHTS_FORMAT = "anomalygpt-assistant/1"
VISUAL_STEM = "visual"  # prompt learner + image projection: visual.safetensors beside visual.json (the config)
LORA_DIR = "lora"  # peft's adapter folder
ADAPTER_FILE = "adapter_model.safetensors"
STREAM_TIMEOUT_S = 600.0  # a generation thread silent this long has failed; the stream raises instead of hanging
# Sentences the model may add after the grounded opening: on the shipped 135M model further ones only repeat or
# drift (bench/RESULTS.md, "Verified chat"), and each costs about a second on a 2-core CPU.
MAX_SENTENCES = 2
CONTINUATION_TOKENS = 48  # at most this many new tokens after a grounded opening (about two short sentences)


@dataclass(frozen=True)
class AssistantConfig:
    weights: str = ""  # folder of trained parts (a bare name means weights/<name>); "" = untrained parts
    prompt_learner: PromptLearnerConfig = field(default_factory=PromptLearnerConfig)
    max_new_tokens: int = 128
    max_question_chars: int = 500  # longer questions are refused with a one-line message
    history_turns: int = 4  # earlier question/answer pairs kept in the prompt; older ones are dropped
    guard: bool = True  # prefill every answer with the grounded facts its question asks for (anomalygpt.guard)
    check_claims: bool = True  # check every generated sentence against the inspection (anomalygpt.claims)
    kv_cache: bool = True  # reuse the keys/values of the system prompt and earlier turns in the next turn
    # Product-specific defect families that "what kind" answers name first (anomalygpt.grounded.DefectType)
    defect_types: tuple[DefectType, ...] = ()
    seed: int = 0  # initialises untrained parts, without touching the global RNG

    def __post_init__(self) -> None:
        names = [kind.name.lower() for kind in self.defect_types]
        if len(set(names)) != len(names):
            raise ValueError(f"assistant.defect_types: names must be unique, got {', '.join(names)}")


class QuestionError(ValueError):
    """A question the session refuses (empty, too long); the message is one line."""


class AssistantOutput(NamedTuple):
    logits: torch.Tensor  # (B, L, V), or (B, K, V) at the K positions forward was given


class Example(NamedTuple):
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except on answer tokens (and each answer's end-of-turn token)


class PrefixCache(NamedTuple):
    """The keys/values of a conversation's positions, kept for the next turn, whose prompt starts the same way."""

    key: bytes  # digest of the visual tokens the positions were computed with
    ids: list[int]  # the token ids of the cached positions
    cache: Any  # a transformers DynamicCache


@dataclass
class Generation:
    """How one generation ended; read by the claim checker once the stream is done."""

    tokens: int = 0  # new tokens generated
    cut: bool = False  # stopped by the token or sentence limit, not by the end-of-turn token
    cached: int = 0  # prompt positions whose keys/values came from the previous turn
    new_ids: list[int] = field(default_factory=list)  # the generated token ids


# ---------------------------------------------------------------- prompt layout


def system_text(inspection: Inspection) -> str:
    return f"{SYSTEM_PROMPT}\n{inspection.facts()}"


def chat_messages(system: str, turns: Sequence[tuple[str, str | None]], n_visual: int) -> list[dict[str, str]]:
    """System turn, then (question, answer) pairs; the placeholders open the first user turn. None: no answer yet."""
    messages = [{"role": "system", "content": system}]
    for index, (question, answer) in enumerate(turns):
        content = f"{IMAGE_PLACEHOLDER * n_visual}\n{question}" if index == 0 else question
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def template_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The whole conversation in the chat template, without the trailing assistant cue."""
    encoded: Any = tokenizer.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=False, tokenize=True, return_dict=True
    )
    return [int(i) for i in encoded["input_ids"]]


def conversation_example(
    tokenizer: PreTrainedTokenizerBase, system: str, turns: Sequence[tuple[str, str]], n_visual: int
) -> Example:
    """Token ids of a whole conversation with labels on the answers only, as the chat will prompt it.

    Each answer's span is what its turn adds after the assistant cue, up to and including the end-of-turn token,
    so the model learns to stop there; the template's text after it (a newline) is not learned.
    """
    ids: list[int] = []
    labels: list[int] = []
    for count in range(1, len(turns) + 1):
        prompt = chat_prompt_ids(
            tokenizer, chat_messages(system, [*turns[: count - 1], (turns[count - 1][0], None)], n_visual)
        )
        full = template_ids(tokenizer, chat_messages(system, turns[:count], n_visual))
        if full[: len(ids)] != ids or full[: len(prompt)] != prompt or len(prompt) < len(ids):
            raise ValueError("the chat template is not prefix-stable: answer tokens cannot be located")
        answer = full[len(prompt) :]
        end = answer.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in answer else len(answer)
        labels += [IGNORE_INDEX] * (len(prompt) - len(ids)) + answer[:end] + [IGNORE_INDEX] * (len(answer) - end)
        ids = full
    return Example(ids, labels)


def check_question(question: str, max_chars: int) -> str:
    """The question stripped; QuestionError when empty or longer than max_chars."""
    text = " ".join(question.split())
    if not text:
        raise QuestionError("empty question: type a question about the image")
    if len(text) > max_chars:
        raise QuestionError(f"question too long: {len(text)} characters, at most {max_chars}")
    return text


def merge_embeddings(embeds: torch.Tensor, slots: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Put features (B, n, H) into embeds (B, L, H) where slots (B, L) is True, in order (transformers' LLaVA way)."""
    per_row = slots.sum(dim=1)  # (B,)
    if slots.shape[0] != features.shape[0] or bool((per_row != features.shape[1]).any()):
        raise ValueError(
            f"placeholder tokens per sequence {per_row.tolist()} do not match the "
            f"{features.shape[0]} x {features.shape[1]} image/prompt embeddings"
        )
    mask = slots[..., None].expand_as(embeds)  # (B, L, H)
    return embeds.masked_scatter(mask, features.to(embeds.dtype).reshape(-1, embeds.shape[-1]))


# ---------------------------------------------------------------- the model


class Assistant(nn.Module):
    """LLM (+ LoRA) with the prompt learner and image projection; holds the Inspector whose results it explains."""

    def __init__(
        self,
        llm: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompt_learner: PromptLearner,
        projection: ImageProjection,
        preset: Preset,
        inspector: Inspector | None = None,
    ) -> None:
        super().__init__()
        self.llm = llm  # a peft model around the frozen causal LM
        self.prompt_learner = prompt_learner
        self.projection = projection
        self.tokenizer = tokenizer
        self.preset = preset
        self.cfg: AssistantConfig = preset.assistant
        self.inspector = inspector
        self.placeholder_id = placeholder_id(tokenizer)
        self.prefix_cache: PrefixCache | None = None  # the last turn's keys/values (cfg.kv_cache)
        self.cache_lock = threading.Lock()

    @property
    def n_visual(self) -> int:
        """Placeholder tokens per image: the image token, then the prompt learner's tokens."""
        return 1 + self.prompt_learner.n_tokens

    @property
    def device(self) -> torch.device:
        return self.projection.linear.weight.device

    def visual_tokens(self, embedding: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """(B, D) global embeddings and (B, 1, S, S) normalised maps -> (B, n_visual, hidden)."""
        return torch.cat([self.projection(embedding), self.prompt_learner(maps)], dim=1)

    def input_embeddings(self, input_ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and (B, n_visual, hidden) visual tokens -> (B, L, hidden) LLM input embeddings."""
        embeds = self.llm.get_input_embeddings()(input_ids)  # type: ignore[operator]
        return merge_embeddings(embeds, input_ids == self.placeholder_id, visual)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        embedding: torch.Tensor,
        maps: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> AssistantOutput:
        """Logits (B, L, V), or (B, K, V) at the K sequence positions given (training skips the rest: the
        vocabulary projection is a fifth of a small LM's compute, and most positions carry no label)."""
        embeds = self.input_embeddings(input_ids, self.visual_tokens(embedding, maps))
        keep = 0 if positions is None else positions  # transformers' logits_to_keep: 0 = every position
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep)
        return AssistantOutput(out.logits)

    def map_input(self, inspection: Inspection) -> torch.Tensor:
        """(1, 1, S, S) normalised anomaly map of an Inspection: 0 = typical good image, 1 = the threshold."""
        if inspection.anomaly_map is None:
            raise ValueError("the inspection carries no anomaly map")
        normal_mean = float(inspection.calibration["normal_mean"])
        cfg = self.prompt_learner.cfg
        return normalised_map(inspection.anomaly_map, normal_mean, inspection.threshold, cfg)[None].to(self.device)

    def prompt_ids(self, system: str, history: Sequence[tuple[str, str]], question: str) -> list[int]:
        """The chat prompt up to the assistant cue, with the last cfg.history_turns turns of history."""
        kept = list(history)[-self.cfg.history_turns :] if self.cfg.history_turns > 0 else []
        messages = chat_messages(system, [*kept, (question, None)], self.n_visual)
        return chat_prompt_ids(self.tokenizer, messages)

    def stream(self, prompt_ids: Sequence[int], visual: torch.Tensor, opening: str | None = None) -> Iterator[str]:
        """Greedy answer as text pieces; `opening` (guard.expected_opening) is prefilled and streamed first.

        visual: (n, hidden)."""
        if opening:
            yield opening
        yield from self.continuation(prompt_ids, visual, opening, Generation())

    def continuation(
        self, prompt_ids: Sequence[int], visual: torch.Tensor, opening: str | None, state: Generation
    ) -> Iterator[str]:
        """The model's text after the prefilled opening, as it is generated; `state` says how it ended."""
        from transformers import TextIteratorStreamer

        prefix = self.tokenizer.encode(opening, add_special_tokens=False) if opening else []
        ids = [*prompt_ids, *prefix]
        with torch.inference_mode():
            embeds = self.input_embeddings(torch.tensor([ids], device=self.device), visual[None].to(self.device))
        key = visual_key(visual)
        cache = self.take_cache(key, ids, state)
        streamer = TextIteratorStreamer(self.tokenizer, skip_special_tokens=True, timeout=STREAM_TIMEOUT_S)
        if prefix:
            streamer.put(torch.tensor(prefix))  # decoded together with the continuation, so spacing is right
        failure: list[BaseException] = []
        limit = min(self.cfg.max_new_tokens, CONTINUATION_TOKENS) if prefix else self.cfg.max_new_tokens
        args = (embeds, streamer, failure, cache, state, limit)
        thread = threading.Thread(target=self._generate, args=args, daemon=True)
        thread.start()
        # The streamer's text repeats the opening (decoded with it so that spacing is right); only what follows goes.
        opened = str(self.tokenizer.decode(prefix, skip_special_tokens=True)) if prefix else ""
        text = ""
        for piece in streamer:
            text += piece
            if len(text) > len(opened):
                yield text[max(len(opened), len(text) - len(piece)) :]
        thread.join()
        if failure:
            raise failure[0]
        if cache is not None:
            self.put_cache(PrefixCache(key, ids + state.new_ids, cache))

    def _generate(
        self,
        embeds: torch.Tensor,
        streamer: Any,
        failure: list[BaseException],
        cache: Any,
        state: Generation,
        limit: int,
    ) -> None:
        """generate() on the inputs embeddings, in the streaming thread; an error is handed back to the stream."""
        from transformers import StoppingCriteriaList

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        stop = SentenceStop(self.tokenizer, MAX_SENTENCES)
        try:
            with torch.inference_mode():
                output = self.llm.generate(  # type: ignore[operator]
                    inputs_embeds=embeds,
                    attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
                    max_new_tokens=limit,
                    do_sample=False,
                    pad_token_id=pad,
                    suppress_tokens=[self.placeholder_id],
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([stop]),
                    cache=cache,
                )
            new = [int(token) for token in output[0, -min(output.shape[1], limit) :]]
            state.tokens, state.cut = len(new), stop.fired or (self.tokenizer.eos_token_id not in new)
            state.new_ids = new
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer's thread
            failure.append(error)
            streamer.end()

    def take_cache(self, key: bytes, ids: Sequence[int], state: Generation) -> Any:
        """A cache holding the longest prefix of `ids` the last turn computed (cropped), else an empty one; None
        when caching is off. The slot is emptied, so two concurrent answers never share a cache."""
        if not self.cfg.kv_cache:
            return None
        from transformers import DynamicCache

        with self.cache_lock:
            entry, self.prefix_cache = self.prefix_cache, None
        if entry is None or entry.key != key:
            return DynamicCache()
        common = min(common_prefix(entry.ids, ids), len(ids) - 1)  # at least one position is computed anew
        length = entry.cache.get_seq_length()
        if common <= 0:
            return DynamicCache()
        if length > common:
            entry.cache.crop(common - length)  # a negative count removes that many positions from the end
        state.cached = min(common, length)
        return entry.cache

    def put_cache(self, entry: PrefixCache) -> None:
        length = entry.cache.get_seq_length()
        with self.cache_lock:
            self.prefix_cache = PrefixCache(entry.key, list(entry.ids[:length]), entry.cache)

    def answer(
        self,
        question: str,
        history: Sequence[tuple[str, str]],
        inspection: Inspection,
        visual: torch.Tensor,
        evidence: Sequence[RegionEvidence] | None = None,
        guard: bool | None = None,
        check: bool | None = None,
    ) -> Answer:
        """One answer: the grounded opening for the question (guard), the model's continuation, every sentence
        checked against the inspection (check); None takes the preset's setting. Iterate it for the pieces."""
        question = check_question(question, self.cfg.max_question_chars)
        asked = read_question(question, self.cfg.defect_types)
        grounds = chat_grounds(inspection, evidence, self.cfg.defect_types, history)
        opening = answer_text(asked, grounds) if (self.cfg.guard if guard is None else guard) else None
        prompt = self.prompt_ids(system_text(inspection), history, question)
        checker = ClaimChecker(grounds, asked) if (self.cfg.check_claims if check is None else check) else None
        return Answer(self, prompt, visual, opening, checker, asked)


def visual_key(visual: torch.Tensor) -> bytes:
    """A digest of the visual tokens: cached keys/values are valid only for the same image tokens."""
    data = visual.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


def common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading ids the two sequences share."""
    count = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        count += 1
    return count


class SentenceStop:
    """A transformers stopping criterion: the model has added `limit` whole sentences after the opening."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, limit: int) -> None:
        self.tokenizer = tokenizer
        self.limit = limit
        self.fired = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """input_ids (B, n): the new tokens so far (generation from embeddings starts with none)."""
        text = str(self.tokenizer.decode(input_ids[0], skip_special_tokens=True))
        self.fired = len(SENTENCE_END.findall(text)) >= self.limit
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


class Answer:
    """One answer being streamed: iterate it for the text pieces; `report` and `text` are final once it ends."""

    def __init__(
        self,
        assistant: Assistant,
        prompt: list[int],
        visual: torch.Tensor,
        opening: str | None,
        checker: ClaimChecker | None,
        question: Question,
    ) -> None:
        self.assistant, self.prompt, self.visual = assistant, prompt, visual
        self.opening, self.checker, self.question = opening, checker, question
        self.generation = Generation()
        self.text = ""

    @property
    def report(self) -> CheckReport | None:
        return None if self.checker is None else self.checker.report

    def __iter__(self) -> Iterator[str]:
        pieces = self.assistant.continuation(self.prompt, self.visual, self.opening, self.generation)
        if self.checker is not None:
            self.checker.truncated = lambda: self.generation.cut
            stream = self.checker.stream(pieces, self.opening or "")
        else:
            stream = itertools.chain([self.opening] if self.opening else [], pieces)
        shown = []
        for piece in stream:
            shown.append(piece)
            yield piece
        self.text = "".join(shown).strip()


# ---------------------------------------------------------------- the chat session


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    guarded: bool  # the answer opened with the grounded facts its question asks for (guard.expected_opening)
    contradicts: bool  # the answer as shown still states a fact the Inspection does not hold (claims.check_answer)
    checks: CheckReport | None = None  # what the claim checker did; None with the checker off


@dataclass
class ImageContext:
    """One inspected image: what the assistant is told about it, computed once and reused by every turn."""

    pixels: np.ndarray  # (H, W, 3) uint8
    source: str | None
    embedding: torch.Tensor  # (1, D) global image embedding; kept when only the references change
    inspection: Inspection
    visual: torch.Tensor  # (n_visual, hidden) image token + prompt embeddings
    patches: list[torch.Tensor] | None = None  # the backbone's raw patches of the image, per stage (1, C, h, w)
    evidence: list[RegionEvidence] | None = None  # per region, its best good match; computed on first need


class ChatSession(ChoosesReferences):
    """Multi-turn chat about one inspected image; follow-ups reuse the cached inspection and embeddings."""

    def __init__(
        self,
        assistant: Assistant,
        class_name: str | None = None,
        sensitivity: float = 0.0,
        guard: bool | None = None,  # None: the preset's; False lets a bench measure the unguarded model
        check: bool | None = None,  # None: the preset's; False shows the model's sentences unchecked
    ) -> None:
        if assistant.inspector is None:
            raise ValueError("a ChatSession needs an assistant built with its Inspector")
        self.assistant = assistant
        self.inspector: Inspector = assistant.inspector
        self.class_name = class_name
        self.sensitivity = sensitivity
        self.guard = assistant.cfg.guard if guard is None else guard
        self.check = assistant.cfg.check_claims if check is None else check
        self.references: References | None = None
        self.reference_sources: list[str] = []
        self.evidence_source: EvidenceSource | None = None  # the references' pixels and features for evidence
        self.context: ImageContext | None = None
        self.history: list[Turn] = []
        self.checks = CheckTally()  # the claim checker's work over this session

    @property
    def inspection(self) -> Inspection:
        if self.context is None:
            raise ValueError("no image yet: show an image first (/image PATH)")
        return self.context.inspection

    def reinspect(self) -> None:
        """A shown image against new references: a new inspection (its encoding kept), the history cleared."""
        if self.context is not None:
            encoded = (self.context.embedding, self.context.patches or [])
            self.context = self._context(self.context.pixels, self.context.source, encoded)
            self.history = []

    def show(self, image: ImageSource, source: str | None = None) -> Inspection:
        """Inspect a new image and encode it once; the conversation starts over."""
        pixels = load_image(image, name=source)
        self.context = self._context(pixels, source, None)
        self.history = []
        return self.context.inspection

    def _context(
        self, pixels: np.ndarray, source: str | None, encoded: tuple[torch.Tensor, list[torch.Tensor]] | None
    ) -> ImageContext:
        """A new inspection of the image; `encoded` (embedding, patches) is reused when only the references change."""
        inspection = self.inspector.inspect(pixels, self.references, self.class_name, source, self.sensitivity)
        if encoded is None:
            features = self.inspector.backbone.encode([pixels], embedding=True)
            encoded = (features.embedding, list(features.patches))  # (1, D), per stage (1, C, h, w)
        assistant = self.assistant
        with torch.inference_mode():
            visual = assistant.visual_tokens(encoded[0].to(assistant.device), assistant.map_input(inspection))[0]
        return ImageContext(pixels, source, encoded[0], inspection, visual, encoded[1])

    def evidence(self) -> list[RegionEvidence] | None:
        """Per region, the good reference and place that match it best (computed once per image; the references'
        features once per reference set); None without references."""
        context = self.context
        if context is None or self.evidence_source is None:
            return None
        if context.evidence is None:
            context.evidence = self.evidence_source.evidence(context.pixels, context.inspection, context.patches)
        return context.evidence

    def reset(self) -> None:
        """Forget the conversation; the image and its inspection stay."""
        self.history = []

    def stream(self, question: str) -> Iterator[str]:
        """The answer as text pieces; the turn joins the history once the answer is complete."""
        context = self.context
        if context is None:
            check_question(question, self.assistant.cfg.max_question_chars)
            raise QuestionError("no image yet: show an image first (/image PATH)")
        history = [(turn.question, turn.answer) for turn in self.history]
        needs_evidence = read_question(question, self.assistant.cfg.defect_types).kind == "compare"
        evidence = self.evidence() if needs_evidence or context.evidence is not None else None
        answer = self.assistant.answer(question, history, context.inspection, context.visual, evidence, self.guard,
                                       self.check)  # fmt: skip
        yield from answer
        grounds = Grounds(context.inspection, None if evidence is None else tuple(evidence))
        conflict = bool(check_answer(answer.text, grounds, answer.question))
        self.history.append(
            Turn(answer.question.text, answer.text, answer.opening is not None, conflict, answer.report)
        )
        if answer.report is not None:
            self.checks.add(answer.report)

    def ask(self, question: str) -> str:
        """The whole answer at once (greedy, so the same as the streamed one)."""
        return "".join(self.stream(question)).strip()

    def transcript(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        for turn in self.history:
            messages.append({"role": "user", "content": turn.question})
            answer = {"content": turn.answer, "guarded": turn.guarded, "contradicts": turn.contradicts}
            if turn.checks is not None:
                answer["checks"] = turn.checks.to_dict()
            messages.append({"role": "assistant", **answer})
        return messages

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record of the session: image, references, inspection, transcript and the checker's tally."""
        context = self.context
        return {
            "image": None if context is None else context.source,
            "references": self.reference_sources,
            "class_name": self.class_name,
            "preset": self.assistant.preset.name,
            "answerer": "llm",
            "inspection": None if context is None else context.inspection.to_dict(),
            "evidence": None
            if context is None or context.evidence is None
            else [e.to_dict() for e in context.evidence],
            "transcript": self.transcript(),
            "checks": self.checks.to_dict(),
        }


# ---------------------------------------------------------------- building, saving, loading


def placeholder_id(tokenizer: PreTrainedTokenizerBase) -> int:
    found = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if not isinstance(found, int) or found == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_PLACEHOLDER} token; add it with add_placeholder")
    return found


def embedding_tables(model: PreTrainedModel) -> list[torch.Tensor]:
    """The (V, hidden) input embedding table and the output one (the same tensor when tied)."""
    modules = (model.get_input_embeddings(), model.get_output_embeddings())
    return [module.weight for module in modules if module is not None and isinstance(module.weight, torch.Tensor)]


def add_placeholder(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> int:
    """Register IMAGE_PLACEHOLDER as a special token; new embedding rows are zero (the input row is always
    replaced, and a zero output row gives the token no preference; generation suppresses it anyway)."""
    tokenizer.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
    rows = int(embedding_tables(model)[0].shape[0])
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for table in embedding_tables(model):
                table[rows:] = 0
    return placeholder_id(tokenizer)


def build_assistant(
    preset: str | Preset = "default", inspector: Inspector | None = None, inference: bool = False
) -> Assistant:
    """The one factory: LLM + LoRA + prompt learner + projection (trained parts loaded when the preset names them).

    The Inspector is built from the preset unless given (its backbone sets the projection's input width). With
    `inference`, the LoRA update is merged into the frozen weights (one matrix product per layer instead of three)
    and the LLM is quantised as the preset says: for chat only, never for training.
    """
    from anomalygpt.config import Preset, load_preset, resolve_device
    from anomalygpt.inspection import build_inspector

    cfg = preset if isinstance(preset, Preset) else load_preset(preset)
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))  # "auto" in a preset built in code
    inspector = inspector if inspector is not None else build_inspector(cfg)
    loaded = load_llm(cfg.llm)
    add_placeholder(loaded.tokenizer, loaded.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.assistant.seed)
        prompt_learner = PromptLearner(cfg.assistant.prompt_learner, loaded.hidden_size)
        projection = ImageProjection(inspector.backbone.embed_dim, loaded.hidden_size)
        llm = attach_lora(loaded.model, cfg.llm.lora)
    assistant = Assistant(llm, loaded.tokenizer, prompt_learner, projection, cfg, inspector)
    if cfg.assistant.weights:
        load_trained_parts(assistant, weights_folder(cfg.assistant.weights))
    assistant = assistant.to(cfg.device).eval()
    if inference:
        assistant.llm.merge_adapter()  # type: ignore[operator]
        if cfg.llm.quantize:
            quantize_llm(assistant.llm, cfg.llm.quantize)
    return assistant


def weights_folder(name: str) -> Path:
    from anomalygpt.inspection import weights_stem

    return weights_stem(name)


def parts_config(assistant: Assistant) -> dict[str, Any]:
    """What the trained parts depend on; a load checks every field against the assistant it goes into."""
    preset = assistant.preset
    return {
        "format": WEIGHTS_FORMAT,
        "placeholder": IMAGE_PLACEHOLDER,
        "hidden_size": int(assistant.projection.linear.out_features),
        "embed_dim": int(assistant.projection.linear.in_features),
        "prompt_learner": dataclasses.asdict(assistant.prompt_learner.cfg),
        "lora": dataclasses.asdict(preset.llm.lora),
        "backbone": {"name": preset.backbone.name, "image_size": preset.backbone.image_size},
    }


def save_assistant(assistant: Assistant, folder: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the trained parts (visual.safetensors + visual.json, lora/) to a temp sibling, then swap it in."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = folder.with_name(f".{folder.name}.{secrets.token_hex(6)}.tmp")
    old = folder.with_name(f".{folder.name}.{secrets.token_hex(6)}.old")
    try:
        temp.mkdir()
        state = {f"prompt_learner.{k}": v for k, v in assistant.prompt_learner.state_dict().items()}
        state |= {f"projection.{k}": v for k, v in assistant.projection.state_dict().items()}
        save_module(temp / VISUAL_STEM, state, {**parts_config(assistant), **dict(extra or {})})
        assistant.llm.save_pretrained(temp / LORA_DIR, save_embedding_layers=False)  # type: ignore[operator]
        if folder.exists():
            os.replace(folder, old)
        os.replace(temp, folder)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_trained_parts(assistant: Assistant, folder: Path) -> None:
    """Load prompt learner, projection and LoRA from a save_assistant folder, strictly."""
    expected_keys = {f"prompt_learner.{k}" for k in assistant.prompt_learner.state_dict()}
    expected_keys |= {f"projection.{k}" for k in assistant.projection.state_dict()}
    state, config = load_module(folder / VISUAL_STEM, expected_keys)
    check_parts_config(config, parts_config(assistant), folder)
    for prefix, module in (("prompt_learner.", assistant.prompt_learner), ("projection.", assistant.projection)):
        load_into(module, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, str(folder))
    load_adapter(assistant.llm, folder / LORA_DIR)


def check_parts_config(found: Mapping[str, Any], expected: Mapping[str, Any], folder: Path) -> None:
    differing = [key for key in expected if json.dumps(found.get(key)) != json.dumps(expected[key])]
    if differing:
        details = "; ".join(f"{key}: saved {found.get(key)!r}, this preset {expected[key]!r}" for key in differing)
        raise WeightsError(f"{folder}: assistant weights do not fit this preset ({details})")


def load_adapter(llm: nn.Module, folder: Path) -> None:
    """The LoRA weights peft saved, into the adapter attach_lora created; any key mismatch is an error."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = folder / ADAPTER_FILE
    if not path.is_file():
        raise WeightsError(f"{path}: LoRA adapter file not found")
    state = load_file(str(path))
    check_keys(set(state), set(get_peft_model_state_dict(llm, save_embedding_layers=False)), str(path))
    try:
        set_peft_model_state_dict(llm, state)
    except RuntimeError as error:
        raise WeightsError(f"{path}: {' '.join(str(error).split())[:300]}") from error
