"""Hugging Face conversion: an mt model as a `MarianMTModel` computing the same function.

Marian always rebuilds its own [sin half | cos half] position table when it loads, where mt's
has sin on even and cos on odd dims, so the export permutes the residual dimensions
(embeddings, LayerNorms, the rows or columns of every projection that reads or writes the
residual stream): the same function, with Marian's table in place of mt's. Marian is post-norm
only. The key projection, which has no bias in mt, gets zeros, frozen.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mt.config import Config, DecodeConfig
from mt.errors import MtError
from mt.model import FeedForward, MultiHeadAttention, Transformer
from mt.tokenizer import Tokenizer
from mt.vocab import BOS_ID, EOS_ID, PAD_ID

INSTALL_HF = "pip install 'mt[bench]' (or pip install transformers)"


def import_transformers() -> None:
    """MtError with the install command when transformers is missing."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise MtError(f"mt export --format hf needs transformers: {INSTALL_HF}") from None


def marian_obstacle(model: Transformer) -> str | None:
    """Why MarianMTModel cannot compute this model's function, or None when it can."""
    if model.config.prenorm:
        return "model.prenorm=true cannot be represented by MarianMTModel (post-norm only)"
    return None


def residual_permutation(dim: int) -> Tensor:
    """Dims of mt's residual stream in Marian's order: even (sin) dims, then odd (cos) dims."""
    return torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])  # (D,)


def marian_from_mt(model: Transformer) -> Any:
    """A MarianMTModel computing the same function as the post-norm mt `model`.

    Same shapes, weights copied with the residual dims permuted (`residual_permutation`), so
    Marian's own [sin | cos] position table, which it rebuilds on loading, equals mt's
    interleaved one; mt has no key bias, so Marian's is zeroed and frozen; final_logits_bias
    stays zero. Source and target embeddings are shared when mt shares them.
    """
    from transformers import MarianConfig, MarianMTModel

    reason = marian_obstacle(model)
    if reason is not None:
        raise ValueError(reason)
    shape = model.config
    config = MarianConfig(
        vocab_size=model.src_embed.num_embeddings,
        decoder_vocab_size=model.tgt_embed.num_embeddings,
        share_encoder_decoder_embeddings=shape.share_embeddings,
        d_model=shape.dim,
        encoder_layers=shape.enc_layers,
        decoder_layers=shape.dec_layers,
        encoder_attention_heads=shape.heads,
        decoder_attention_heads=shape.heads,
        encoder_ffn_dim=shape.ffn_dim,
        decoder_ffn_dim=shape.ffn_dim,
        max_position_embeddings=shape.max_positions,
        activation_function=shape.activation,
        dropout=shape.dropout,
        activation_dropout=shape.dropout,  # mt's FFN dropout is the model's dropout
        attention_dropout=shape.attn_dropout,
        scale_embedding=True,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        forced_eos_token_id=None,  # set per use: the export's generation config forces EOS
        decoder_start_token_id=BOS_ID,
    )
    config._attn_implementation = "sdpa"  # mt uses scaled_dot_product_attention too
    hf = MarianMTModel(config)
    with torch.no_grad():
        _copy_weights(model, hf.model, residual_permutation(shape.dim))
        hf.final_logits_bias.zero_()
    if hf.lm_head.weight.data_ptr() != hf.model.decoder.embed_tokens.weight.data_ptr():
        raise RuntimeError("Marian's output projection is not tied to its embeddings")
    return hf


def _copy_weights(model: Transformer, inner: Any, perm: Tensor) -> None:
    """mt's weights into a MarianModel whose residual dim i is mt's dim perm[i]."""
    inner.encoder.embed_tokens.weight.copy_(model.src_embed.weight[:, perm])
    inner.decoder.embed_tokens.weight.copy_(model.tgt_embed.weight[:, perm])
    for stack in (inner.encoder, inner.decoder):
        stack.embed_positions.weight.copy_(model.positions[:, perm])
    for mine, theirs in zip(model.encoder, inner.encoder.layers, strict=True):
        _copy_attention(mine.self_attn, theirs.self_attn, perm)
        _copy_norm(mine.norm1, theirs.self_attn_layer_norm, perm)
        _copy_ffn(mine.ffn, theirs, perm)
        _copy_norm(mine.norm2, theirs.final_layer_norm, perm)
    for mine, theirs in zip(model.decoder, inner.decoder.layers, strict=True):
        _copy_attention(mine.self_attn, theirs.self_attn, perm)
        _copy_norm(mine.norm1, theirs.self_attn_layer_norm, perm)
        _copy_attention(mine.cross_attn, theirs.encoder_attn, perm)
        _copy_norm(mine.norm2, theirs.encoder_attn_layer_norm, perm)
        _copy_ffn(mine.ffn, theirs, perm)
        _copy_norm(mine.norm3, theirs.final_layer_norm, perm)


def _copy_norm(src: nn.LayerNorm, dst: nn.LayerNorm, perm: Tensor) -> None:
    """LayerNorm is permutation-equivariant: permute its gain and bias with the residual."""
    dst.weight.copy_(src.weight[perm])
    dst.bias.copy_(src.bias[perm])


