"""A transformers model in random weights, saved with a tokenizer, for benchmarks that need a checkpoint of a
shape no one can download here (the GPU roofline's Llamas, the published full-size configs)."""

from __future__ import annotations

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
