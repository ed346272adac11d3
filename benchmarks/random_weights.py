"""A transformers model in random weights, saved with a tokenizer, for benchmarks that need a checkpoint of a
shape no one can download here (the GPU roofline's Llamas, the published full-size configs, a code model
with FIM tokens); the byte-level tokenizer with chosen special tokens is also the tests' (tests/code_models.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_random_checkpoint(config, folder: Path, dtype: torch.dtype) -> Path:
    """Build the model of `config` (a transformers config) in random weights of `dtype` and save it in
    `folder` with a one-word-per-id tokenizer (prompts are token ids; the engine still wants a tokenizer).
    Reused when already complete: the tokenizer is written last."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM

    if (folder / "tokenizer.json").exists():
        return folder
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    del model
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(config.vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def write_byte_tokenizer(
    folder: Path,
    special: list[str],
    added: list[str] = (),
    chat_template: str | None = None,
    eos: str | None = None,
    bos: str | None = None,
    prefix_tokens: list[str] = (),
) -> int:
    """A byte-level BPE tokenizer.json (256 byte tokens, no merges, so any text round-trips) plus `special`
    tokens, `added` plain added tokens (as Qwen's `<tool_call>`), a tokenizer_config.json with the chat
    template, EOS / BOS texts, and `prefix_tokens` the tokenizer puts before every text (GLM's
    `[gMASK]<sop>`, or BOS). Returns the vocabulary size, for the model's config."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    from fitllm.loader.tokenizer import _byte_level_decoder

    vocab = {ch: b for ch, b in _byte_level_decoder().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    if prefix_tokens:
        head = " ".join(prefix_tokens)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{head} $A",
            pair=f"{head} $A $B",
            special_tokens=[(t, tok.token_to_id(t)) for t in prefix_tokens],
        )
    tok.save(str(folder / "tokenizer.json"))
    config = {"chat_template": chat_template, "eos_token": eos, "bos_token": bos}
    (folder / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in config.items() if v is not None})
    )
    return tok.get_vocab_size(with_added_tokens=True)