def _copy_reader(src: nn.Linear, dst: nn.Linear, perm: Tensor) -> None:
    """A projection from the residual stream: its input columns follow the permutation."""
    dst.weight.copy_(src.weight[:, perm])
    dst.bias.copy_(src.bias)


def _copy_writer(src: nn.Linear, dst: nn.Linear, perm: Tensor) -> None:
    """A projection into the residual stream: its output rows follow the permutation."""
    dst.weight.copy_(src.weight[perm])
    dst.bias.copy_(src.bias[perm])


def _copy_attention(src: MultiHeadAttention, dst: Any, perm: Tensor) -> None:
    _copy_reader(src.q_proj, dst.q_proj, perm)
    _copy_reader(src.v_proj, dst.v_proj, perm)
    dst.k_proj.weight.copy_(src.k_proj.weight[:, perm])
    dst.k_proj.bias.zero_()
    dst.k_proj.bias.requires_grad_(False)  # mt has no key bias: keep the functions equal
    _copy_writer(src.out_proj, dst.out_proj, perm)


def _copy_ffn(src: FeedForward, dst: Any, perm: Tensor) -> None:
    _copy_reader(src.fc1, dst.fc1, perm)
    _copy_writer(src.fc2, dst.fc2, perm)


def generation_config(decode: DecodeConfig, max_positions: int) -> Any:
    """Marian generate() settings like mt's search: PAD/BOS banned, EOS forced at the limit.

    `max_new_tokens` is mt's cap; pass mt's per-sentence limit (a * source length + b) instead.
    HF's beam penalty is length^p like CT2's (see `ct2_options`): "gnmt" is approximated with
    p = alpha. A run that samples exports sampling with its temperature, top-k and top-p (one
    sample per sentence: mt ranks max(beam, nbest) samples, which generate() cannot do).
    """
    from transformers import GenerationConfig

    search: dict[str, Any] = {"num_beams": decode.beam, "do_sample": False}
    if decode.sampling:
        search = {
            "num_beams": 1,
            "do_sample": True,
            "temperature": decode.temperature,
            "top_k": decode.top_k,  # 0: no top-k, as mt's
            "top_p": decode.top_p,
        }
    elif decode.beam > 1:  # early stopping: fairseq's (and mt's) rule, stop at `beam` finished
        search |= {"early_stopping": True, "length_penalty": hf_length_penalty(decode)}
    return GenerationConfig(
        max_new_tokens=max_positions - 1,  # mt's cap: max_positions - 2 tokens + EOS
        min_new_tokens=decode.min_len or None,
        decoder_start_token_id=BOS_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        forced_eos_token_id=EOS_ID,
        suppress_tokens=[PAD_ID, BOS_ID],
        **search,
    )


def hf_length_penalty(decode: DecodeConfig) -> float:
    """The exponent p of HF's beam penalty length^p closest to mt's length penalty."""
    return {"gnmt": decode.alpha, "average": 1.0, "none": 0.0}[decode.length_penalty]


def save_marian(model: Transformer, tokenizer: Tokenizer, config: Config, directory: Path) -> None:
    """Write config.json, generation_config.json, model.safetensors and the tokenizer files."""
    hf = marian_from_mt(model).eval()
    hf.generation_config = generation_config(config.decode, model.max_positions)
    with _quiet_transformers():
        hf.save_pretrained(directory)  # safetensors; Marian leaves its position tables out
        save_marian_tokenizer(tokenizer, config, directory)


def save_marian_tokenizer(tokenizer: Tokenizer, config: Config, directory: Path) -> None:
    """source.spm, target.spm, vocab.json (+ target_vocab.json) and tokenizer_config.json.

    The vocabularies map each piece to its SentencePiece id, so MarianTokenizer gives mt's ids;
    a joint SentencePiece model serves as both source.spm and target.spm.
    """
    from transformers import MarianTokenizer

    shutil.copyfile(tokenizer.paths[0], directory / "source.spm")
    shutil.copyfile(tokenizer.paths[-1], directory / "target.spm")
    _write_json(directory / "vocab.json", {p: i for i, p in enumerate(tokenizer.vocabulary("src"))})
    target_vocab = None
    if not tokenizer.joint:
        target_vocab = directory / "target_vocab.json"
        _write_json(target_vocab, {p: i for i, p in enumerate(tokenizer.vocabulary("tgt"))})
    MarianTokenizer(
        source_spm=str(directory / "source.spm"),
        target_spm=str(directory / "target.spm"),
        vocab=str(directory / "vocab.json"),
        target_vocab_file=str(target_vocab) if target_vocab else None,
        separate_vocabs=not tokenizer.joint,
        source_lang=config.data.directions()[0].src_lang,
        target_lang=config.data.directions()[0].tgt_lang,
        model_max_length=config.model.max_positions,  # mt: max_positions - 1 pieces + EOS
        split_special_tokens=True,  # "</s>" in a source is text, as SentencePiece reads it in mt
    ).save_pretrained(directory)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars, and no advice to install sacremoses (MarianTokenizer never uses it)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
            yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _write_json(path: Path, data: dict[str, int]) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
