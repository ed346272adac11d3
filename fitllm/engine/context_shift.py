"""Context shift: reuse a cached sequence's K/V after a span was cut from it (KoboldCpp's ContextShift).

Rotary models only: a key rotated to position p can be moved to p - d by one more rotation by -d (two
rotations compose), so the kept run after a removed span needs no recompute. Absolute position embeddings
(XGLM) are added to the hidden state before the first layer, and a sliding window changes which keys a
query saw, so neither can shift.

How it fits the paged cache (fitllm's prefix cache keys blocks by a hash chained from position 0, so after
a trim only the blocks before the cut hit):
- `ContextShifter.remember` keeps the token ids and block hashes of the last `MAX_REMEMBERED` finished
  sequences (their full blocks are in the prefix cache until evicted).
- At admission, `ContextShifter.plan` looks for a remembered sequence S with prompt = S[:a] + S[a+r : a+r+m]
  + rest, the longest token-exact kept run m after a removed span r (KoboldCpp's PurgeMissingTokens: the
  kept run must start right where the kept prefix ends). The request's positions [start, a + m) (start: the
  end of its prefix hits, a block boundary at or before a) take their K/V from S's slots at the same
  positions before a and at +r after it; S's evicted blocks end the run. The move is a `KVShift`, made by the
  runner before the step's forward (as swaps are): where the cut is a whole number of blocks, S's blocks
  after it that nothing references are taken over and their K rotated in place (they leave the prefix cache:
  their old hashes no longer name what they hold); the rest is copied into the request's own new blocks.
  Blocks another request holds are only read.
- A shifted cache is close to, not equal to, a recomputed one (the kept tokens once attended to the cut
  text). So blocks whose K/V came from a shift, or were computed over shifted K/V, are published under a
  salted hash chain (`KVCacheManager.mark_shifted`): only requests that accept a shift ever hit them.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from fitllm.config import ModelConfig
from fitllm.engine.request import Request, SamplingParams
from fitllm.memory.kv.block_pool import BlockHash, KVBlock
from fitllm.memory.kv.format import KVCacheFormat
from fitllm.memory.kv.manager import KVCacheManager

log = logging.getLogger("fitllm")

# The shortest kept run worth a shift, in blocks: below it the copy, the rotation and the block that holds
# the run cost about what prefilling those few tokens in the same chunk costs, and a short run is more
# likely a chance repeat of a phrase than the story continuing after a trim.
MIN_SHIFT_BLOCKS = 2
# Finished sequences remembered as shift sources: a handful of stories written at once, each remembered by
# its latest turn (a turn's sequence replaces the earlier turns it extends).
MAX_REMEMBERED = 32


def context_shift_unsupported(config: ModelConfig) -> str | None:
    """Why this model cannot shift its cache (None: it can)."""
    if config.model_type == "xglm":
        return "absolute position embeddings (XGLM) cannot be moved to new positions"
    if config.sliding_window is not None:
        return (
            f"sliding-window attention ({config.sliding_window} tokens) sees a different window after a shift"
        )
    return None


@dataclass(slots=True, frozen=True)
class KeptRun:
    """prompt = seq[:kept_prefix] + seq[kept_prefix + removed : kept_prefix + removed + length] + rest."""

    kept_prefix: int
    removed: int
    length: int


def find_kept_run(prompt: np.ndarray, seq: np.ndarray, min_run: int) -> KeptRun | None:
    """The longest run of `prompt` that starts where its common prefix with `seq` ends and equals a later
    stretch of `seq` (the earliest such stretch on ties), if it is at least `min_run` tokens."""
    n = min(len(prompt), len(seq))
    differ = np.flatnonzero(prompt[:n] != seq[:n])
    a = int(differ[0]) if len(differ) else n
    if a >= len(seq) or len(prompt) - a < min_run:
        return None  # seq is a prefix of the prompt (the prefix cache's case), or too little is left
    # Candidate starts in seq after a, narrowed token by token over the first min_run tokens (vectorised:
    # a story's common words give many single-token candidates, few survive a block).
    cands = np.flatnonzero(seq[a + 1 :] == prompt[a]) + a + 1
    for k in range(1, min_run):
        cands = cands[cands + k < len(seq)]
        cands = cands[seq[cands + k] == prompt[a + k]]
        if not len(cands):
            return None
    best: KeptRun | None = None
    for j in cands.tolist():
        span = min(len(seq) - j, len(prompt) - a)
        if best is not None and span <= best.length:
            continue
        differ = np.flatnonzero(seq[j : j + span] != prompt[a : a + span])
        length = int(differ[0]) if len(differ) else span
        if best is None or length > best.length:
            best = KeptRun(a, j - a, length)
    return best if best is not None and best.length >= min_run else None


@dataclass(slots=True)
class KVShift:
    """One context shift's K/V move, recorded by the scheduler and made by the runner before the step's
    forward: the request's positions [start, end) get the K/V of the remembered sequence's positions, K
    rotated by the position change. Two ways, block by block:
    - in place (`adopted`): a block wholly after the cut whose source is a whole block (the removed span is
      a whole number of blocks) that nothing else references is taken over by the request as it lies, and
      its K rotated by `moved_by` where it is: no copy, V untouched;
    - copied (`positions`): the rest (the block holding the cut, shared sources, spans that are not whole
      blocks) is gathered from `src_slots`, rotated by `delta` and written into the request's new blocks."""

    request_id: str
    start: int  # the request's first position the shift fills (the end of its prefix hits: block-aligned)
    end: int  # one past its last; the request's num_computed_tokens after the move
    positions: torch.Tensor  # [n] int64: the request positions filled by copying, increasing
    src_slots: torch.Tensor  # [n] int64: global slots of their source K/V
    delta: torch.Tensor  # [n] int64: new position - source position (0 before the cut, -removed)
    adopted: list[tuple[int, KVBlock]] = field(default_factory=list)  # (logical block, block) in place
    moved_by: int = 0  # the position change of the adopted blocks' K (-removed)

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def shift_kv(kv: torch.Tensor, delta: torch.Tensor, rotary, kv_format: KVCacheFormat) -> None:
    """Move gathered K/V [num_layers, 2, T, kv_heads, entry_width] by `delta` [T] positions, in place: each
    moved K row is rotated by its delta with the model's rotary (`RotaryEmbedding.shift`) in float32; V and
    unmoved rows are untouched."""
    KeyShift(delta, rotary, kv_format, kv.device)(kv)


