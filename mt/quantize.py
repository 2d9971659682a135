"""int8 dynamic quantisation of a trained model's matrix products, for decoding on a CPU.

`--quantize int8` stores each linear layer's weights, and the tied output projection's, as int8
with one scale per output row; activations are quantised on the fly, one scale per batch
(dynamic quantisation: no calibration data), so a sentence's output may depend on its batch
mates. Embedding lookups, layer norms and attention stay fp32. The outputs differ from fp32
decoding by more than rounding: docs/benchmarks.md reports the BLEU cost and the speed next to
fp32 and CTranslate2's int8.

It uses torch's eager dynamic quantisation (torch.ao.quantization.quantize_dynamic, the
fbgemm/oneDNN int8 kernels). torch marks it deprecated in favour of torchao, whose eager int8
linear was far slower than this path when tried on a CPU, so this stays until torch removes it;
then `--quantize int8` says so.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from mt.errors import MtError
from mt.model import Transformer
from mt.search import Decoder, Ensemble

QUANTIZATIONS = ("none", "int8")


def check_quantization(kind: str, device: torch.device, precision: str) -> None:
    """MtError naming the option when `kind` cannot run on `device` at `precision`."""
    if kind not in QUANTIZATIONS:
        raise MtError(f"--quantize {kind}: expected one of {', '.join(QUANTIZATIONS)}")
    if kind == "none":
        return
    if device.type != "cpu":
        raise MtError(f"--quantize {kind} runs on the CPU, not {device}: add --device cpu")
    if precision not in ("auto", "fp32"):
        raise MtError(f"--quantize {kind} decodes in fp32: drop --precision {precision}")


def quantize(model: Decoder, kind: str) -> Decoder:
    """`model` (each model of an ensemble) with its matrix products in `kind`; changed in place."""
    if kind == "none":
        return model
    for each in model.models if isinstance(model, Ensemble) else [model]:
        quantize_int8(each)
    return model


def quantize_int8(model: Transformer) -> Transformer:
    """Swap every nn.Linear for its int8 dynamic version and add an int8 output projection."""
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        raise MtError(
            f"--quantize int8: torch {torch.__version__} has no dynamic int8 quantisation "
            "(torch.ao.quantization); use --quantize none"
        ) from None
    spec = {nn.Linear: per_channel_dynamic_qconfig}
    with warnings.catch_warnings():  # its deprecation notices: nothing a user can act on
        warnings.simplefilter("ignore")
        quantize_dynamic(model, spec, inplace=True)
        # The output projection is the target embedding's matrix (tied), not an nn.Linear: an
        # int8 copy of it takes its place, while the lookups keep the fp32 embedding.
        vocab, dim = model.tgt_embed.weight.shape
        projection = nn.Linear(dim, vocab, bias=False)
        projection.weight = nn.Parameter(model.tgt_embed.weight.detach().clone())
        model.output_layer = quantize_dynamic(nn.Sequential(projection), spec)[0]
    return model
