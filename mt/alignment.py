"""Cross-attention weights of a translation, for inspection and `mt attention` heatmaps.

SDPA returns attention outputs, not weights, so the weights are recomputed from what each
decoder layer's cross-attention receives, with the same formula:
softmax(q k^T / sqrt(hd)) over the real (non-pad) source keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mt import search
from mt.batching import collate_source
from mt.config import DecodeConfig
from mt.errors import MtError
from mt.model import MultiHeadAttention, Transformer
from mt.plot import plot_attention
from mt.rundir import load_trained
from mt.tokenizer import LINE_BREAKS, Tokenizer, leading_tag
from mt.translate import check_target, decode_settings, encode_sources, resolve_runtime
from mt.vocab import BOS_ID, EOS_ID


@dataclass
class Alignment:
    """A translation and its cross-attention: weights (layers, heads, T, S)."""

    source_pieces: list[str]  # S labels: the source pieces, then </s>
    target_pieces: list[str]  # T labels: the output pieces, then </s> (what each row predicts)
    weights: Tensor  # (layers, heads, T, S) float32, rows sum to 1 (less a hidden tag's share)
    translation: str

    def heads_averaged(self) -> Alignment:
        """The same alignment with its heads averaged into one: weights (layers, 1, T, S)."""
        return dataclasses.replace(self, weights=self.weights.mean(dim=1, keepdim=True))

    def without_first_source(self) -> Alignment:
        """The same alignment without the first source piece's column (a multilingual tag).

        The other weights are kept as they are, not renormalised: what the tag drew is missing.
        """
        return dataclasses.replace(
            self, source_pieces=self.source_pieces[1:], weights=self.weights[..., 1:]
        )


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
    model: Transformer,
    tokenizer: Tokenizer,
    sentence: str,
    decode: DecodeConfig,
    tgt_lang: str | None = None,
    show_tag: bool = False,
) -> Alignment:
    """Translate one sentence as `decode` says (never sampling), then read its cross-attention.

    A multilingual model's source starts with the tag of `tgt_lang`; the model attends to it
    like any piece, but it is not part of the sentence, so its column is left out unless
    `show_tag`.
    """
    ids = encode_sources([sentence], tokenizer, model.max_positions - 1, tgt_lang)[0]
    settings = dataclasses.replace(decode, nbest=1, sampling=False)
    best = search.decode(model, source_tensor(model, ids), settings)[0][0]
    found = alignment(model, tokenizer, ids, best.tokens)
    tagged = bool(ids) and bool(tokenizer.tags)
    return found.without_first_source() if tagged and not show_tag else found


def source_tensor(model: Transformer, ids: list[int]) -> Tensor:
    """One source sentence's ids + EOS as a batch (1, S) on the model's device."""
    device = next(model.parameters()).device
    return collate_source([ids], np.zeros(1, dtype=np.int64)).src.to(device)  # (1, S)


def alignment(
    model: Transformer, tokenizer: Tokenizer, ids: list[int], tokens: list[int]
) -> Alignment:
    """The cross-attention of a given translation (target ids without BOS/EOS) of source ids."""
    src = source_tensor(model, ids)  # (1, S)
    tgt_in = torch.tensor([[BOS_ID, *tokens]], device=src.device)  # (1, T)
    weights = cross_attention(model, src, tgt_in)[:, 0]  # (layers, H, T, S)
    pieces = tokenizer.tgt.id_to_piece  # one id -> its piece
    return Alignment(
        source_pieces=[tokenizer.src.id_to_piece(i) for i in ids] + ["</s>"],
        target_pieces=[pieces(i) for i in tokens] + ["</s>"],
        weights=weights,
        translation=tokenizer.decode_tgt([[*tokens, EOS_ID]])[0].translate(LINE_BREAKS),
    )


def check_sentence(sentence: str) -> None:
    """MtError unless `sentence` is UTF-8 text with something to translate."""
    try:
        sentence.encode("utf-8")  # a shell passes any bytes; Python keeps bad ones as surrogates
    except UnicodeEncodeError:
        raise MtError("the sentence is not valid UTF-8") from None
    if not sentence.strip():
        raise MtError("the sentence is empty: nothing to translate")


def plot_alignment(
    run: Path,
    sentence: str,
    output: Path,
    layer: int,
    beam: int | None,
    device: str,
    tgt_lang: str | None = None,
    show_tag: bool = False,
) -> tuple[str, Path]:
    """`mt attention`: a trained model's translation of `sentence` and its heatmap's path.

    The heatmap shows the cross-attention of decoder layer `layer` (1 = first; 0: one panel
    per layer), averaged over heads; a multilingual model's tag only with `show_tag`.
    """
    check_sentence(sentence)
    dev, _ = resolve_runtime(device, "fp32")
    config, tokenizer, model, _ = load_trained(run, dev)
    tagged = leading_tag(sentence)[0] is not None  # else the message asks for --tgt-lang alone
    check_target(config, tokenizer, tgt_lang, [sentence] if tagged else None, "the sentence")
    check_sentence(tokenizer.own_targets([sentence])[0][0])  # not a tag alone
    decode = decode_settings(config, beam=beam)
    found = align(model, tokenizer, sentence, decode, tgt_lang, show_tag)
    layers = len(found.weights)
    if layer > layers:
        raise MtError(f"--layer {layer}: the model has {layers} decoder layers")
    chosen = [layer] if layer else list(range(1, layers + 1))
    weights = found.weights.mean(dim=1)[[i - 1 for i in chosen]]  # (panels, T, S)
    titles = [f"decoder layer {i} cross-attention (mean of heads)" for i in chosen]
    source, target = found.source_pieces, found.target_pieces
    return found.translation, plot_attention(weights.cpu().numpy(), source, target, titles, output)
