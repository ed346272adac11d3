"""Write a random-weight Llama checkpoint (HF layout: config.json, model.safetensors, tokenizer.json) fast:
one random tensor per distinct shape, cloned per layer (identical layers are fine for timing). Writes the
folder benchmarks.roofline.random_checkpoint would use, so the project's benches reuse it."""

import argparse
import time
from pathlib import Path

import torch


def build(size: str, root: Path, dtype_name: str = "bfloat16") -> Path:
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig

    from benchmarks.roofline import SIZES

    folder = root / f"llama-{size}-{dtype_name}"
    if (folder / "tokenizer.json").exists():
        return folder
    t0 = time.time()
    dtype = getattr(torch, dtype_name)
    cfg = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, **SIZES[size])
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        n = 1
        for d in shape:
            n *= d
        block = min(n, 1 << 22)  # one random block repeated: big tensors cost a copy, not an RNG pass
        r = (torch.randn(block, generator=g) * 0.02).to(dtype)
        return r.repeat(-(-n // block))[:n].view(*shape).clone()

    base = {
        "q": rnd(h, h),
        "k": rnd(kv, h),
        "v": rnd(kv, h),
        "o": rnd(h, h),
        "gate": rnd(i, h),
        "up": rnd(i, h),
        "down": rnd(h, i),
        "norm": torch.ones(h, dtype=dtype),
    }
    t = {"model.embed_tokens.weight": rnd(cfg.vocab_size, h), "model.norm.weight": base["norm"].clone()}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = rnd(cfg.vocab_size, h)
    for l in range(L):
        p = f"model.layers.{l}."
        for n in ("q", "k", "v", "o"):
            t[p + f"self_attn.{n}_proj.weight"] = base[n].clone()
        for n in ("gate", "up", "down"):
            t[p + f"mlp.{n}_proj.weight"] = base[n].clone()
        t[p + "input_layernorm.weight"] = base["norm"].clone()
        t[p + "post_attention_layernorm.weight"] = base["norm"].clone()
    folder.mkdir(parents=True, exist_ok=True)
    cfg.torch_dtype = dtype_name
    cfg.save_pretrained(folder)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del t, base
    tok = Tokenizer(models.WordLevel({f"t{k}": k for k in range(cfg.vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))  # last: marks the folder complete
    print(f"checkpoint {folder} written in {time.time() - t0:.1f}s", flush=True)
    return folder


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", required=True)
    ap.add_argument("--root", default="/tmp/fitllm-roofline")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    print(build(a.size, Path(a.root), a.dtype))
