"""`mt export`: a trained model as a CTranslate2 model or a Hugging Face `MarianMTModel`.

Both exports compute mt's function (teacher-forced log-probabilities equal to ~1e-6); what can
differ is the search around it. mt's specifics, and how each format gets them:

- Embeddings are scaled by sqrt(D); the output projection is the target embedding, no bias.
- Positions: mt's table has sin on even and cos on odd dims. CTranslate2 stores the table
  itself. Marian always rebuilds its own [sin half | cos half] table when it loads, so the
  Marian export permutes the residual dimensions (embeddings, LayerNorms, the rows or columns
  of every projection that reads or writes the residual stream): the same function, with
  Marian's table in place of mt's.
- The key projection has no bias: the exports give it zeros.
- Ids pad 0, unk 1, bos 2, eos 3: the decoder starts from BOS, sources end with EOS.

Search differences, CTranslate2 against `mt translate` (`ct2_options` maps the rest exactly):

- Length penalty. CT2 divides by L^p; mt's "average" is p = 1 and "none" a tiny p (p = 0 would
  switch CT2 to stopping at the first finished top beam, where mt, like fairseq, stops after
  `beam` finished hypotheses). mt's default "gnmt", ((5 + L) / 6)^alpha, has no CT2 form: p is
  fitted to its slope at L = the source length, alpha * L / (5 + L), so it varies per batch.
- Length limit. CT2 takes one limit per call; `translate_ct2` batches sentences by source
  length, so each gets mt's a * length + b. At the limit mt forces EOS and scores it; CT2 stops
  without it, which can reorder beam hypotheses that reach the limit.
- PAD and BOS are banned before CT2's softmax, after mt's: scores differ by
  log(1 - p(PAD) - p(BOS)) per token, which can flip near-ties in a beam, never greedy choices.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import textwrap
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from mt.checkpoint import resolve_checkpoint
from mt.config import Config, DecodeConfig
from mt.errors import MtError
from mt.files import atomic_directory
from mt.model import FeedForward, MultiHeadAttention, Transformer
from mt.rundir import load_trained
from mt.search import max_lengths
from mt.tokenizer import Tokenizer
from mt.translate import encode_sources
from mt.vocab import BOS_ID, EOS_ID, PAD_ID

log = logging.getLogger("mt")

FORMATS = ("ct2", "hf")
INSTALL_CT2 = "pip install 'mt[export]' (or pip install ctranslate2)"
INSTALL_HF = "pip install 'mt[bench]' (or pip install transformers)"
TINY_PENALTY = 1e-6  # CT2 length penalty standing in for mt's "none" (see the module docstring)


def pieces(tokenizer: Tokenizer, side: str) -> list[str]:
    """The piece of every id of the source or target SentencePiece model, in id order."""
    processor = tokenizer.src if side == "src" else tokenizer.tgt
    return [processor.id_to_piece(i) for i in range(processor.vocab_size())]


def _numpy(tensor: Tensor) -> Any:
    """A float32 copy: CT2 quantizes its arrays in place, which must not touch the model."""
    return tensor.detach().float().cpu().clone().numpy()


# ---------------------------------------------------------------------------------------------
# CTranslate2


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


def _key_bias(attn: MultiHeadAttention) -> Tensor:
    """Zeros for the key projection, which has no bias."""
    return torch.zeros(attn.k_proj.out_features)


def _set_self_attention(spec: Any, attn: MultiHeadAttention, norm: nn.LayerNorm) -> None:
    """CT2 self-attention: one fused [q; k; v] projection, then the output projection."""
    weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])  # (3D, D)
    bias = torch.cat([attn.q_proj.bias, _key_bias(attn), attn.v_proj.bias])  # (3D,)
    _set_linear(spec.linear[0], weight, bias)
    _set_linear(spec.linear[1], attn.out_proj.weight, attn.out_proj.bias)
    _set_norm(spec.layer_norm, norm)


def _set_cross_attention(spec: Any, attn: MultiHeadAttention, norm: nn.LayerNorm) -> None:
    """CT2 encoder-decoder attention: q, a fused [k; v] projection, then the output projection."""
    _set_linear(spec.linear[0], attn.q_proj.weight, attn.q_proj.bias)
    weight = torch.cat([attn.k_proj.weight, attn.v_proj.weight])  # (2D, D)
    _set_linear(spec.linear[1], weight, torch.cat([_key_bias(attn), attn.v_proj.bias]))
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
    spec.register_source_vocabulary(pieces(tokenizer, "src"))
    spec.register_target_vocabulary(pieces(tokenizer, "tgt"))
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


def ct2_options(
    decode: DecodeConfig, tokenizer: Tokenizer, source_length: int, max_positions: int
) -> dict[str, Any]:
    """`Translator.translate_batch` options for sources of `source_length` tokens (EOS included).

    mt's search with `decode` as closely as CT2 allows; see the module docstring.
    """
    if decode.sampling:
        raise ValueError("ct2_options maps greedy and beam search; sampling is not mapped")
    src = torch.ones(1, source_length, dtype=torch.long)  # any non-pad ids: only the count matters
    limit = int(max_lengths(src, decode.max_len_a, decode.max_len_b, max_positions - 1)[0])
    penalty = {
        "gnmt": decode.alpha * source_length / (5 + source_length),
        "average": 1.0,
        "none": TINY_PENALTY,
    }[decode.length_penalty]
    banned = [[tokenizer.tgt.id_to_piece(PAD_ID)], [tokenizer.tgt.id_to_piece(BOS_ID)]]
    return {
        "beam_size": decode.beam,
        "length_penalty": penalty,
        "max_decoding_length": limit - 1,  # mt's limit counts EOS, CT2's does not
        "min_decoding_length": min(decode.min_len, limit - 1),  # the limit wins, as in mt
        "max_input_length": 0,  # sources are cut to max_positions - 1 pieces already
        "return_end_token": True,  # EOS counts in hypothesis lengths, as in mt
        "suppress_sequences": banned,
    }


def translate_ct2(
    translator: Any,
    tokenizer: Tokenizer,
    lines: Sequence[str],
    decode: DecodeConfig,
    max_positions: int,
) -> list[list[int]]:
    """Target ids (no EOS) per line from a CTranslate2 Translator, searching as mt would.

    Sentences are batched by source length, so each batch gets its exact mt length limit;
    blank lines (and lines without pieces) give [].
    """
    ids = encode_sources(lines, tokenizer, max_positions - 1)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, seq in enumerate(ids):
        if seq:
            by_length[len(seq)].append(i)
    out: list[list[int]] = [[] for _ in lines]
    for length, batch in sorted(by_length.items()):
        options = ct2_options(decode, tokenizer, length + 1, max_positions)
        if options["max_decoding_length"] < 1:
            continue  # mt's limit allows only EOS: empty outputs
        sources = [[tokenizer.src.id_to_piece(t) for t in ids[i]] for i in batch]
        results = translator.translate_batch(
            sources, max_batch_size=decode.max_tokens, batch_type="tokens", **options
        )
        for i, result in zip(batch, results, strict=True):
            out[i] = _target_ids(tokenizer, result.hypotheses[0])
    return out


def _target_ids(tokenizer: Tokenizer, hypothesis: list[str]) -> list[int]:
    """Ids of a CT2 hypothesis's pieces, without its end token."""
    ids = [tokenizer.tgt.piece_to_id(piece) for piece in hypothesis]
    return ids[:-1] if ids and ids[-1] == EOS_ID else ids


