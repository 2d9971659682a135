"""Decoding with the model's `encode()` / `decode()` and its incremental state.

Shape legend: B batch, S source length, V vocabulary size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mt.model import Transformer
from mt.vocab import BOS_ID, EOS_ID, PAD_ID


def max_lengths(src: Tensor, a: float, b: int, limit: int) -> Tensor:
    """Per-sentence output length limits a * source length + b, capped at `limit`: (B,) long."""
    src_len = (src != PAD_ID).sum(dim=1)  # (B,) real tokens, EOS included
    return (a * src_len.float() + b).long().clamp(1, limit)


@torch.no_grad()
def greedy_search(
    model: Transformer, src: Tensor, max_len_a: float, max_len_b: int
) -> list[list[int]]:
    """Batched greedy decoding: the most probable token at each step, until EOS or the limit."""
    B = src.size(0)
    memory = model.encode(src)  # (B, S, D)
    state = model.init_state()
    limit = max_lengths(src, max_len_a, max_len_b, model.max_positions - 1)  # (B,)
    token = torch.full((B, 1), BOS_ID, dtype=torch.long, device=src.device)  # (B, 1)
    finished = torch.zeros(B, dtype=torch.bool, device=src.device)  # (B,)
    out = []
    for t in range(int(limit.max())):
        logits = model.decode(token, memory, src, state)[:, -1]  # (B, V)
        token = logits.argmax(dim=-1)  # (B,)
        token = token.masked_fill(finished, PAD_ID).masked_fill(
            ~finished & (t + 1 >= limit), EOS_ID
        )
        out.append(token)
        finished |= token == EOS_ID
        if bool(finished.all()):
            break
        token = token.unsqueeze(1)  # (B, 1)
    return strip(torch.stack(out, dim=1))


def strip(tokens: Tensor) -> list[list[int]]:
    """Rows of output ids (B, L) cut at the first EOS, without specials."""
    rows = []
    for row in tokens.tolist():
        ids = []
        for t in row:
            if t in (EOS_ID, PAD_ID):
                break
            ids.append(t)
        rows.append(ids)
    return rows
