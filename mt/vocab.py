"""Special token ids, fixed project-wide: every vocabulary reserves 0-3 for these."""

from __future__ import annotations

from collections.abc import Iterable

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3


def strip_specials(ids: Iterable[int]) -> list[int]:
    """Ids up to the first EOS, without PAD and BOS (search output is padded after EOS)."""
    out = []
    for i in ids:
        i = int(i)
        if i == EOS_ID:
            break
        if i not in (PAD_ID, BOS_ID):
            out.append(i)
    return out