# ---------------------------------------------------------------------------------------------
# Hugging Face MarianMTModel


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
    p = alpha.
    """
    from transformers import GenerationConfig

    beam = {}
    if decode.beam > 1:  # early stopping: fairseq's (and mt's) rule, stop at `beam` finished
        beam = {"early_stopping": True, "length_penalty": hf_length_penalty(decode)}
    return GenerationConfig(
        num_beams=decode.beam,
        do_sample=False,
        max_new_tokens=max_positions - 1,  # mt's cap: max_positions - 2 tokens + EOS
        min_new_tokens=decode.min_len or None,
        decoder_start_token_id=BOS_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        forced_eos_token_id=EOS_ID,
        suppress_tokens=[PAD_ID, BOS_ID],
        **beam,
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
    _write_json(directory / "vocab.json", {p: i for i, p in enumerate(pieces(tokenizer, "src"))})
    target_vocab = None
    if not tokenizer.joint:
        target_vocab = directory / "target_vocab.json"
        _write_json(target_vocab, {p: i for i, p in enumerate(pieces(tokenizer, "tgt"))})
    MarianTokenizer(
        source_spm=str(directory / "source.spm"),
        target_spm=str(directory / "target.spm"),
        vocab=str(directory / "vocab.json"),
        target_vocab_file=str(target_vocab) if target_vocab else None,
        separate_vocabs=not tokenizer.joint,
        source_lang=config.data.src_lang,
        target_lang=config.data.tgt_lang,
        model_max_length=config.model.max_positions,  # mt: max_positions - 1 pieces + EOS
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


# ---------------------------------------------------------------------------------------------
# The command


def check_output(out: Path, force: bool, weights: Path) -> None:
    """MtError if OUT cannot take the export: a file, non-empty without --force, or the run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MtError(f"{out}: exists and is not a directory")
    if out.is_dir() and weights.resolve().is_relative_to(out.resolve()):
        raise MtError(f"{out}: holds the checkpoint being exported; choose another directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MtError(f"{out}: exists and is not empty; use --force to replace it")


def check_format(fmt: str, quantization: str | None) -> None:
    """MtError for an unknown format, a misplaced --quantization or a missing library."""
    if fmt not in FORMATS:
        raise MtError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "ct2":
        check_quantization(quantization)
        return
    if quantization is not None:
        raise MtError("--quantization applies to --format ct2 only")
    _import_transformers()


def export_model(
    run: Path,
    out: Path,
    fmt: str,
    quantization: str | None = None,
    force: bool = False,
) -> Path:
    """`mt export`: write the run's model (best checkpoint, else latest) to OUT, atomically."""
    check_format(fmt, quantization)
    check_output(out, force, resolve_checkpoint(Path(run)).weights)  # before loading anything
    config, tokenizer, model, checkpoint = load_trained(Path(run), torch.device("cpu"))
    if fmt == "hf" and (reason := marian_obstacle(model)) is not None:
        raise MtError(f"mt export --format hf: {reason}; use --format ct2")
    with atomic_directory(Path(out), replace=force) as temp:
        if fmt == "ct2":
            save_ct2(model, tokenizer, temp, quantization)
            for path in tokenizer.paths:  # the SentencePiece model(s), under mt's names
                shutil.copyfile(path, temp / path.name)
            readme = ct2_readme(config, tokenizer, checkpoint.weights, quantization)
        else:
            save_marian(model, tokenizer, config, temp)
            readme = hf_readme(config, checkpoint.weights)
        (temp / "README.md").write_text(readme, encoding="utf-8")
    log.info("exported %s to %s (%s)", checkpoint.weights, out, fmt)
    return Path(out)


def _import_transformers() -> None:
    """MtError with the install command when transformers is missing."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise MtError(f"mt export --format hf needs transformers: {INSTALL_HF}") from None


# ---------------------------------------------------------------------------------------------
# READMEs written beside the exports


def _limits(decode: DecodeConfig) -> str:
    return f"{decode.max_len_a} x (source pieces + 1) + {decode.max_len_b}"


def _markdown(title: str, intro: str, code: str, notes: str) -> str:
    """A README: a title, prose wrapped at 100 columns, one Python block."""
    return f"# {title}\n\n{_prose(intro)}\n\n```python\n{code.strip()}\n```\n\n{_prose(notes)}\n"


def _prose(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), 100)


def ct2_readme(
    config: Config, tokenizer: Tokenizer, weights: Path, quantization: str | None
) -> str:
    """How to translate with the CTranslate2 export."""
    d, m = config.decode, config.model
    spm_src, spm_tgt = tokenizer.paths[0].name, tokenizer.paths[-1].name
    pad, bos = tokenizer.tgt.id_to_piece(PAD_ID), tokenizer.tgt.id_to_piece(BOS_ID)
    intro = f"""From `{weights}` ({_pair(config)}), weights stored as {quantization or "float32"}.
    Sources are pieces of the SentencePiece model `{spm_src}`; CTranslate2 adds the end token."""
    code = f"""
import ctranslate2
import sentencepiece as spm

src = spm.SentencePieceProcessor(model_file="{spm_src}")
tgt = spm.SentencePieceProcessor(model_file="{spm_tgt}")
translator = ctranslate2.Translator(".", device="cpu", intra_threads=2)
lines = ["{_example(config)}"]
results = translator.translate_batch(
    src.encode(lines, out_type=str),
    beam_size={d.beam},
    length_penalty={hf_length_penalty(d)},
    min_decoding_length={d.min_len},
    max_decoding_length={m.max_positions - 2},
    max_input_length={m.max_positions - 1},
    suppress_sequences=[["{pad}"], ["{bos}"]],
)
print([tgt.decode(r.hypotheses[0]) for r in results])
"""
    notes = f"""This is mt's search but for two settings. mt limits each output to {_limits(d)}
    tokens, end token included, and its length penalty is "{d.length_penalty}" (alpha
    {d.alpha}), where CTranslate2 divides by length^length_penalty. `mt.export.translate_ct2`
    batches sentences by source length to give each its mt limit and a penalty fitted to mt's;
    the docstring of `mt/export.py` lists what remains different."""
    return _markdown("CTranslate2 model exported by `mt export`", intro, code, notes)


def hf_readme(config: Config, weights: Path) -> str:
    """How to translate with the Hugging Face export."""
    d = config.decode
    intro = f"""From `{weights}` ({_pair(config)}): MarianMTModel weights, generation settings
    and a MarianTokenizer."""
    code = f"""
from transformers import MarianMTModel, MarianTokenizer

tokenizer = MarianTokenizer.from_pretrained(".")
model = MarianMTModel.from_pretrained(".").eval()
batch = tokenizer(["{_example(config)}"], return_tensors="pt", padding=True)
out = model.generate(**batch)  # mt's search settings, from generation_config.json
print(tokenizer.batch_decode(out, skip_special_tokens=True))
"""
    notes = f"""generation_config.json bans PAD and BOS, forces the end token at the length limit
    and uses beam {d.beam}; with `num_beams=1`, `generate` is mt's greedy search. mt limits each
    output to {_limits(d)} tokens, end token included: pass that as `max_new_tokens` (the
    default is the model's cap, {config.model.max_positions - 1}). The beam length penalty
    divides by length^{hf_length_penalty(d)}, where mt's is "{d.length_penalty}" (alpha
    {d.alpha})."""
    return _markdown("Hugging Face MarianMTModel exported by `mt export`", intro, code, notes)


def _pair(config: Config) -> str:
    return f"{config.data.src_lang}→{config.data.tgt_lang}"


def _example(config: Config) -> str:
    """A sentence to show in the READMEs."""
    examples = {"de": "Zwei Hunde spielen im Schnee .", "en": "Two dogs play in the snow ."}
    return examples.get(config.data.src_lang, "...")
