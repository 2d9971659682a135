"""The Transformer encoder-decoder of Vaswani et al. 2017, read top-down from small to large.

Shape legend used in the comments:
    B  batch size              S  source length          T  target length
    L  any sequence length     D  model dimension        F  feed-forward dimension
    H  attention heads         hd head dimension (D//H)  V  vocabulary size

The model knows nothing about devices, mixed precision, DDP or compilation: callers wrap it.

Assumption: every source row holds at least one real (non-pad) token, e.g. its eos. The key-padding
mask would otherwise mask a whole row and scaled_dot_product_attention would return NaN.
A batch without padding needs no mask at all; callers who know it say `padded=False`, so that
SDPA may pick FlashAttention, its fastest kernel, which takes no mask.

Parameter counts with a 37,000-token joint vocabulary and three-way tied embeddings
(checked in tests/test_model.py):
    base (D512, F2048, H8, 6+6 layers):  63,075,328 pre-norm, 63,073,280 post-norm
    big (D1024, F4096, H16, 6+6 layers): 214,231,040 pre-norm
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mt.config import ModelConfig
from mt.vocab import PAD_ID


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """Fixed sinusoidal position encodings (length, D): sin on even dims, cos on odd dims."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)  # (L, 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = position * inv_freq  # (L, ceil(D/2))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : dim // 2])  # an odd D has one fewer cos column
    return table  # (L, D)


def count_parameters(model: nn.Module) -> int:
    """Number of unique parameters; tied weights are counted once."""
    unique = {id(p): p for p in model.parameters()}
    return sum(p.numel() for p in unique.values())


def key_padding_mask(src: Tensor, pad_id: int, dtype: torch.dtype) -> Tensor:
    """Additive attention mask (B, 1, 1, S) for SDPA: 0 where the key is a real token, -inf at pads.

    In the dtype attention runs in, which SDPA's fused kernels take as it is (a boolean mask is
    converted at every call); its rows lie 8 elements apart, the alignment the memory-efficient
    kernel needs and would otherwise get by copying the mask.
    """
    B, S = src.shape
    rows = torch.zeros(B, 1, 1, -(-S // 8) * 8, dtype=dtype, device=src.device)  # S rounded up
    return rows[..., :S].masked_fill_(src[:, None, None, :] == pad_id, -math.inf)  # (B, 1, 1, S)


def attention_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention runs in for inputs like x: autocast's if the caller turned it on."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def cache_dtype(x: Tensor) -> torch.dtype:
    """The dtype incremental decoding keeps keys/values in, and attends in, for inputs like x.

    float32 on a CPU: there SDPA attends from one query per row several times faster in float32
    than in bf16, which more than pays for casting each step's new keys and queries
    (docs/benchmarks.md, "Attention in float32 when decoding on a CPU"). Elsewhere autocast's.
    """
    return torch.float32 if x.device.type == "cpu" else attention_dtype(x)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    dropout_p: float,
    causal: bool,
    cached: bool = False,
) -> Tensor:
    """SDPA of q (B, H, L, hd) over k, v (B, H, L', hd), in k's dtype; the result in q's dtype.

    Keys kept in float32 by a decoding cache (cache_dtype) are attended in float32 with autocast
    off, which would otherwise cast them back to bf16. cached: k, v come from a decoding cache;
    on a CPU those are attended by `product_attention`, which is faster there than SDPA's CPU
    kernels for decoding's few queries per row (docs/benchmarks.md, "Decoding steps on a CPU
    with fewer, larger operations").
    """
    if cached and dropout_p == 0.0 and q.device.type == "cpu":
        with torch.autocast("cpu", enabled=False):
            return product_attention(q.to(k.dtype), k, v, mask).to(q.dtype)
    if q.dtype == k.dtype:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal
        )
    with torch.autocast(q.device.type, enabled=False):
        out = F.scaled_dot_product_attention(
            q.to(k.dtype), k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal
        )
    return out.to(q.dtype)


