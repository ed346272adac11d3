"""Fill-in-the-middle prompts built from the model's own FIM tokens.

The tokens come from GGUF metadata when the file names them (`tokenizer.ggml.fim_pre_token_id`, ...,
`fim_rep`, `fim_sep`, `fim_pad`; the older `prefix_token_id` / `suffix_token_id` / `middle_token_id`), else
from the vocabulary by text, as llama.cpp's vocabulary does (`FIM_TEXTS`). The order and wrapping is the
family's documented format:

- PSM, the default (Qwen2.5-Coder, StarCoder, DeepSeek-Coder, CodeGemma, CodeLlama):
  `[BOS] <PRE> prefix prompt <SUF> suffix <MID>`; with `<|repo_name|>` / `<|file_sep|>` tokens the other
  files go first in the repo-level pattern (Qwen2.5-Coder's report, arXiv 2409.12186), as llama.cpp's
  `/infill` writes it: `<REP>myproject\\n <SEP>name\\n text ... <SEP>filename\\n <PRE>...`; without them each
  file follows llama.cpp's `\\n\\n--- snippet ---\\n\\n` separator. One deliberate difference: llama.cpp puts
  the other files before BOS; here BOS stays first, where the model saw it in training.
- CodeGeeX4 (`<|code_prefix|>`, GLM-4's vocabulary): suffix first, inside a user turn, as its infilling
  guide writes it: `<|user|>\\n[###REFERENCE:\\n###PATH:name\\ntext\\n ...\\n]###PATH:\\n###LANGUAGE:\\n
  ###MODE:BLOCK\\n<|code_suffix|>suffix<|code_prefix|>prefix prompt<|code_middle|><|assistant|>\\n`.

Texts are tokenized piece by piece as plain text (a `<|fim_suffix|>` written in the code is spelled out, as
llama.cpp tokenizes /infill's inputs with parse_special=false) and the FIM tokens are inserted by id.
SentencePiece vocabularies (CodeLlama) get their dummy space before the suffix too, as llama.cpp's do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

# The texts llama.cpp's vocabulary recognises for each FIM role (llama-vocab.cpp), plus CodeGeeX4's.
FIM_TEXTS: dict[str, tuple[str, ...]] = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>", "<|code_prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<repo_name>"),
    "sep": ("<|file_sep|>", "<file_sep>"),
    "eot": ("<EOT>", "▁<EOT>"),  # CodeLlama's end of infill
}  # fmt: skip
# GGUF keys per role: the current names, then the ones before llama.cpp's FIM rework.
GGUF_FIM_KEYS: dict[str, tuple[str, ...]] = {
    "pre": ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id"),
    "suf": ("tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id"),
    "mid": ("tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id"),
    "pad": ("tokenizer.ggml.fim_pad_token_id",),
    "rep": ("tokenizer.ggml.fim_rep_token_id",),
    "sep": ("tokenizer.ggml.fim_sep_token_id",),
    "eot": ("tokenizer.ggml.eot_token_id",),
}
SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"  # llama.cpp's, for models without a file separator
DEFAULT_REPO = "myproject"  # llama.cpp's project name in the repo-level pattern
DEFAULT_FILENAME = "filename"  # llama.cpp's name of the file being edited


class _Vocab(Protocol):
    """What FIM needs of fitllm's Tokenizer (fitllm/loader/tokenizer.py)."""

    fim_token_ids: dict[str, int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def encode_plain(self, text: str) -> list[int]: ...

    def token_id(self, text: str) -> int | None: ...


@dataclass(frozen=True, slots=True)
class ExtraFile:
    """Another file given as context (llama.cpp's `input_extra` chunk)."""

    text: str
    filename: str = "tmp"  # llama.cpp's default


@dataclass(frozen=True, slots=True)
class FimTokens:
    """A model's FIM token ids by role and the family whose format it follows."""

    pre: int
    suf: int
    mid: int
    family: str  # "psm" | "codegeex"
    others: dict[str, int] = field(default_factory=dict)  # pad, rep, sep, eot when present

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end a middle (llama.cpp counts them end-of-generation): the FIM tokens themselves,
        pad, the repo and file separators, CodeLlama's <EOT>."""
        return sorted({self.pre, self.suf, self.mid, *self.others.values()})


def find_fim_tokens(vocab: _Vocab) -> FimTokens | None:
    """The model's FIM tokens (GGUF metadata first, then by text), or None when it has no prefix, suffix and
    middle tokens."""
    found: dict[str, int] = {}
    for role, texts in FIM_TEXTS.items():
        tid = vocab.fim_token_ids.get(role)
        if tid is None:
            tid = next((i for t in texts if (i := vocab.token_id(t)) is not None), None)
        if tid is not None:
            found[role] = tid
    if not all(r in found for r in ("pre", "suf", "mid")):
        return None
    family = "codegeex" if vocab.token_id("<|code_prefix|>") == found["pre"] else "psm"
    pre, suf, mid = found.pop("pre"), found.pop("suf"), found.pop("mid")
    return FimTokens(pre, suf, mid, family, found)


def missing_fim_message(model: str) -> str:
    """The 400 for a model without FIM tokens."""
    return (
        f"model {model!r} has no fill-in-the-middle tokens (none of {', '.join(FIM_TEXTS['pre'][:3])} ... in "
        f"its vocabulary or GGUF metadata), so it cannot fill in a middle; serve a code model trained for FIM "
        f"(CodeGeeX4, Qwen2.5-Coder, StarCoder, CodeLlama) or send the prompt without a suffix"
    )


def build_fim_prompt(
    vocab: _Vocab,
    fim: FimTokens,
    prefix: str,
    suffix: str,
    prompt: str = "",
    extra: list[ExtraFile] | tuple[ExtraFile, ...] = (),
) -> list[int]:
    """The token ids of one FIM prompt in the family's format (module docstring). `prompt` is text the
    middle must start with (llama.cpp's `/infill` `prompt`: it goes right after the prefix)."""

    def enc(text: str) -> list[int]:
        return vocab.encode_plain(text) if text else []

    head = vocab.encode("", add_special_tokens=True)  # BOS, or GLM's [gMASK]<sop>, as the tokenizer adds
    if fim.family == "codegeex":
        return head + _codegeex(vocab, fim, enc, prefix + prompt, suffix, extra)
    context: list[int] = []
    rep, sep = fim.others.get("rep"), fim.others.get("sep")
    if rep is not None:
        context += [rep, *enc(DEFAULT_REPO + "\n")]
    for f in extra:
        context += [sep, *enc(f.filename + "\n")] if sep is not None else enc(SNIPPET_SEPARATOR)
        context += enc(f.text)
    if sep is not None:
        context += [sep, *enc(DEFAULT_FILENAME + "\n")]
    return head + context + [fim.pre, *enc(prefix + prompt), fim.suf, *enc(suffix), fim.mid]


def _codegeex(vocab: _Vocab, fim: FimTokens, enc, prefix: str, suffix: str, extra) -> list[int]:
    user, assistant = vocab.token_id("<|user|>"), vocab.token_id("<|assistant|>")
    if user is None or assistant is None:
        raise ValueError("a CodeGeeX4 vocabulary without <|user|> / <|assistant|> tokens")
    refs = "".join(f"###REFERENCE:\n###PATH:{f.filename}\n{f.text}\n" for f in extra)
    header = "\n" + refs + "###PATH:\n###LANGUAGE:\n###MODE:BLOCK\n"
    return [user, *enc(header), fim.suf, *enc(suffix), fim.pre, *enc(prefix), fim.mid, assistant, *enc("\n")]
