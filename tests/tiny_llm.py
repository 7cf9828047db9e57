"""Tiny random Llama models and tiny tokenizers with a chat template, shared by the LLM and assistant tests."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ["system", "user", "assistant", "is", "there", "a", "defect", "in", "this", "image", "yes", "no"]
VOCAB = SPECIALS + WORDS + [f"w{i}" for i in range(300 - len(SPECIALS) - len(WORDS))]  # 300 tokens
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
# SmolLM2's ChatML layout (without its default system turn): what the assistant meets in practice.
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BPE_VOCAB = 2000


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: one known id per word, so tests can spell out expected ids."""
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@functools.cache
def _bpe_json() -> str:
    """A byte-level BPE (as SmolLM2's) trained once on the conversation templates: any text, no unknowns."""
    from anomalygpt.assistant import SYSTEM_PROMPT
    from simulation.conversations import ANSWERS, QUESTIONS

    corpus = [SYSTEM_PROMPT, *(q for qs in QUESTIONS.values() for q in qs)]
    corpus += [a for cases in ANSWERS.values() for answers in cases.values() for a in answers]
    corpus += ["Verdict for the product: ANOMALOUS (defect found), NORMAL (no defect found), confidence high."]
    corpus += ["Yes No Yes, No, " * 20]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    return bpe.to_str()


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer with the ChatML template; eos is <|im_end|>."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bpe_json()),
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(
    seed: int = 0, vocab_size: int = len(VOCAB), max_positions: int = 128, init_std: float = 0.02
) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query, as SmolLM2: v_proj is narrower than q_proj
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_chat_llm(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama with the BPE tokenizer saved as a transformers model folder (what LLMConfig.model names)."""
    tokenizer = bpe_tokenizer()
    # Wider initial weights than Llama's 0.02: at width 32 those give near-uniform logits that LoRA can hardly move.
    tiny_llama(seed, vocab_size=len(tokenizer), max_positions=1024, init_std=0.2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
