"""CTranslate2 conversion: an mt model as a CTranslate2 TransformerSpec, saved for `mt export`.

CTranslate2 stores mt's own position table (sin on even, cos on odd dims) and scales embeddings
by sqrt(D) as mt does; the key projection, which has no bias in mt, gets zeros.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from mt.errors import MtError
from mt.model import FeedForward, MultiHeadAttention, Transformer
from mt.tokenizer import Tokenizer
from mt.vocab import BOS_ID, EOS_ID

INSTALL_CT2 = "pip install 'mt[export]' (or pip install ctranslate2)"


def _numpy(tensor: Tensor) -> Any:
    """A float32 copy: CT2 quantizes its arrays in place, which must not touch the model."""
    return tensor.detach().float().cpu().clone().numpy()


def import_ctranslate2() -> ModuleType:
    """The ctranslate2 module, or a one-line MtError saying how to install it."""
    try:
        import ctranslate2
    except ImportError:
        raise MtError(f"mt export --format ct2 needs CTranslate2: {INSTALL_CT2}") from None
    return ctranslate2


def _set_linear(spec: Any, weight: Tensor, bias: Tensor | None = None) -> None:
    spec.weight = _numpy(weight)
    if bias is not None:
        spec.bias = _numpy(bias)


def _set_norm(spec: Any, norm: nn.LayerNorm) -> None:
    spec.gamma, spec.beta = _numpy(norm.weight), _numpy(norm.bias)


def _set_self_attention(spec: Any, attn: MultiHeadAttention, norm: nn.LayerNorm) -> None:
    """CT2 self-attention: one fused [q; k; v] projection, then the output projection."""
    _set_linear(spec.linear[0], *attn.stacked("qkv"))  # (3D, D), (3D,)
    _set_linear(spec.linear[1], attn.out_proj.weight, attn.out_proj.bias)
    _set_norm(spec.layer_norm, norm)


def _set_cross_attention(spec: Any, attn: MultiHeadAttention, norm: nn.LayerNorm) -> None:
    """CT2 encoder-decoder attention: q, a fused [k; v] projection, then the output projection."""
    _set_linear(spec.linear[0], attn.q_proj.weight, attn.q_proj.bias)
    _set_linear(spec.linear[1], *attn.stacked("kv"))  # (2D, D), (2D,)
    _set_linear(spec.linear[2], attn.out_proj.weight, attn.out_proj.bias)
    _set_norm(spec.layer_norm, norm)


def _set_ffn(spec: Any, ffn: FeedForward, norm: nn.LayerNorm) -> None:
    _set_linear(spec.linear_0, ffn.fc1.weight, ffn.fc1.bias)
    _set_linear(spec.linear_1, ffn.fc2.weight, ffn.fc2.bias)
    _set_norm(spec.layer_norm, norm)


def _set_inputs(spec: Any, embedding: nn.Embedding, positions: Tensor) -> None:
    """Token embeddings (scaled by sqrt(D) by CT2, as by mt) and mt's own position table."""
    embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    embeddings.weight = _numpy(embedding.weight)
    spec.scale_embeddings = True
    spec.position_encodings.encodings = _numpy(positions)  # (max_positions, D)


def ct2_spec(model: Transformer, tokenizer: Tokenizer) -> Any:
    """A validated CTranslate2 TransformerSpec holding the model's weights and vocabularies."""
    ctranslate2 = import_ctranslate2()
    specs = ctranslate2.specs
    acts = {"relu": specs.Activation.RELU, "gelu": specs.Activation.GELU}
    shape = model.config
    spec = specs.TransformerSpec.from_config(
        (shape.enc_layers, shape.dec_layers),
        shape.heads,
        pre_norm=shape.prenorm,
        activation=acts[shape.activation],
    )
    encoder, decoder = spec.encoder, spec.decoder
    _set_inputs(encoder, model.src_embed, model.positions)
    _set_inputs(decoder, model.tgt_embed, model.positions)
    decoder.projection.weight = _numpy(model.tgt_embed.weight)  # tied, no bias
    if shape.prenorm:
        _set_norm(encoder.layer_norm, model.enc_norm)
        _set_norm(decoder.layer_norm, model.dec_norm)
    for layer_spec, layer in zip(encoder.layer, model.encoder, strict=True):
        _set_self_attention(layer_spec.self_attention, layer.self_attn, layer.norm1)
        _set_ffn(layer_spec.ffn, layer.ffn, layer.norm2)
    for layer_spec, layer in zip(decoder.layer, model.decoder, strict=True):
        _set_self_attention(layer_spec.self_attention, layer.self_attn, layer.norm1)
        _set_cross_attention(layer_spec.attention, layer.cross_attn, layer.norm2)
        _set_ffn(layer_spec.ffn, layer.ffn, layer.norm3)
    spec.register_source_vocabulary(tokenizer.vocabulary("src"))
    spec.register_target_vocabulary(tokenizer.vocabulary("tgt"))
    _set_ct2_config(spec.config, tokenizer, model.encoder[0].norm1.eps)
    spec.validate()
    return spec


def _set_ct2_config(config: Any, tokenizer: Tokenizer, eps: float) -> None:
    """Special tokens as mt uses them: decoding starts from BOS, sources end with EOS."""
    config.unk_token = tokenizer.tgt.id_to_piece(tokenizer.tgt.unk_id())
    config.bos_token = config.decoder_start_token = tokenizer.tgt.id_to_piece(BOS_ID)
    config.eos_token = tokenizer.tgt.id_to_piece(EOS_ID)
    config.add_source_bos, config.add_source_eos = False, True
    config.layer_norm_epsilon = eps  # CT2's default (1e-6) is not torch's


def save_ct2(
    model: Transformer, tokenizer: Tokenizer, directory: Path, quantization: str | None
) -> None:
    """Write model.bin, config.json and the vocabularies of the CT2 model into `directory`."""
    spec = ct2_spec(model, tokenizer)
    spec.optimize(quantization=quantization)  # also stores tied weights once
    spec.save(str(directory))


def check_quantization(quantization: str | None) -> None:
    """MtError unless CTranslate2 knows the weight type."""
    if quantization is None:
        return
    known = import_ctranslate2().specs.model_spec.ACCEPTED_MODEL_TYPES
    if quantization not in known:
        raise MtError(f"--quantization {quantization}: expected one of {', '.join(known)}")