class KeyShift:
    """`shift_kv` with its angles taken once, for a move made piece by piece (`KVSlabStorage.move_slots`)."""

    def __init__(self, delta: torch.Tensor, rotary, kv_format: KVCacheFormat, device: torch.device) -> None:
        rows = torch.nonzero(delta).squeeze(1)
        self.rotary, self.kv_format = rotary, kv_format
        self.run: slice | None = None  # the moved rows when they are one run (the rows after the cut)
        self.rows: torch.Tensor | None = None  # else their indices
        if len(rows):
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            if hi - lo == len(rows):
                self.run = slice(lo, hi)
            else:
                self.rows = rows.to(device)
            self.tables = rotary.shift_tables(delta.index_select(0, rows), device)

    def __call__(self, kv: torch.Tensor) -> None:
        """Rotate the moved K rows of gathered K/V [num_layers, 2, T, kv_heads, entry_width] in place."""
        if self.run is not None:
            rotate_keys(kv[:, 0, self.run], self.tables, self.rotary, self.kv_format)
        elif self.rows is not None:
            keys = kv[:, 0].index_select(1, self.rows)
            rotate_keys(keys, self.tables, self.rotary, self.kv_format)
            kv[:, 0].index_copy_(1, self.rows, keys)


def rotate_keys(keys: torch.Tensor, tables, rotary, kv_format: KVCacheFormat) -> None:
    """Rotate stored keys [num_layers, T, kv_heads, entry_width] (a view into the cache is fine) by the
    angles of `tables` (`RotaryEmbedding.shift_tables` of their deltas), in place, a layer at a time
    (cache-sized pieces). A float cache is rotated in float32 and rounded once into place: a 16-bit one
    moved by one delta (a whole-block cut's adopted blocks) through one GEMM a layer against
    `RotaryEmbedding.shift_matrix`; a quantized one is decoded, rotated and encoded again (a fresh scale per
    vector)."""
    if rotates_by_gemm(keys, tables, kv_format):
        width = keys.shape[-1]
        matrix = rotary.shift_matrix(tables, width, keys.dtype)
        for layer in keys:
            flat = layer.view(-1, width)
            torch.mm(torch.cat((flat, flat), dim=1), matrix, out=flat)
        return
    for layer in keys:
        if not kv_format.quantized:
            rotary.rotate_by(tables, layer, out=layer)
            continue
        n, heads, width = layer.shape
        k = kv_format.decode(layer.reshape(-1, width)).float().reshape(n, heads, kv_format.head_dim)
        rotary.rotate_by(tables, k, out=k)
        layer.copy_(kv_format.encode(k.reshape(-1, kv_format.head_dim)).reshape(n, heads, width))


