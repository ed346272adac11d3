"""Tokenizers: Hugging Face tokenizer.json as is, or a fast tokenizer built from a GGUF vocabulary.

Both end as a `tokenizers.Tokenizer` (Rust, fast) plus the facts generation needs: BOS/EOS ids, whether
to prepend BOS, and the chat template (rendered with a sandboxed Jinja environment, as transformers does).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as FastTokenizer
from tokenizers.decoders import DecodeStream

from fitllm.loader.chat_template import DEFAULT_MAX_CHARS, DEFAULT_TIMEOUT_S, render_chat_template
from fitllm.loader.fim import GGUF_FIM_KEYS

if TYPE_CHECKING:
    from fitllm.loader.gguf_reader import GGUFFile

# Pre-tokenizer split patterns for GGUF `tokenizer.ggml.pre` values (as llama.cpp defines them).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4


@dataclass
class Tokenizer:
    """A fast tokenizer with the generation facts fitllm needs."""

    backend: FastTokenizer
    eos_token_ids: list[int]
    bos_token_id: int | None
    chat_template: str | None
    bos_token: str = ""
    eos_token: str = ""
    fim_token_ids: dict[str, int] = field(default_factory=dict)  # GGUF's fim_* ids by role (loader/fim.py)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> token ids (BOS added when the model expects it). Through the batch call without offsets:
        `Tokenizer.encode` holds the GIL for the whole encoding (an 8 MiB prompt stalled every other thread
        8 s), the batch call releases it, and skipping character offsets halves the time."""
        return self.backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_plain(self, text: str) -> list[int]:
        """`text` as plain text: a special token's string in it is spelled out, never that token (llama.cpp's
        parse_special=false). For text that is data, not markup: the code around a FIM cursor, which may
        well contain `<|fim_middle|>` (this repository's own fim.py does)."""
        return self._plain_backend.encode_batch_fast([text], add_special_tokens=False)[0].ids

    @functools.cached_property
    def _plain_backend(self) -> FastTokenizer:
        # A copy: the flag is the backend's, and the shared backend encodes chat prompts concurrently.
        plain = FastTokenizer.from_str(self.backend.to_str())
        plain.encode_special_tokens = True
        return plain

    def token_id(self, text: str) -> int | None:
        """The id of the token whose text is exactly `text`, or None."""
        return self.backend.token_to_id(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text."""
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, also when they are part of a UTF-8 character (decoded alone,
        such a token is U+FFFD): what the OpenAI logprobs' `bytes` carry so a client can rebuild the text.
        Byte-level BPE pieces map back through GPT-2's byte alphabet, SentencePiece's <0xNN> pieces are
        that byte and its U+2581 a space; added (special) tokens are their text."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added_ids:
            return piece.encode()
        if isinstance(self.backend.decoder, decoders.ByteLevel):
            table = _byte_level_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    @functools.cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self.backend.get_added_tokens_decoder())

    def decode_stream(self, prompt_ids: list[int], skip_special_tokens: bool = True) -> DecodeStream:
        """An incremental decoder primed with the prompt's tail, so word-initial spaces come out right."""
        return DecodeStream(ids=list(prompt_ids[-4:]), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        max_chars: int = DEFAULT_MAX_CHARS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render chat messages (and the OpenAI `tools`, as transformers passes them) with the model's own
        template, bounded in size and time (fitllm/loader/chat_template.py)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        return render_chat_template(
            self.chat_template,
            max_chars=max_chars,
            timeout_s=timeout_s,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **({"tools": tools} if tools else {}),
        )


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte alphabet inverted: the printable character each byte is written as -> the byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def is_tiktoken_file(path: Path) -> bool:
    """Whether `path` is a tiktoken BPE file (lines of base64 token and rank; GLM-4's tokenizer.model), not
    a SentencePiece model (protobuf)."""
    with open(path, "rb") as f:
        first = f.readline(4096).strip()
    return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", first) is not None


def _missing_tokenizer_json(folder: Path) -> str:
    """What to do when a folder has no tokenizer.json: advice that works for what it does have."""
    custom = sorted(p.name for p in folder.glob("tokenization_*.py"))
    model = folder / "tokenizer.model"
    code = (
        f" (its {', '.join(custom)} is code from the checkpoint, and fitllm never executes it)"
        if custom
        else ""
    )
    if model.is_file() and is_tiktoken_file(model):
        # ChatGLM / GLM-4: the slow tokenizer is tiktoken-based, and its save_pretrained writes no
        # tokenizer.json; transformers' TikTokenConverter builds one from the file without running code.
        return (
            f"{folder} has no tokenizer.json, only tokenizer.model, a tiktoken BPE file{code}. Either pass "
            f"--tokenizer DIR, a folder with a tokenizer.json of the same vocabulary (the GLM-4 '-hf' "
            f"repositories, e.g. THUDM/glm-4-9b-chat-hf, ship one), or convert it once where transformers "
            f'and tiktoken are installed, in {folder}: python -c "import json; from '
            f"transformers.convert_slow_tokenizer import TikTokenConverter; "
            f"d = json.load(open('tokenizer_config.json'))['added_tokens_decoder']; "
            f"TikTokenConverter('tokenizer.model', extra_special_tokens=[d[k]['content'] for k in "
            f"sorted(d, key=int)]).converted().save('OUT/tokenizer.json')\" (the special tokens in id "
            f"order follow the BPE ranks), copy tokenizer_config.json into OUT and pass --tokenizer OUT"
        )
    if custom:
        return (
            f"{folder} has no tokenizer.json, only a custom tokenizer{code}. Convert it once, on a machine "
            f"where you trust that code: tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True); "
            f"a fast tokenizer's tok.save_pretrained(out) writes tokenizer.json, a slow one's does not: "
            f"PreTrainedTokenizerFast(tokenizer_object=transformers.convert_slow_tokenizer."
            f"convert_slow_tokenizer(tok)).save_pretrained(out); then pass --tokenizer out"
        )
    extra = " (only tokenizer.model is present)" if model.is_file() else ""
    return (
        f"{folder} has no tokenizer.json{extra}; fitllm needs the fast-tokenizer file. Create it once with "
        f"transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder)"
    )


def load_hf_tokenizer(folder: Path, eos_from_config: list[int]) -> Tokenizer:
    """tokenizer.json (+ tokenizer_config.json, generation_config.json) from a Hugging Face folder."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(_missing_tokenizer_json(folder))
    backend = FastTokenizer.from_file(str(path))
    tcfg: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next(
            (t["template"] for t in template if t.get("name") == "default"), template[0]["template"]
        )
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    eos_ids = list(eos_from_config)
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
        if gen_eos is not None:
            eos_ids = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
    eos_text = _token_text(tcfg.get("eos_token")) or ""
    if not eos_ids and eos_text and backend.token_to_id(eos_text) is not None:
        eos_ids = [backend.token_to_id(eos_text)]
    bos_text = _token_text(tcfg.get("bos_token")) or ""
    return Tokenizer(
        backend=backend,
        eos_token_ids=eos_ids,
        bos_token_id=backend.token_to_id(bos_text) if bos_text else None,
        chat_template=template,
        bos_token=bos_text,
        eos_token=eos_text,
    )


def _field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    return reader.fields.get(key, default)


def load_gguf_tokenizer(reader: GGUFFile) -> Tokenizer:
    """Build a byte-level BPE fast tokenizer from a GGUF file's vocabulary, merges and template."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer type {kind!r} is not supported yet (supported: 'gpt2' byte-level BPE); "
            f"load the Hugging Face folder of this model instead"
        )
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = FastTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre in _GGUF_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_GGUF_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre == "smollm":  # GPT-2 split with every digit on its own
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED
        ]
    )
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    bos_text = tokens[bos_id] if bos_id is not None else ""
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_text} $A", pair=f"{bos_text} $A $B", special_tokens=[(bos_text, bos_id)]
        )
    return Tokenizer(
        backend=backend,
        eos_token_ids=[eos_id] if eos_id is not None else [],
        bos_token_id=bos_id,
        chat_template=_field(reader, "tokenizer.chat_template"),
        bos_token=bos_text,
        eos_token=tokens[eos_id] if eos_id is not None else "",
        fim_token_ids=_gguf_fim_ids(reader),
    )


def _gguf_fim_ids(reader: GGUFFile) -> dict[str, int]:
    """The FIM token ids a GGUF file names (fitllm/loader/fim.py's keys), by role."""
    out = {}
    for role, keys in GGUF_FIM_KEYS.items():
        value = next((v for k in keys if (v := _field(reader, k)) is not None), None)
        if value is not None:
            out[role] = int(value)
    return out
