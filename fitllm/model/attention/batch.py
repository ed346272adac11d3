"""A step's flat batch as every attention backend sees it (`BatchLayout`), and the one slot formula.

The engine builds one layout per step from the scheduler's output; the start-up profile step and the
scorer build the same layout over a scratch block table (`BatchLayout.scratch`). Each backend turns it into
its own metadata (torch_backend.py, triton_backend.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def slot_of(block_table, positions, block_size: int):
    """The KV slot of token position(s) through a sequence's block table: block `p // block_size` of the
    table, offset `p % block_size`. The one place the formula is written: a list of block ids with an int
    position, or a tensor of block ids with a tensor of positions (any shape)."""
    return block_table[positions // block_size] * block_size + positions % block_size


@dataclass(slots=True)
class BatchLayout:
    """One step's flat batch on the host, backend-independent: sequences in token order, the first
    `num_decodes` single-token decodes; sequence i's tokens are [query_start[i], query_start[i + 1])."""

    block_size: int
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # [T]
    slot_mapping: list[int] = field(default_factory=list)  # [T] slot each new token's K/V is written to
    query_start: list[int] = field(default_factory=lambda: [0])  # [S + 1]
    seq_lens: list[int] = field(default_factory=list)  # [S] keys each attends to, this step's included
    block_tables: list[list[int]] = field(default_factory=list)  # [S] block ids, at least seq_len's worth
    num_decodes: int = 0
    sample_rows: list[int] = field(default_factory=list)  # rows whose hidden state is sampled
    # Rows of input_ids that hold an output placeholder (async scheduling) and the rows of the step in
    # flight's tokens that fill them; empty when every id is known.
    placeholder_rows: list[int] = field(default_factory=list)
    placeholder_sources: list[int] = field(default_factory=list)

    def add_sequence(self, block_table: list[int], start: int, end: int) -> None:
        """Append a sequence computing positions [start, end), its keys [0, start) already in the cache
        (the caller appends its ids)."""
        bs = self.block_size
        self.block_tables.append(block_table)
        self.positions.extend(range(start, end))
        if end - start == 1:  # plain ints: small tensor ops per decode would dominate the step's build
            self.slot_mapping.append(slot_of(block_table, start, bs))
        else:
            self.slot_mapping.extend(
                slot_of(torch.tensor(block_table), torch.arange(start, end), bs).tolist()
            )
        self.seq_lens.append(end)
        self.query_start.append(self.query_start[-1] + end - start)

    @property
    def max_query_len(self) -> int:
        return max(b - a for a, b in zip(self.query_start, self.query_start[1:], strict=False))

    @classmethod
    def scratch(cls, num_slots: int, spans: list[tuple[int, int]], decodes: list[int]) -> BatchLayout:
        """`decodes` (their contexts) then `spans` ((new tokens, context) pairs) over a scratch cache of
        `num_slots` slots: one block of `num_slots` that every table points at, so slot = position %
        num_slots (ids all 0). Used where there is no KV pool to ask: the profile step and the scorer."""
        layout = cls(block_size=num_slots, num_decodes=len(decodes))
        for q, c in [(1, c) for c in decodes] + spans:
            layout.add_sequence([0] * -(-c // num_slots), c - q, c)
        layout.input_ids = [0] * len(layout.positions)
        return layout
