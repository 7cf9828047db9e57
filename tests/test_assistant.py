"""Assistant and ChatSession on a tiny random Llama with a byte-level BPE tokenizer, and the real 64 px Inspector."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import texture_crops, with_dark_blob
from tiny_llm import bpe_tokenizer, save_chat_llm

from anomalygpt.assistant import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    Assistant,
    AssistantConfig,
    ChatSession,
    QuestionError,
    build_assistant,
    check_question,
    conversation_example,
    save_assistant,
)
from anomalygpt.backbones import BackboneConfig, WeightsError
from anomalygpt.config import Preset
from anomalygpt.grounded import preamble, region_sentence
from anomalygpt.guard import contradicts, expected_opening, presence_polarity, read_question
from anomalygpt.inspection import Inspection, References
from anomalygpt.llm import LLMConfig
from anomalygpt.memory import MemoryConfig
from anomalygpt.prompt_learner import PromptLearnerConfig
from simulation.conversations import QUESTIONS, conversation_for

GOOD = texture_crops(1, size=64, seed=99)[0]
BAD = with_dark_blob(texture_crops(1, size=64, seed=98)[0], center=(46, 46), radius=7)  # bottom right
DEFECT_QUESTION = "Is there an anomaly in this image?"
# The training conversations' intents and the question kinds they are read as.
KINDS_OF_INTENT = {
    "anomaly": ("anomaly",),
    "where": ("where",),
    "count": ("count",),
    "size": ("size",),
    "appearance": ("describe", "kind"),
    "confidence": ("confidence",),
    "where_exactly": ("where_exactly",),
    "near_edge": ("near",),
    "next_check": ("next_check",),
}


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Preset:
    folder = save_chat_llm(tmp_path_factory.mktemp("chat-llm"))
    return Preset(
        name="tiny",
        backbone=BackboneConfig(image_size=64),
        memory=MemoryConfig(augment=True),  # brick crops: their rotations and flips are good patches too
        llm=LLMConfig(model=str(folder)),
        assistant=AssistantConfig(max_new_tokens=32),
    )


@pytest.fixture(scope="module")
def assistant(preset: Preset) -> Assistant:
    return build_assistant(preset)


@pytest.fixture(scope="module")
def references(assistant: Assistant) -> References:
    assert assistant.inspector is not None
    return assistant.inspector.fit(texture_crops(4, size=64, seed=11))


@pytest.fixture(scope="module")
def verdicts(assistant: Assistant, references: References) -> dict[str, Inspection]:
    assert assistant.inspector is not None
    return {name: assistant.inspector.inspect(image, references) for name, image in (("good", GOOD), ("bad", BAD))}


def session_with(
    assistant: Assistant, references: References, guard: bool | None = None, check: bool | None = None
) -> ChatSession:
    session = ChatSession(assistant, guard=guard, check=check)
    session.references = references  # indexed once for the module; set_references has its own test
    return session


def test_inspections_used_below_have_the_expected_verdicts(verdicts: dict[str, Inspection]) -> None:
    assert not verdicts["good"].is_anomalous
    assert verdicts["bad"].is_anomalous and verdicts["bad"].regions[0].location == "bottom right"


def test_widths_come_from_the_llm_and_backbone(assistant: Assistant) -> None:
    assert assistant.inspector is not None
    hidden = assistant.llm.get_input_embeddings().weight.shape[1]
    assert hidden == assistant.llm.config.hidden_size == 32
    assert assistant.projection.linear.in_features == assistant.inspector.backbone.embed_dim == 1280
    assert assistant.projection.linear.out_features == hidden
    assert assistant.n_visual == 1 + PromptLearnerConfig().n_tokens == 19


def test_placeholder_is_one_added_special_token_with_zero_rows(assistant: Assistant) -> None:
    tokenizer = assistant.tokenizer
    assert assistant.placeholder_id == len(bpe_tokenizer()) == len(tokenizer) - 1
    ids = tokenizer.encode(f"{IMAGE_PLACEHOLDER * 3}\nIs it ok?", add_special_tokens=False)
    assert ids[:3] == [assistant.placeholder_id] * 3 and assistant.placeholder_id not in ids[3:]
    table = assistant.llm.get_input_embeddings().weight
    assert table.shape[0] == len(tokenizer)
    assert torch.count_nonzero(table[assistant.placeholder_id]) == 0
    assert tokenizer.decode(ids, skip_special_tokens=True) == "\nIs it ok?"


def test_visual_tokens_fill_exactly_the_placeholder_positions(assistant: Assistant) -> None:
    ids = assistant.prompt_ids("facts", [("Q1?", "A1.")], "Where is it?")
    visual = torch.randn(assistant.n_visual, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds = assistant.input_embeddings(torch.tensor([ids]), visual[None])[0]  # (L, 32)
        table = assistant.llm.get_input_embeddings().weight
    slots = [i for i, token in enumerate(ids) if token == assistant.placeholder_id]
    assert len(slots) == assistant.n_visual and slots == list(range(slots[0], slots[0] + assistant.n_visual))
    assert torch.equal(embeds[slots], visual)  # in order: image token first, then the prompts
    others = [i for i in range(len(ids)) if i not in slots]
    assert torch.equal(embeds[others], table[torch.tensor(ids)[others]])


def test_placeholder_count_mismatch_raises(assistant: Assistant) -> None:
    ids = torch.tensor([assistant.prompt_ids("facts", [], "Is it ok?")])
    n = assistant.n_visual
    with pytest.raises(ValueError, match=rf"placeholder tokens per sequence \[{n}\] do not match the 1 x {n - 1}"):
        assistant.input_embeddings(ids, torch.zeros(1, n - 1, 32))
    # equal totals over the batch are not enough: each sequence must hold exactly its own tokens
    uneven = ids.repeat(2, 1)
    first = int((uneven[1] == assistant.placeholder_id).nonzero()[0])
    uneven[1, first] = uneven[1, first - 1]
    uneven[0, first - 1] = assistant.placeholder_id
    with pytest.raises(ValueError, match=rf"\[{n + 1}, {n - 1}\]"):
        assistant.input_embeddings(uneven, torch.zeros(2, n, 32))


def test_training_labels_cover_the_answers_only_and_match_the_chat_prompt(assistant: Assistant) -> None:
    turns = [("Is there a defect?", "Yes, one."), ("Where?", "At the top.")]
    example = conversation_example(assistant.tokenizer, "SYS", turns, assistant.n_visual)
    ids, labels = example.input_ids, example.labels
    assert len(ids) == len(labels)
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    spans = np.split(np.array(labelled), np.nonzero(np.diff(labelled) > 1)[0] + 1)
    assert len(spans) == 2
    decode = assistant.tokenizer.decode
    assert [decode([ids[i] for i in span]) for span in spans] == ["Yes, one.<|im_end|>", "At the top.<|im_end|>"]
    assert all(labels[i] == ids[i] for i in labelled)
    assert decode([ids[spans[0][-1] + 1]]) == "\n" and labels[spans[0][-1] + 1] == IGNORE_INDEX
    # what precedes each answer is exactly what the chat sends before generating it
    assert ids[: spans[0][0]] == assistant.prompt_ids("SYS", [], turns[0][0])
    assert ids[: spans[1][0]] == assistant.prompt_ids("SYS", turns[:1], turns[1][0])


def test_old_history_is_dropped_but_the_image_tokens_stay(assistant: Assistant) -> None:
    history = [(f"Question {i}?", f"Answer {i}.") for i in range(6)]
    ids = assistant.prompt_ids("SYS", history, "Last?")
    text = assistant.tokenizer.decode(ids)
    assert ids.count(assistant.placeholder_id) == assistant.n_visual
    kept = assistant.cfg.history_turns
    assert "Question 1?" not in text and all(f"Question {i}?" in text for i in range(6 - kept, 6))
    assert text.index(IMAGE_PLACEHOLDER) < text.index(f"Question {6 - kept}?")


def test_follow_ups_never_re_encode_the_image(assistant: Assistant, references: References) -> None:
    assert assistant.inspector is not None
    calls: list[int] = []
    hook = assistant.inspector.backbone.register_forward_hook(lambda *args: calls.append(1))
    try:
        session = session_with(assistant, references)
        first = session.show(BAD, source="bad.png")
        after_show = len(calls)
        assert after_show >= 2  # the inspection, and the global embedding
        session.ask(DEFECT_QUESTION)
        session.ask("Where is the defect located?")
        session.ask("How many defects do you see?")
        assert len(calls) == after_show and len(session.history) == 3
        assert session.inspection is first
        second = session.show(GOOD, source="good.png")
        assert len(calls) > after_show and second is not first and not second.is_anomalous
        assert session.history == []
    finally:
        hook.remove()


def test_new_references_start_a_new_inspection_of_the_same_image(assistant: Assistant, references: References) -> None:
    session = session_with(assistant, references)
    session.show(BAD, source="bad.png")
    session.ask(DEFECT_QUESTION)
    assert session.context is not None
    embedding, before = session.context.embedding, session.inspection
    session.set_references(texture_crops(3, size=64, seed=21), ["a.png", "b.png", "c.png"])
    assert session.inspection is not before and session.inspection.n_references == 3
    assert session.context.embedding is embedding and session.history == []
    assert session.reference_sources == ["a.png", "b.png", "c.png"]


def script_answers(assistant: Assistant, sentence: str) -> torch.utils.hooks.RemovableHandle:
    """Make the model answer `sentence` whatever it is asked: a strong logit bias on each next token of it."""
    target = [*assistant.tokenizer.encode(sentence, add_special_tokens=False), assistant.tokenizer.eos_token_id]
    step = [0]

    def bias(module: torch.nn.Module, args: object, kwargs: dict[str, object], output: Any) -> Any:
        if kwargs.get("inputs_embeds") is not None:  # the prompt step of a new answer
            step[0] = 0
        if step[0] < len(target):
            output.logits[..., target[step[0]]] += 1e4
        step[0] += 1
        return output

    return assistant.llm.get_base_model().register_forward_hook(bias, with_kwargs=True)


@pytest.mark.parametrize(
    ("image", "model_says", "verdict_says"),
    [(BAD, " No, it looks normal.", "Yes"), (GOOD, " Yes, it is defective.", "No")],
)
def test_the_verdict_opens_the_answer_and_a_contradicting_sentence_is_not_shown(
    assistant: Assistant, references: References, image: np.ndarray, model_says: str, verdict_says: str
) -> None:
    hook = script_answers(assistant, model_says)
    try:
        unguarded = session_with(assistant, references, guard=False, check=False)
        unguarded.show(image)
        wrong = unguarded.ask(DEFECT_QUESTION)
        guarded = session_with(assistant, references)
        guarded.show(image)
        right = guarded.ask(DEFECT_QUESTION)
    finally:
        hook.remove()
    inspection = guarded.inspection
    assert wrong == model_says.strip() and contradicts(wrong, inspection, DEFECT_QUESTION)
    assert unguarded.history[0].contradicts and not unguarded.history[0].guarded
    assert unguarded.history[0].checks is None
    # the grounded opening states the verdict; the model's own sentence contradicts it and is dropped (the
    # sentence that would replace it, the verdict's, was already said)
    opening = expected_opening(DEFECT_QUESTION, inspection)
    assert opening.startswith(" ".join([*preamble(inspection), verdict_says + ":"])) and right == opening
    turn = guarded.history[0]
    assert turn.guarded and not turn.contradicts and turn.checks is not None
    assert turn.checks.raw == opening + model_says
    assert [(r.path, r.facts) for r in turn.checks.repairs] == [("dropped", ("verdict",))]
    assert guarded.checks.to_dict() == {"answers": 1, "fired": 1, "paths": {"dropped": 1}, "facts": {"verdict": 1}}
    reply = expected_opening("Is this part OK?", inspection).removeprefix(" ".join(preamble(inspection))).strip()
    assert reply.startswith("No:" if inspection.is_anomalous else "Yes:")


def test_every_question_opens_with_its_grounded_answer(assistant: Assistant, references: References) -> None:
    session = session_with(assistant, references)
    inspection = session.show(BAD)
    questions = ("Is it near the edge?", "Where is the defect located?", "How sure are you?", "Tell me a joke")
    answers = [session.ask(question) for question in questions]
    assert [turn.guarded for turn in session.history] == [True] * len(questions)
    assert inspection.regions
    for question, answer in zip(questions, answers, strict=True):
        assert answer.startswith(expected_opening(question, inspection)), (question, answer)
        assert not session.history[questions.index(question)].contradicts


def test_a_wrong_place_is_replaced_by_the_regions_grounded_sentence(
    assistant: Assistant, references: References
) -> None:
    session = session_with(assistant, references)
    inspection = session.show(BAD)
    (region,) = inspection.regions
    assert region.location == "bottom right"
    hook = script_answers(assistant, " It is in the top left.")
    try:
        answer = session.ask(DEFECT_QUESTION)
    finally:
        hook.remove()
    opening = expected_opening(DEFECT_QUESTION, inspection)
    assert answer == f"{opening} {region_sentence(region)}"
    (repair,) = session.history[0].checks.repairs  # type: ignore[union-attr]
    assert (repair.sentence, repair.path, repair.facts) == ("It is in the top left.", "replaced", ("location",))


def test_streamed_answer_equals_the_whole_answer(assistant: Assistant, references: References) -> None:
    one, two = session_with(assistant, references), session_with(assistant, references)
    one.show(BAD)
    two.show(BAD)
    hook = script_answers(assistant, " Look at it closely.")
    try:
        pieces = list(two.stream(DEFECT_QUESTION))
        whole = one.ask(DEFECT_QUESTION)
    finally:
        hook.remove()
    opening = expected_opening(DEFECT_QUESTION, one.inspection)
    assert len(pieces) >= 2 and pieces[0] == opening  # the grounded opening arrives first, whole
    assert whole == "".join(pieces).strip() == two.history[0].answer == opening + " Look at it closely."
    record = one.to_dict()
    assert record["inspection"]["verdict"] == "anomalous"
    assert record["transcript"][0] == {"role": "user", "content": DEFECT_QUESTION}
    said = record["transcript"][1]
    assert {key: said[key] for key in ("role", "content", "guarded", "contradicts")} == {
        "role": "assistant",
        "content": whole,
        "guarded": True,
        "contradicts": False,
    }
    assert said["checks"]["sentences"] == 1 and said["checks"]["paths"] == {}
    assert record["checks"] == {"answers": 1, "fired": 0, "paths": {}, "facts": {}}


def test_questions_are_checked(assistant: Assistant, references: References) -> None:
    assert check_question("  Is  it\nok? ", 50) == "Is it ok?"
    with pytest.raises(QuestionError, match="^empty question"):
        check_question(" \n ", 50)
    with pytest.raises(QuestionError, match="^question too long: 51 characters, at most 50$"):
        check_question("x" * 51, 50)
    session = session_with(assistant, references)
    with pytest.raises(QuestionError, match="no image yet"):
        session.ask("Is it ok?")
    session.show(GOOD)
    with pytest.raises(QuestionError, match="question too long"):
        session.ask("why " * 200)
    assert session.history == []


def test_contradicts_on_hand_written_answers(verdicts: dict[str, Inspection]) -> None:
    good, bad = verdicts["good"], verdicts["bad"]
    cases = [  # answer, question, contradicts the bad (anomalous) inspection, contradicts the good one
        ("No, it looks fine.", None, True, False),
        ("Yes, there is a scratch at the top.", None, False, True),
        ("The part is not defective.", None, True, False),
        ("I count 0 anomalous regions.", "How many defects?", True, False),
        ("There are 2 anomalous regions.", "How many defects?", False, True),
        ("It is at the top of the image.", "Where is it?", False, False),
        ("No, it stays 20 px from the border.", "Is it near the edge?", False, False),
        ("No.", "Is this part OK?", False, True),  # "no, it is not OK" = defective
        ("Yes, it is free of defects.", "Is it free of defects?", True, False),
        ("The image looks normal, and 2 anomalous regions stand out.", None, True, True),  # says both
        ("Nothing: 0% of the image looks anomalous.", "How big is it?", True, False),
        ("About 1.0% of the image; I would call that medium.", "Is the defect big or small?", False, False),
        ("No, I found no anomalous region at the edge.", "Is it at the edge of the image?", False, False),
        ("No anomalous region; the image looks normal.", "Where is it?", True, False),
    ]
    for answer, question, against_bad, against_good in cases:
        assert contradicts(answer, bad, question) is against_bad, answer
        assert contradicts(answer, good, question) is against_good, answer


def test_simulated_answers_agree_with_their_own_verdict_and_intents_are_recognised(
    verdicts: dict[str, Inspection],
) -> None:
    image = BAD
    blob = np.zeros((64, 64), bool)
    blob[40:52, 40:52] = True
    for seed in range(30):
        rng = np.random.default_rng(seed)
        mask = blob if seed % 2 else np.zeros_like(blob)
        conversation = conversation_for(image, mask, "spot" if seed % 2 else None, rng)
        same, other = (verdicts["bad"], verdicts["good"]) if seed % 2 else (verdicts["good"], verdicts["bad"])
        for turn in conversation["turns"]:
            assert read_question(turn["question"]).kind in KINDS_OF_INTENT[turn["intent"]], turn["question"]
            assert not contradicts(turn["answer"], same, turn["question"]), turn["answer"]
            if turn["intent"] == "anomaly":
                assert contradicts(turn["answer"], other, turn["question"]), turn["answer"]
    for intent, questions in QUESTIONS.items():
        assert all(read_question(q).kind in KINDS_OF_INTENT[intent] for q in questions), intent


def test_presence_polarity_edge_cases() -> None:
    assert presence_polarity("Is there a defect?") == "defect"
    assert presence_polarity("Any cracks?") == "defect"
    assert presence_polarity("Is the part OK?") == "normal"
    assert presence_polarity("Is it free of defects?") == "normal"
    assert presence_polarity("Is it defect-free?") == "normal"
    assert presence_polarity("Is the defect dark?") is None  # presupposes one
    assert presence_polarity("Is it good or bad?") is None
    assert presence_polarity("What is this?") is None


def test_trained_parts_round_trip_strictly(preset: Preset, assistant: Assistant, tmp_path: Path) -> None:
    source = build_assistant(preset, assistant.inspector)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in source.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    folder = save_assistant(source, tmp_path / "parts", {"note": "test"})
    assert sorted(p.name for p in folder.iterdir()) == ["lora", "visual.json", "visual.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"]  # no temp folder left
    trained = dataclasses.replace(preset, assistant=dataclasses.replace(preset.assistant, weights=str(folder)))
    loaded = build_assistant(trained, assistant.inspector)
    expected = {n: p for n, p in source.named_parameters() if p.requires_grad}
    found = {n: p for n, p in loaded.named_parameters() if p.requires_grad}
    assert set(found) == set(expected) and all(torch.equal(found[n], expected[n]) for n in expected)
    save_assistant(source, folder)  # replacing an existing folder works too
    other = dataclasses.replace(
        trained,
        assistant=dataclasses.replace(trained.assistant, prompt_learner=PromptLearnerConfig(grid=2, base_prompts=4)),
    )
    with pytest.raises(WeightsError, match="do not fit this preset \\(prompt_learner: saved"):
        build_assistant(other, assistant.inspector)
    (folder / "lora" / "adapter_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="LoRA adapter file not found"):
        build_assistant(trained, assistant.inspector)


def test_the_key_value_cache_is_reused_across_turns_and_changes_no_answer(
    preset: Preset, assistant: Assistant, references: References
) -> None:
    assert assistant.inspector is not None
    uncached = build_assistant(
        dataclasses.replace(preset, assistant=dataclasses.replace(preset.assistant, kv_cache=False)),
        assistant.inspector,
    )
    inspection = assistant.inspector.inspect(BAD, references)
    questions = ("Where is it?", "Why do you think so?", "What should I do next?")
    runs = {}
    for name, model in (("cached", assistant), ("uncached", uncached)):
        session = session_with(model, references)
        session.show(BAD)
        assert session.context is not None
        history: list[tuple[str, str]] = []
        reused = []
        for question in questions:
            answer = model.answer(question, history, inspection, session.context.visual)
            text = "".join(answer).strip()
            history.append((question, text))
            reused.append(answer.generation.cached)
        runs[name] = (history, reused)
    assert runs["cached"][0] == runs["uncached"][0]  # greedy answers are the same with and without the cache
    assert runs["uncached"][1] == [0, 0, 0]
    first, *follow_ups = runs["cached"][1]
    assert all(count > 100 for count in follow_ups)  # the system prompt, the facts and earlier turns are reused


def test_inference_merges_lora_and_can_quantise(preset: Preset, assistant: Assistant, tmp_path: Path) -> None:
    source = build_assistant(preset, assistant.inspector)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in source.llm.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    folder = save_assistant(source, tmp_path / "parts")
    trained = dataclasses.replace(preset, assistant=dataclasses.replace(preset.assistant, weights=str(folder)))
    plain, merged = build_assistant(trained, assistant.inspector), build_assistant(trained, assistant.inspector, True)
    ids = torch.tensor([plain.prompt_ids("facts", [], "Where is it?")])
    visual = torch.randn(1, plain.n_visual, 32, generator=generator)
    with torch.inference_mode():
        logits = [model.llm(inputs_embeds=model.input_embeddings(ids, visual)).logits for model in (plain, merged)]
    assert torch.allclose(logits[0], logits[1], atol=1e-4)
    assert not torch.equal(logits[0], build_logits(preset, assistant, ids, visual))  # the LoRA update matters
    quantised = dataclasses.replace(trained, llm=dataclasses.replace(trained.llm, quantize="int8"))
    small = build_assistant(quantised, assistant.inspector, inference=True)
    kinds = {type(module).__name__ for module in small.llm.modules()}
    assert "Linear" in kinds and any("quantized" in type(m).__module__ for m in small.llm.modules())
    session = ChatSession(small)
    session.references = assistant.inspector.fit(texture_crops(2, size=64, seed=11))
    session.show(BAD)
    assert session.ask("How many defects are there?").count("anomalous region") >= 1


def build_logits(preset: Preset, assistant: Assistant, ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Logits of the untrained assistant (LoRA update zero) on the same input."""
    untrained = build_assistant(preset, assistant.inspector)
    with torch.inference_mode():
        return untrained.llm(inputs_embeds=untrained.input_embeddings(ids, visual)).logits
