"""Linear layers with their weights packed once by oneDNN, for decoding on a CPU (fp32, bf16).

nn.Linear on a CPU hands the BLAS (or, under bf16 autocast, oneDNN) a plain weight matrix at
every call; oneDNN's linear takes the weight already laid out for its kernel, once per model,
and multiplies the decoder's matrices faster, most at the small batches of a server
(docs/benchmarks.md, "Packed linear layers"). `mt translate`, `mt evaluate` and `mt serve`
decode with it on a CPU. In fp32 the sums are the same up to float rounding (oneDNN adds in
another order), so a score may differ from the plain model's in its last bits, and rarely a
translation with it. In bf16 a packed layer does what autocast does to nn.Linear (bf16 input,
weight and bias; bf16 output), with the weight cast and packed once instead of at every batch.

Two products become one where decoding allows it: each self-attention's query, key and value
projections (`MultiHeadAttention.qkv_proj`), and each feed-forward block's first layer with its
ReLU or GELU, which oneDNN applies as the product is written (docs/benchmarks.md, "Decoding steps
on a CPU with fewer, larger operations").

oneDNN's packed product wins at a server's small batches, but on some CPUs torch's BLAS (MKL)
multiplies large ones faster (docs/benchmarks.md, "Large batches through BLAS"). So an fp32 model
is calibrated when packed: each distinct layer shape is timed both ways at a few row counts
(BLAS_ROWS), and a shape BLAS wins hands it every batch from the fewest rows it won at. The
choice is timed, so it may differ between runs on one machine, and with it a score's last bits.

The ops are torch.ops.mkldnn's `_reorder_linear_weight` and `_linear_pointwise`, which
torch.compile's CPU backend uses for frozen linear layers. They are private: where this torch
build lacks them, oneDNN, or (for bf16) oneDNN's bf16 support on this CPU, `pack` leaves the
model as it is. A packed model is for decoding only: training it would change its nn.Linear
weights but not the packed copies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mt.device import TIMED_CALLS, Features, time_linear
from mt.model import FeedForward, MultiHeadAttention, Transformer
from mt.search import Decoder, Ensemble


def available() -> bool:
    """Whether this torch build has oneDNN and the two ops `PackedLinear` calls."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the precisions packing serves


# oneDNN's name and algorithm for each activation, and the same applied after a BLAS product.
ACTIVATIONS: dict[type, tuple[str, str, Callable[[Tensor], Tensor]]] = {
    nn.ReLU: ("relu", "", torch.relu_),
    nn.GELU: ("gelu", "none", F.gelu),
}
BLAS_ROWS = (256, 2048)  # the rows at which `calibrate` times packed layers against BLAS
BLAS_BUDGET = 0.5  # seconds of matrix products `calibrate` may spend at start-up

log = logging.getLogger("mt")


class PackedLinear(nn.Module):
    """y = act(x W^T + b), W packed by oneDNN: (..., in) -> (..., out) in `dtype`, CPU, no grads.

    The input is cast to `dtype` (bf16 autocast hands some layers fp32 activations). act: none,
    or a key of ACTIVATIONS (ReLU, or GELU without its tanh approximation), applied by oneDNN.
    blas_rows: in fp32, batches of at least that many rows go to BLAS instead (see calibrate).
    """

    def __init__(
        self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype, act: type | None = None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.act = act
        self.post, self.algorithm, self.apply_act = (
            ACTIVATIONS[act] if act is not None else ("none", "", None)
        )
        self.blas_rows: int | None = None
        # The dense fp32 weight stays referenced (shared with the module it replaces, no copy)
        # so that a deep copy can pack it again: oneDNN's packed tensor has no storage to copy.
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.to(dtype), None)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out)."""
        x = x if x.dtype == self.dtype else x.to(self.dtype)
        if self.blas_rows is not None and x.numel() >= self.blas_rows * self.in_features:
            return self.blas(x)
        ops = torch.ops.mkldnn
        return ops._linear_pointwise(x, self.packed, self.bias, self.post, [], self.algorithm)

    def blas(self, x: Tensor) -> Tensor:
        """The same through torch's BLAS on the dense weight (fp32), the activation after it."""
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        return y if self.apply_act is None else self.apply_act(y)

    def __deepcopy__(self, memo: dict) -> PackedLinear:
        bias = None if self.bias is None else self.bias.clone()
        copied = PackedLinear(self.weight.clone(), bias, self.dtype, self.act)
        copied.blas_rows = self.blas_rows
        return copied

    def extra_repr(self) -> str:
        act = "" if self.act is None else f", then {self.post}"
        blas = "" if self.blas_rows is None else f", BLAS from {self.blas_rows} rows"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"dtype={self.dtype}, oneDNN packed{act}{blas}"
        )


def packs(device: torch.device, precision: str) -> bool:
    """Whether decoding on `device` in `precision` runs packed layers."""
    if device.type != "cpu" or precision not in DTYPES or not available():
        return False
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # this CPU's bf16
    return precision == "fp32" or (bf16 is not None and bool(bf16()))