def rotates_by_gemm(keys: torch.Tensor, tables, kv_format: KVCacheFormat) -> bool:
    """Whether `rotate_keys` can take the GEMM path: one delta for every row, 16-bit keys, and each layer's
    keys one contiguous run (a view the GEMM can write in place)."""
    return (
        tables.cos.dim() == 1
        and not kv_format.quantized
        and keys.dtype in (torch.bfloat16, torch.float16)
        and all(layer.is_contiguous() for layer in keys)
    )


@dataclass(slots=True)
class RememberedSequence:
    """A finished sequence whose full blocks went to the prefix cache: its tokens (those of its full blocks)
    and their hash chain, by which its blocks are found while they stay cached."""

    token_ids: np.ndarray
    block_hashes: list[BlockHash]


class ContextShifter:
    """Remembers finished sequences and plans context shifts from them for admitted requests."""

    def __init__(
        self,
        kv: KVCacheManager,
        default_on: bool,
        unsupported: str | None,
        max_remembered: int = MAX_REMEMBERED,
    ) -> None:
        """default_on: whether a request without its own `context_shift` shifts (--context-shift on);
        unsupported: why this model cannot shift (context_shift_unsupported), None if it can."""
        self.kv = kv
        self.default_on = default_on
        self.unsupported = unsupported
        self.min_run = MIN_SHIFT_BLOCKS * kv.block_size
        self._remembered: deque[RememberedSequence] = deque(maxlen=max_remembered)
        self.num_fallbacks = 0  # requests that wanted a shift the model cannot make
        self.num_shifts = 0
        self.num_shifted_tokens = 0

    def wants(self, params: SamplingParams) -> bool:
        """Whether a request with these parameters accepts a shifted cache (and the model can give one)."""
        wanted = self.default_on if params.context_shift is None else params.context_shift
        return wanted and self.unsupported is None

    def count_request(self, params: SamplingParams) -> None:
        """A request arrived: one that wants a shift on a model that cannot shift is counted (and the first
        one logged): it runs with a plain prefill."""
        wanted = self.default_on if params.context_shift is None else params.context_shift
        if wanted and self.unsupported is not None:
            if self.num_fallbacks == 0:
                log.warning(
                    "context shift requested but not possible (%s): prompts are prefilled", self.unsupported
                )
            self.num_fallbacks += 1

    def remember(self, request_id: str, token_ids: list[int], num_computed: int) -> None:
        """Before a finished request's blocks are freed: remember the sequence its full blocks hold."""
        if self.unsupported is not None or not self.kv.pool.enable_caching:
            return
        bs = self.kv.block_size
        full = min(num_computed, len(token_ids)) // bs * bs
        if full < self.min_run:
            return
        tokens = np.asarray(token_ids[:full], dtype=np.int64)
        hashes = self.kv.block_hashes(request_id, token_ids[:full])[: full // bs]
        # A later turn of the same story extends an earlier one: keep only the longest.
        self._remembered = deque(
            (s for s in self._remembered if not _is_prefix(s.token_ids, tokens)),
            maxlen=self._remembered.maxlen,
        )
        self._remembered.append(RememberedSequence(tokens, hashes))

    def plan(self, req: Request, num_hit: int) -> KVShift | None:
        """The shift that fills the request's positions from `num_hit` (the end of its prefix hits) from a
        remembered sequence, the longest whose source blocks are still cached; None if none is worth it."""
        if not self._remembered or not self.wants(req.params):
            return None
        prompt = np.asarray(req.token_ids, dtype=np.int64)
        best: KVShift | None = None
        for seq in reversed(self._remembered):  # newest first: it wins ties
            run = find_kept_run(prompt, seq.token_ids, self.min_run)
            if run is None:
                continue
            shift = self._usable(req.request_id, seq, run, num_hit, len(prompt) - 1)
            if shift is not None and (best is None or shift.end > best.end):
                best = shift
        return best

    def committed(self, shift: KVShift) -> None:
        """The shift's request was admitted: its blocks from the shift on are published under the salted
        chain, and the shift is counted."""
        self.kv.mark_shifted(shift.request_id, shift.start // self.kv.block_size)
        self.num_shifts += 1
        self.num_shifted_tokens += shift.num_tokens

    def _usable(
        self, request_id: str, seq: RememberedSequence, run: KeptRun, start: int, limit: int
    ) -> KVShift | None:
        """The part of `run` whose source blocks are still cached, as a shift of positions [start, ...)."""
        a, r = run.kept_prefix, run.removed
        end = min(a + run.length, limit)  # the last prompt token is computed, for its logits
        # (start may pass a when the request's own earlier shift is found again as prefix hits after a
        # preemption: the shift then starts inside the kept run)
        if end - max(start, a) < self.min_run:
            return None
        positions = np.arange(start, end)
        src = np.where(positions < a, positions, positions + r)
        bs = self.kv.block_size
        src_blocks = src // bs
        needed = np.unique(src_blocks)  # increasing, as src is
        found: list[KVBlock] = []  # the cached block of each needed block of seq
        cut = len(positions)
        for i in needed.tolist():
            block = self.kv.pool.lookup(seq.block_hashes[i]) if i < len(seq.block_hashes) else None
            if block is None:  # evicted: the usable run ends here
                cut = int(np.searchsorted(src_blocks, i))
                break
            found.append(block)
        end = start + cut
        if end <= a or end - max(start, a) < self.min_run:
            return None
        ids = np.array([b.block_id for b in found], dtype=np.int64)
        src_slots = ids[np.searchsorted(needed, src_blocks[:cut])] * bs + src[:cut] % bs
        delta = np.where(positions[:cut] < a, 0, -r)
        adopted = self._in_place(found, needed, a, r, start, end)
        copy = np.ones(cut, dtype=bool)
        for j, _ in adopted:
            copy[j * bs - start : (j + 1) * bs - start] = False
        return KVShift(
            request_id,
            start,
            end,
            torch.from_numpy(positions[:cut][copy]),
            torch.from_numpy(src_slots[copy]),
            torch.from_numpy(delta[copy].astype(np.int64)),
            adopted,
            -r,
        )

    def _in_place(
        self, found: list[KVBlock], needed: np.ndarray, a: int, r: int, start: int, end: int
    ) -> list[tuple[int, KVBlock]]:
        """The request's blocks that can take their source block over in place: wholly after the cut (block
        j >= a / bs), the cut a whole number of blocks (so block j's tokens are exactly source block j + r /
        bs's, at the same offsets), and the source referenced by nothing (only cached: rotating it mutates
        no other request's K/V, and it leaves the cache, as its old hash no longer names it)."""
        bs = self.kv.block_size
        if r % bs:
            return []
        by_index = dict(zip(needed.tolist(), found, strict=False))
        adopted = []
        for j in range(max(-(-a // bs), start // bs), -(-end // bs)):
            block = by_index[j + r // bs]
            if block.ref_cnt == 0:
                adopted.append((j, block))
        return adopted


def _is_prefix(short: np.ndarray, long: np.ndarray) -> bool:
    return len(short) <= len(long) and bool(np.array_equal(short, long[: len(short)]))
