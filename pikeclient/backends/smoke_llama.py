"""A tiny Llama-architecture model built locally: the tests' model (``llm=smoke_llama``), offline and fast.

It has random weights (fixed seed), so its answers are gibberish: it is a SMOKE MODEL that exercises
the real loading and generation path (``save_pretrained`` then ``from_pretrained``) without a download.
Its tokenizer is a byte-level BPE trained here on a small built-in text, with a chat template.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A model answers questions about science, history and code.
Explain why the sky is blue. Write a haiku about autumn leaves. Translate good morning into French.
What is the capital of France? Paris is the capital of France. Summarize the plot of Hamlet briefly.
List three prime numbers: two, three, five. How does a transformer language model generate text?
Retry with exponential backoff when the server answers 429 Too Many Requests or 503 Service Unavailable.
Latency, throughput, tokens per second and cost are measured for every call and logged to MLflow.
def add(a, b): return a + b  # Python functions, loops, lists and dictionaries.
"""


def build_tiny_llama(
    path: str | os.PathLike[str],
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 512,
    max_positions: int = 1024,
    seed: int = 0,
    chat_template: str | None = CHAT_TEMPLATE,
) -> Path:
    """Build, save and return the folder of a tiny random Llama with its tokenizer.

    The folder appears atomically (built aside, then renamed), so parallel sweep jobs never load a
    half-written model.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size, chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,  # wide enough that greedy output varies (the default repeats one token)
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            pass  # another process finished first; its copy is identical (same seed)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _train_tokenizer(vocab_size: int, chat_template: str | None) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def ensure_smoke_model(path: str | os.PathLike[str]) -> str:
    """The smoke model's folder, built on first use."""
    target = Path(path)
    if not (target / "config.json").exists():
        build_tiny_llama(target)
    return str(target)


def smoke_client(path: str, **kwargs: Any) -> Any:
    """An :class:`HFLocalClient` on the smoke model (the ``llm=smoke_llama`` config's target)."""
    from pikeclient.backends.hf_meta_llama import HFLocalClient

    return HFLocalClient(model=ensure_smoke_model(path), **kwargs)