def product_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v as two batched matrix products: (B, H, L, hd).

    q (B, H, L, hd), k and v (B, H, L', hd); mask as SDPA's attn_mask (boolean: True where
    attention is allowed; float: added to the scores). What SDPA computes, for decoding on a CPU.
    """
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(q.size(-1) ** -0.5)  # (B, H, L, L')
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill_(~mask, -math.inf)
    elif mask is not None:
        scores = scores.add_(mask)
    return torch.matmul(scores.softmax(dim=-1), v)  # (B, H, L, hd)


class Dropout(nn.Module):
    """Inverted dropout; on CPU it draws its mask from 64-bit random words, four 16-bit draws each.

    CPU `bernoulli_` makes one generator call per element, a large share of a CPU training
    step (docs/benchmarks.md); this draws a quarter as many words and compares 16-bit quarters
    to a threshold, so the drop rate is p rounded to a multiple of 1/65536. The words fill the
    whole int64 range (`random_(min, None)`), the one integer draw with no range reduction
    per word. CUDA keeps PyTorch's fused kernel. Both use the global torch generator, so
    seeding makes masks reproducible.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """(...) -> (...), the same shape: zero a fraction p of entries, scale the rest."""
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        words = torch.empty(((n + 3) // 4,), dtype=torch.int64).random_(-(2**63), None)
        quarters = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
        keep = quarters >= round(self.p * 65536) - 32768  # P(keep) = 1 - p (to 1/65536)
        # Scaled after the mask, in x's dtype with a float scalar: each output rounds on its own.
        # (A bf16 mask of 1 / (1 - p) would carry that factor's rounding, +0.2% at p = 0.25,
        # into every kept activation.)
        return (x * keep.to(x.dtype)).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the rate of every Dropout in `model` (model.dropout; attention dropout is apart)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    for module in model.modules():
        if isinstance(module, Dropout):
            module.p = p


class MultiHeadAttention(nn.Module):
    """Multi-head attention over already projected keys/values, so callers can cache them."""

    def __init__(self, dim: int, heads: int, attn_dropout: float) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"model dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.q_proj = nn.Linear(dim, dim)
        # No key bias: it adds q·b to every score of a query, which softmax ignores, so its
        # gradient is only rounding noise that Adam would amplify into lr-sized random steps.
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        # Decoding on a CPU may swap q_proj, k_proj and v_proj of a self-attention for one layer
        # projecting all three (mt.packing): one matrix product instead of three.
        self.qkv_proj: nn.Module | None = None

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, H, L, hd)."""
        B, L, D = x.shape
        return x.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # (B, H, L, hd)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, H, L, hd) for the key/value sequence x (B, L, D)."""
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def stacked(self, roles: str) -> tuple[Tensor, Tensor]:
        """The projections of `roles` (each of "q", "k", "v") stacked: weight (nD, D), bias (nD,).

        The key projection has no bias (see __init__): zeros stand in for it.
        """
        layers = [{"q": self.q_proj, "k": self.k_proj, "v": self.v_proj}[role] for role in roles]
        weight = torch.cat([layer.weight for layer in layers])
        zeros = self.v_proj.bias.new_zeros(self.k_proj.out_features)
        bias = torch.cat([zeros if layer.bias is None else layer.bias for layer in layers])
        return weight.detach(), bias.detach()

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values (B, H, L, hd) each, of x (B, L, D) attending to itself."""
        if self.qkv_proj is None:
            return self.split_heads(self.q_proj(x)), *self.project_kv(x)
        B, L, D = x.shape
        qkv = self.qkv_proj(x).view(B, L, 3, self.heads, D // self.heads)  # (B, L, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, hd) each
        return q, k, v

    def forward(
        self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, cached: bool = False
    ) -> Tensor:
        """Attend from queries x (B, L, D) to k, v (B, H, L', hd); mask: SDPA's attn_mask."""
        q = self.split_heads(self.q_proj(x))  # (B, H, L, hd)
        return self.attend_heads(q, k, v, mask, cached=cached)  # (B, L, D)

    def attend_heads(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
        cached: bool = False,
    ) -> Tensor:
        """Attend from projected queries q (B, H, L, hd) to k, v: (B, L, D), heads concatenated.

        cached: k, v come from a decoding cache (see `attend`).
        """
        B, H, L, hd = q.shape
        # SDPA picks flash / memory-efficient kernels on CUDA; never a hand-written softmax path
        # but decoding's on a CPU (see `attend`).
        dropout_p = self.attn_dropout if self.training else 0.0
        out = attend(q, k, v, mask, dropout_p, is_causal, cached)  # (B, H, L, hd)
        out = out.transpose(1, 2).reshape(B, L, H * hd)  # (B, L, D)
        return self.out_proj(out)  # (B, L, D)


class FeedForward(nn.Module):
    """Position-wise feed-forward block: Linear(D, F) -> activation -> dropout -> Linear(F, D)."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float, activation: str) -> None:
        super().__init__()
        activations = {"relu": nn.ReLU, "gelu": nn.GELU}
        if activation not in activations:
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.act = activations[activation]()
        self.dropout = Dropout(dropout)
        self.fc2 = nn.Linear(ffn_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        return self.fc2(self.dropout(self.act(self.fc1(x))))  # (B, L, D)


def residual(
    x: Tensor,
    fn: Callable[[Tensor], Tensor],
    norm: nn.LayerNorm,
    dropout: Dropout,
    prenorm: bool,
) -> Tensor:
    """One sublayer with its residual: x + drop(f(LN(x))) pre-norm, LN(x + drop(f(x))) post-norm."""
    if prenorm:
        return x + dropout(fn(norm(x)))
    return norm(x + dropout(fn(x)))


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each wrapped in a residual connection."""

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn_dim: int,
        dropout: float,
        attn_dropout: float,
        activation: str,
        prenorm: bool,
    ) -> None:
        super().__init__()
        self.prenorm = prenorm
        self.self_attn = MultiHeadAttention(dim, heads, attn_dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout, activation)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = Dropout(dropout)

    def _self_attention(self, x: Tensor, mask: Tensor | None) -> Tensor:
        q, k, v = self.self_attn.project_qkv(x)  # (B, H, S, hd) each
        return self.self_attn.attend_heads(q, k, v, mask=mask)  # (B, S, D)

    def forward(self, x: Tensor, src_mask: Tensor | None) -> Tensor:
        """x (B, S, D), src_mask (B, 1, 1, S) or None -> (B, S, D)."""
        x = residual(
            x, lambda h: self._self_attention(h, src_mask), self.norm1, self.dropout, self.prenorm
        )
        return residual(x, self.ffn, self.norm2, self.dropout, self.prenorm)  # (B, S, D)


@dataclass
class LayerCache:
    """Keys/values of one decoder layer for incremental decoding.

    Self-attention keys/values are kept time-major, (capacity, N, H, hd), in buffers that double
    when full: a step writes its positions in place, and reordering rows (beam search) copies
    the filled positions of the rows that change, at most once. Concatenating per step and then
    gathering would copy the whole history twice at every step. Cross-attention keys/values are
    (B, H, S, hd), one row per source.
    """

    self_k: Tensor | None = None  # (capacity, N, H, hd), positions [0, length) of rows [0, rows)
    self_v: Tensor | None = None
    length: int = 0
    rows: int = 0  # the live rows of self_k and self_v: a reorder on a CPU may keep fewer
    capacity: int = 16  # positions of the first buffer: the expected output length, if known
    cross_k: Tensor | None = None  # (B, H, S, hd)
    cross_v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (N, H, T, hd) of T new positions; return all so far, (N, H, length, hd)."""
        start, end = self.length, self.length + k.size(2)
        if self.self_k is None or end > self.self_k.size(0):
            self.self_k = self._grown(self.self_k, k, end)
            self.self_v = self._grown(self.self_v, v, end)
            self.rows = k.size(0)
        N = self.rows
        self.self_k[start:end, :N] = k.permute(2, 0, 1, 3)  # (T, N, H, hd)
        self.self_v[start:end, :N] = v.permute(2, 0, 1, 3)
        self.length = end
        return self.self_k[:end, :N].permute(1, 2, 0, 3), self.self_v[:end, :N].permute(1, 2, 0, 3)

    def _grown(self, buffer: Tensor | None, new: Tensor, needed: int) -> Tensor:
        """A buffer of at least twice the capacity holding the filled positions of `buffer`."""
        N, H, _, hd = new.shape
        old = 0 if buffer is None else buffer.size(0)
        grown = new.new_empty(max(2 * old, needed, self.capacity), N, H, hd)
        if buffer is not None:
            grown[: self.length] = buffer[: self.length, :N]
        return grown

    def reorder(self, rows: Reorder, sources: Reorder | None = None) -> None:
        """Reorder self-attention rows by `rows`, cross-attention rows by `sources`.

        In place where the reorder `fits`: only the rows that change are copied, and the
        buffers keep their size, their first N' (B') rows live.
        """
        if self.self_k is not None:
            if rows.fits(self.self_k.size(1)):
                for buffer in (self.self_k, self.self_v):
                    rows.move(buffer.flatten(2), self.length)  # (capacity, N, H*hd)
            else:
                self.self_k = self._select(self.self_k, rows.index)
                self.self_v = self._select(self.self_v, rows.index)
            self.rows = rows.size
        if sources is not None and self.cross_k is not None:
            self.cross_k = sources.take(self.cross_k)
            self.cross_v = sources.take(self.cross_v)

    def _select(self, buffer: Tensor, index: Tensor) -> Tensor:
        """The buffer's rows `index` (along N) at the same capacity; one copy of the filled part."""
        capacity, N, H, hd = buffer.shape
        selected = buffer.new_empty(capacity, index.size(0), H, hd)
        # Gathering whole (H, hd) rows of the flattened buffer along dim 0 is a plain row copy,
        # which beats index_select along dim 1 of the 4-D buffer (docs/benchmarks.md).
        steps = torch.arange(self.length, device=index.device).unsqueeze(1)  # (length, 1)
        rows = (steps * N + index).view(-1)  # (length * N',) buffer row of each (step, new row)
        filled = selected.view(-1, H * hd)[: rows.size(0)]
        torch.index_select(buffer.view(-1, H * hd), 0, rows, out=filled)
        return selected


def reorders_in_place(index: Tensor) -> bool:
    """Whether a reorder by `index` copies only the rows that change, in place (`Reorder`).

    Most rows of a beam search's reorder stay where they are (mt.search keeps them there), but
    finding the others makes the host read the index: free on a CPU, a wait for a GPU, which
    copies every row instead.
    """
    return index.device.type == "cpu"


class Reorder:
    """Row i takes row index[i] (index (N',) long), for every cache of a decoder state.

    Where `reorders_in_place`, the rows that change are found once, here, and each cache that
    `fits` copies only those, in place; elsewhere every cache selects all rows of `index`.
    """

    def __init__(self, index: Tensor) -> None:
        self.index, self.size = index, index.size(0)
        self.in_place = reorders_in_place(index)
        if self.in_place:
            self.moved = (index != torch.arange(self.size)).nonzero().squeeze(1)  # (M,)
            self.sources = index[self.moved]  # (M,)
        self._flat: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # by (blocks, R)

    def fits(self, rows: int) -> bool:
        """Whether a buffer of `rows` rows is reordered in place: it holds the N' rows."""
        return self.in_place and self.size <= rows

    def move(self, x: Tensor, blocks: int) -> None:
        """In place, in each of the first `blocks` of x's blocks (P, R, C), row i takes row
        index[i]: only the rows that change are copied."""
        if self.moved.numel() == 0:
            return
        P, R, C = x.shape
        if (blocks, R) not in self._flat:  # the same for every cache of a state
            start = torch.arange(blocks).unsqueeze(1) * R  # (blocks, 1)
            self._flat[blocks, R] = ((start + self.sources).view(-1), (start + self.moved).view(-1))
        sources, targets = self._flat[blocks, R]  # (blocks * M,) each
        flat = x.view(P * R, C)
        flat.index_copy_(0, targets, flat.index_select(0, sources))

    def take(self, x: Tensor) -> Tensor:
        """x's rows (along dim 0) `index`: in place where it fits, else a copy."""
        if not self.fits(x.size(0)):
            return x.index_select(0, self.index)
        self.move(x.view(1, x.size(0), -1), 1)
        return x[: self.size]


class DecoderState:
    """Incremental decoding state: the position reached and per-layer key/value caches."""

    def __init__(self, num_layers: int, capacity: int = 16) -> None:
        self.step = 0  # number of target positions already decoded
        self.layers = [LayerCache(capacity=capacity) for _ in range(num_layers)]

    def reorder(self, index: Tensor, source_index: Tensor | None = None) -> None:
        """Select/reorder target rows (index (N',) long), e.g. for beam search.

        Self-attention caches follow `index`. Cross-attention caches hold one row per source
        and follow `source_index` (B',) when given; they never need reordering among rows that
        share a source (the beams of one sentence). The caller selects the `memory` and `src`
        rows of later decode calls the same way as the cross-attention caches.
        """
        rows = Reorder(index)
        sources = None if source_index is None else Reorder(source_index)
        for cache in self.layers:
            cache.reorder(rows, sources)


def incremental_mask(new: int, total: int, device: torch.device) -> Tensor | None:
    """Causal mask (new, total) for `new` queries appended after total-new cached keys."""
    if new == 1:
        return None  # the single new query may attend to every cached key and itself
    # Query i sits at absolute position total-new+i and may see keys up to that position.
    return torch.ones(new, total, dtype=torch.bool, device=device).tril(diagonal=total - new)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder memory, then feed-forward."""

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn_dim: int,
        dropout: float,
        attn_dropout: float,
        activation: str,
        prenorm: bool,
    ) -> None:
        super().__init__()
        self.prenorm = prenorm
        self.self_attn = MultiHeadAttention(dim, heads, attn_dropout)
        self.cross_attn = MultiHeadAttention(dim, heads, attn_dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout, activation)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = Dropout(dropout)

    def _self_attention(self, x: Tensor, cache: LayerCache | None) -> Tensor:
        q, k, v = self.self_attn.project_qkv(x)  # (B, H, T, hd) each
        if cache is None:
            # Target padding needs no key mask: causality hides later pads, the loss ignores pads.
            return self.self_attn.attend_heads(q, k, v, is_causal=True)  # (B, T, D)
        dtype = cache_dtype(x)
        k, v = cache.append(k.to(dtype), v.to(dtype))  # (B, H, step+T, hd) each
        mask = incremental_mask(x.size(1), k.size(2), x.device)
        return self.self_attn.attend_heads(q, k, v, mask=mask, cached=True)  # (B, T, D)

    def _cross_attention(
        self, x: Tensor, memory: Tensor, src_mask: Tensor | None, cache: LayerCache | None
    ) -> Tensor:
        if cache is None:
            k, v = self.cross_attn.project_kv(memory)  # (B, H, S, hd) each
        else:
            if cache.cross_k is None:  # the memory is fixed, so project it only once
                k, v = self.cross_attn.project_kv(memory)  # (B, H, S, hd) each
                dtype = cache_dtype(x)
                # Contiguous, copied once: a CPU step multiplies them without copying them.
                cache.cross_k = k.to(dtype).contiguous()  # (B, H, S, hd)
                cache.cross_v = v.to(dtype).contiguous()
            k, v = cache.cross_k, cache.cross_v
        # G = N / B target rows per source (beams): they become G * T queries of that source,
        # so the source keys/values are neither copied G times nor reordered with the beams.
        N, T, D = x.shape
        queries = x.reshape(memory.size(0), -1, D)  # (B, G*T, D)
        out = self.cross_attn(queries, k, v, mask=src_mask, cached=cache is not None)
        return out.reshape(N, T, D)  # (N, T, D)

    def forward(
        self, x: Tensor, memory: Tensor, src_mask: Tensor | None, cache: LayerCache | None = None
    ) -> Tensor:
        """x (N, T, D), memory (B, S, D), src_mask (B, 1, 1, S) or None -> (N, T, D); N = G * B."""
        drop, pre = self.dropout, self.prenorm
        x = residual(x, lambda h: self._self_attention(h, cache), self.norm1, drop, pre)
        x = residual(
            x, lambda h: self._cross_attention(h, memory, src_mask, cache), self.norm2, drop, pre
        )
        return residual(x, self.ffn, self.norm3, drop, pre)  # (B, T, D)


class Transformer(nn.Module):
    """Encoder-decoder Transformer with sinusoidal positions and tied output projection."""

    def __init__(self, config: ModelConfig, src_vocab: int, tgt_vocab: int) -> None:
        super().__init__()
        if config.share_embeddings and src_vocab != tgt_vocab:
            raise ValueError(
                f"share_embeddings needs one joint vocabulary, but src_vocab={src_vocab} "
                f"!= tgt_vocab={tgt_vocab}; use a joint vocabulary or set share_embeddings=False"
            )
        self.config = config  # the shape it was built with, read by export and reports
        self.max_positions = config.max_positions
        dim = config.dim
        self.embed_scale = math.sqrt(dim)
        # The target embedding doubles as the output projection (two-way tie); sharing it with
        # the source too gives the paper's three-way tie.
        self.tgt_embed = nn.Embedding(tgt_vocab, dim, padding_idx=PAD_ID)
        self.src_embed = (
            self.tgt_embed
            if config.share_embeddings
            else nn.Embedding(src_vocab, dim, padding_idx=PAD_ID)
        )
        # Non-persistent: recomputed on construction, so it never bloats checkpoints.
        self.register_buffer(
            "positions", sinusoidal_positions(config.max_positions, dim), persistent=False
        )
        self.dropout = Dropout(config.dropout)
        layer_args = (
            dim,
            config.heads,
            config.ffn_dim,
            config.dropout,
            config.attn_dropout,
            config.activation,
            config.prenorm,
        )
        self.encoder = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(config.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(config.dec_layers))
        # Pre-norm leaves the residual stream unnormalised, so each stack ends with a LayerNorm.
        self.enc_norm = nn.LayerNorm(dim) if config.prenorm else nn.Identity()
        self.dec_norm = nn.LayerNorm(dim) if config.prenorm else nn.Identity()
        # None: logits come from the tied projection. mt.quantize puts an int8 copy of it here.
        self.output_layer: nn.Module | None = None
        self._init_weights(dim)

    def _init_weights(self, dim: int) -> None:
        """fairseq-style init: Xavier-uniform linears, zero biases, normal(0, D^-0.5) embeddings."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=dim**-0.5)
                nn.init.zeros_(module.weight[PAD_ID])

    def _embed(self, embedding: nn.Embedding, tokens: Tensor, start: int) -> Tensor:
        """Scaled embeddings plus positions start..start+L-1, then dropout: (B, L) -> (B, L, D)."""
        length = tokens.size(1)
        if start + length > self.max_positions:
            raise ValueError(
                f"sequence reaches position {start + length}, "
                f"beyond max_positions={self.max_positions}"
            )
        x = embedding(tokens) * self.embed_scale  # (B, L, D)
        x = x + self.positions[start : start + length]  # (L, D) broadcast over B
        return self.dropout(x)  # (B, L, D)

    def source_mask(
        self, src: Tensor, x: Tensor, padded: bool, cached: bool = False
    ) -> Tensor | None:
        """The key mask (B, 1, 1, S) of src for attention over x's keys, None without padding.

        cached: for keys held in a decoding cache, in the cache's dtype (cache_dtype).
        """
        if not padded:
            return None
        return key_padding_mask(src, PAD_ID, cache_dtype(x) if cached else attention_dtype(x))

    def encode(self, src: Tensor, padded: bool = True) -> Tensor:
        """Source tokens (B, S) -> encoder memory (B, S, D); padded=False: src holds no pad."""
        x = self._embed(self.src_embed, src, 0)  # (B, S, D)
        src_mask = self.source_mask(src, x, padded)  # (B, 1, 1, S) or None
        for layer in self.encoder:
            x = layer(x, src_mask)  # (B, S, D)
        return self.enc_norm(x)  # (B, S, D)

    def decode(
        self,
        tgt_in: Tensor,
        memory: Tensor,
        src: Tensor,
        state: DecoderState | None = None,
        padded: bool = True,
    ) -> Tensor:
        """Target tokens (N, T) -> logits (N, T, V); with a state, tgt_in holds only new tokens.

        memory (B, S, D) and src (B, S) have one row per source; N is a multiple G of B, and
        target rows g*G .. g*G+G-1 all belong to source g (G = 1 but for beam search).
        padded=False: src holds no pad.
        """
        start = 0 if state is None else state.step
        x = self._embed(self.tgt_embed, tgt_in, start)  # (N, T, D)
        src_mask = self.source_mask(src, x, padded, cached=state is not None)  # (B, 1, 1, S)
        for i, layer in enumerate(self.decoder):
            cache = None if state is None else state.layers[i]
            x = layer(x, memory, src_mask, cache)  # (N, T, D)
        x = self.dec_norm(x)  # (N, T, D)
        if state is not None:
            state.step += tgt_in.size(1)
        if self.output_layer is not None:
            return self.output_layer(x)  # (N, T, V)
        return F.linear(x, self.tgt_embed.weight)  # (N, T, V), tied projection without bias

    def forward(self, src: Tensor, tgt_in: Tensor, padded: bool = True) -> Tensor:
        """Teacher-forced pass: src (B, S), tgt_in (B, T) -> logits (B, T, V).

        padded=False promises that src holds no pad: attention then runs without a mask. Callers
        tell it from the batch on the CPU: reading src on a GPU would make the host wait.
        """
        return self.decode(tgt_in, self.encode(src, padded), src, padded=padded)

    def init_state(self, max_len: int = 16) -> DecoderState:
        """An empty incremental decoding state for a new batch of outputs of about max_len.

        A longer output still fits: the caches grow, at the cost of a copy.
        """
        return DecoderState(len(self.decoder), max_len)