def pack(model: Decoder, device: torch.device, precision: str) -> Decoder:
    """`model` (each model of an ensemble) with its linear layers packed, where `packs` says so.

    Changed in place, in `precision`; a quantised model stays as it is.
    """
    if not packs(device, precision):
        return model
    for each in model.models if isinstance(model, Ensemble) else [model]:
        pack_transformer(each, DTYPES[precision])
    return model


def pack_transformer(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Fuse where decoding allows; swap each nn.Linear for a PackedLinear; pack the tied output."""
    if model.output_layer is not None:  # quantised (mt.quantize): its layers are not fp32
        return model
    for layer in [*model.encoder, *model.decoder]:
        fuse_self_attention(layer.self_attn, dtype)
        fuse_activation(layer.ffn, dtype)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PackedLinear(child.weight, child.bias, dtype))
    model.output_layer = PackedLinear(model.tgt_embed.weight, None, dtype)  # the tied projection
    if dtype == torch.float32:
        calibrate(model)
    return model


def calibrate(
    model: Transformer, ladder: tuple[int, ...] = BLAS_ROWS, budget: float = BLAS_BUDGET
) -> dict[Features, int]:
    """Hand BLAS the large batches of the fp32 layers whose shapes it multiplies faster.

    Every distinct (in, out) shape is timed packed and through BLAS at the `ladder`'s rows,
    fewest first, until BLAS wins; the shape's layers then hand BLAS every batch of at least
    those rows. A shape BLAS never wins, or that the `budget` cuts short, stays packed. Returns
    {shape: rows} for the shapes handed to BLAS.
    """
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    layers = [m for m in layers if m.dtype == torch.float32]
    chosen: dict[Features, int] = {}
    spent = 0.0
    for rows in ladder:  # every shape at one rung before any at the next: the budget may end
        for shape in sorted({(m.in_features, m.out_features) for m in layers} - set(chosen)):
            won, seconds = blas_wins(shape, rows, budget - spent)
            spent += seconds
            if won:
                chosen[shape] = rows
    for m in layers:
        m.blas_rows = chosen.get((m.in_features, m.out_features))
    said = ", ".join(f"{n} -> {k} from {rows} rows" for (n, k), rows in chosen.items())
    log.debug("packed fp32 layers handing large batches to BLAS: %s", said or "none")
    return chosen


def blas_wins(shape: Features, rows: int, budget: float) -> tuple[bool, float]:
    """Whether BLAS multiplied `rows` rows of `shape` faster than a packed layer; seconds spent.

    Each way's fastest of TIMED_CALLS calls counts, after an untimed one.
    """
    packed = time_packed_layer("fp32", rows, shape, budget)
    blas = time_linear("fp32", rows, shape, budget - sum(packed))  # nn.Linear's product
    whole = len(packed) == len(blas) == 1 + TIMED_CALLS
    return whole and min(blas[1:]) < min(packed[1:]), sum(packed) + sum(blas)


def fuse_self_attention(attn: MultiHeadAttention, dtype: torch.dtype) -> None:
    """Give a self-attention one packed layer for q, k and v (qkv_proj) in place of its three."""
    attn.qkv_proj = PackedLinear(*attn.stacked("qkv"), dtype)
    attn.q_proj = attn.k_proj = attn.v_proj = None  # decoding calls qkv_proj alone


def fuse_activation(ffn: FeedForward, dtype: torch.dtype) -> None:
    """Pack ffn's first layer with its activation applied by oneDNN, where oneDNN has it."""
    act = type(ffn.act)
    if act in ACTIVATIONS and getattr(ffn.act, "approximate", "none") == "none":
        ffn.fc1 = PackedLinear(ffn.fc1.weight, ffn.fc1.bias, dtype, act)
        ffn.act = nn.Identity()  # applied by fc1


def time_packed(precision: str, rows: int, features: Features, budget: float) -> list[float]:
    """mt.device.time_linear through what decoding runs: the packed layer where `packs` says so,
    and in fp32 also nn.Linear's product, which calibrate hands large batches to where it is
    faster: the faster of the two counts (see faster).

    `mt translate --precision auto` times fp32 against bf16 with it (mt.device.resolve_precision).
    """
    if not packs(torch.device("cpu"), precision):
        return time_linear(precision, rows, features, budget)
    packed = time_packed_layer(precision, rows, features, budget)
    if precision != "fp32":
        return packed
    return faster(packed, time_linear(precision, rows, features, budget - sum(packed)))


def time_packed_layer(precision: str, rows: int, features: Features, budget: float) -> list[float]:
    """mt.device.time_linear through a packed layer."""
    dtype = DTYPES[precision]
    return time_linear(precision, rows, features, budget, lambda w: PackedLinear(w, None, dtype))


def faster(first: list[float], second: list[float]) -> list[float]:
    """Of two time_linear timings, the one with the faster fastest timed call (one cut short by
    the budget loses), the other's seconds added to its untimed first call: all were spent."""
    whole = [t for t in (first, second) if len(t) == 1 + TIMED_CALLS]
    best = min(whole, key=lambda t: min(t[1:])) if whole else (first or second)
    other = second if best is first else first
    return [best[0] + sum(other), *best[1:]] if best else []
