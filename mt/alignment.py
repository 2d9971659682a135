"""Cross-attention weights of a translation, for inspection and `mt attention` heatmaps.

SDPA returns attention outputs, not weights, so the weights are recomputed from what each
decoder layer's cross-attention receives, with the same formula:
softmax(q k^T / sqrt(hd)) over the real (non-pad) source keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mt import search
from mt.batching import collate_source
from mt.config import DecodeConfig
from mt.model import MultiHeadAttention, Transformer
from mt.tokenizer import Tokenizer
from mt.vocab import BOS_ID, EOS_ID


@dataclass
class Alignment:
    """A translation and its cross-attention: weights (layers, heads, T, S)."""

    source_pieces: list[str]  # S labels: the source pieces, then </s>
    target_pieces: list[str]  # T labels: the output pieces, then </s> (what each row predicts)
    weights: Tensor  # (layers, heads, T, S) float32, rows sum to 1
    translation: str


def attention_weights(
    attn: MultiHeadAttention, x: Tensor, k: Tensor, mask: Tensor | None
) -> Tensor:
    """Weights (B, H, L, S) of attn's queries from x (B, L, D) over keys k (B, H, S, hd)."""
    q = attn.split_heads(attn.q_proj(x))  # (B, H, L, hd)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, L, S)
    if mask is not None:  # additive (B, 1, 1, S): -inf at pads; None: no pads
        scores = scores + mask
    return scores.softmax(dim=-1)


@torch.no_grad()
def cross_attention(model: Transformer, src: Tensor, tgt_in: Tensor) -> Tensor:
    """Teacher-forced cross-attention weights (layers, B, H, T, S) of tgt_in (B, T) over src."""
    captured: list[Tensor] = []

    def capture(module: MultiHeadAttention, args: tuple, kwargs: dict[str, Any], _: Any) -> None:
        x, k = args[0], args[1]
        captured.append(attention_weights(module, x, k, kwargs["mask"]).float())

    hooks = [
        layer.cross_attn.register_forward_hook(capture, with_kwargs=True) for layer in model.decoder
    ]
    try:
        model.eval()
        model(src, tgt_in)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(captured)  # (layers, B, H, T, S)


def align(
    model: Transformer, tokenizer: Tokenizer, sentence: str, decode: DecodeConfig
) -> Alignment:
    """Translate one sentence as `decode` says (never sampling), then read its cross-attention."""
    device = next(model.parameters()).device
    ids = tokenizer.encode_src([sentence])[0][: model.max_positions - 1]
    src = collate_source([ids], torch.zeros(1, dtype=torch.long).numpy()).src.to(device)
    best = search.decode(model, src, dataclasses.replace(decode, nbest=1, sampling=False))[0][0]
    return alignment(model, tokenizer, ids, best.tokens)


def alignment(
    model: Transformer, tokenizer: Tokenizer, ids: list[int], tokens: list[int]
) -> Alignment:
    """The cross-attention of a given translation (target ids without BOS/EOS) of source ids."""
    device = next(model.parameters()).device
    src = collate_source([ids], torch.zeros(1, dtype=torch.long).numpy()).src.to(device)  # (1, S)
    tgt_in = torch.tensor([[BOS_ID, *tokens]], device=device)  # (1, T)
    weights = cross_attention(model, src, tgt_in)[:, 0]  # (layers, H, T, S)
    pieces = tokenizer.tgt.id_to_piece  # one id -> its piece
    return Alignment(
        source_pieces=[tokenizer.src.id_to_piece(i) for i in ids] + ["</s>"],
        target_pieces=[pieces(i) for i in tokens] + ["</s>"],
        weights=weights,
        translation=tokenizer.decode_tgt([[*tokens, EOS_ID]])[0],
    )
