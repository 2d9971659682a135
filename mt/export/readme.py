"""The README.md written beside each export: how to translate with it, and how it differs."""

from __future__ import annotations

import contextlib
import json
import textwrap
from pathlib import Path

from mt.config import Config, DecodeConfig
from mt.corpora import open_corpus
from mt.errors import MtError
from mt.export.ct2_search import TINY_PENALTY
from mt.export.hf import hf_length_penalty
from mt.tokenizer import Tokenizer, tag_piece
from mt.vocab import BOS_ID, PAD_ID


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
    decode, positions = config.decode, config.model.max_positions
    spm_src, spm_tgt = tokenizer.paths[0].name, tokenizer.paths[-1].name
    pad, bos = tokenizer.tgt.id_to_piece(PAD_ID), tokenizer.tgt.id_to_piece(BOS_ID)
    intro = f"""From `{weights}` ({_pair(config)}), weights stored as {quantization or "float32"}.
    Sources are pieces of the SentencePiece model `{spm_src}`; CTranslate2 adds the end token.
    {_tags_intro(config, tokenizer, "piece")}"""
    code = f"""
import ctranslate2
import sentencepiece as spm

src = spm.SentencePieceProcessor(model_file="{spm_src}")
tgt = spm.SentencePieceProcessor(model_file="{spm_tgt}")
translator = ctranslate2.Translator(".", device="cpu", intra_threads=2)
lines = [{_literal(_example(config))}]
{_ct2_sources(config, tokenizer)}
results = translator.translate_batch(
    sources,
{_ct2_search(decode)}
    min_decoding_length={decode.min_len},
    max_decoding_length={positions - 2},
    max_input_length={positions},  # EOS included, as in mt
    return_end_token=True,  # EOS counts in the length penalty, as in mt
    suppress_sequences=[["{pad}"], ["{bos}"]],
)
print([tgt.decode(r.hypotheses[0]) for r in results])
"""
    notes = f"""{_sampling_note(decode, "CTranslate2")}This is mt's search but for two
    settings{_min_len_note(decode)}. mt limits each output to
    {_limits(decode)} tokens, end token included, and its length penalty is
    "{decode.length_penalty}" (alpha {decode.alpha}), where CTranslate2 divides by
    length^length_penalty. `mt.export.ct2_search.translate_ct2` batches sentences by source
    length to give each its mt limit and a penalty fitted to mt's; the docstring of
    `mt/export/ct2_search.py` lists what remains different."""
    return _markdown("CTranslate2 model exported by `mt export`", intro, code, notes)


def hf_readme(config: Config, tokenizer: Tokenizer, weights: Path) -> str:
    """How to translate with the Hugging Face export."""
    decode = config.decode
    tags = _tags_intro(config, tokenizer, "word (MarianTokenizer keeps it whole)")
    intro = f"""From `{weights}` ({_pair(config)}): MarianMTModel weights, generation settings
    and a MarianTokenizer. {tags}"""
    tag = f"{_example_tag(config)} " if tokenizer.tags else ""
    code = f"""
from transformers import MarianMTModel, MarianTokenizer

tokenizer = MarianTokenizer.from_pretrained(".")
model = MarianMTModel.from_pretrained(".").eval()
lines = [{_literal(tag + _example(config))}]
batch = tokenizer(lines, return_tensors="pt", padding=True, truncation=True)
out = model.generate(**batch)  # mt's search settings, from generation_config.json
print(tokenizer.batch_decode(out, skip_special_tokens=True))
"""
    notes = f"""{_sampling_note(decode, "generate()")}generation_config.json bans PAD and BOS,
    forces the end token at the length limit and {_hf_search(decode)}. mt limits
    each output to {_limits(decode)} tokens, end token included: pass that as `max_new_tokens` (the
    default is the model's cap, {config.model.max_positions - 1}). The beam length penalty
    divides by length^{hf_length_penalty(decode)}, where mt's is "{decode.length_penalty}" (alpha
    {decode.alpha}). At the limit generate() scores the forced end token 0 where mt scores it
    by its probability, so beam search may rank an output cut at the limit higher than mt."""
    return _markdown("Hugging Face MarianMTModel exported by `mt export`", intro, code, notes)


def _ct2_search(decode: DecodeConfig) -> str:
    """translate_batch's search arguments (indented lines) for mt's decode settings."""
    if decode.sampling:  # sampling_topk 0: the whole distribution, as mt's top_k 0
        lines = [
            "beam_size=1",
            f"sampling_topk={decode.top_k}",
            f"sampling_topp={decode.top_p}",
            f"sampling_temperature={decode.temperature}",
        ]
    else:
        # Never 0, which would switch CTranslate2 to another stopping rule (see ct2_search).
        penalty = max(hf_length_penalty(decode), TINY_PENALTY)
        lines = [f"beam_size={decode.beam}", f"length_penalty={penalty}"]
    return "\n".join(f"    {line}," for line in lines)


def _hf_search(decode: DecodeConfig) -> str:
    """What generation_config.json's search is, in words."""
    if decode.sampling:
        return "samples one output per sentence"
    return f"uses beam {decode.beam}; with `num_beams=1`, `generate` is mt's greedy search"


def _sampling_note(decode: DecodeConfig, system: str) -> str:
    """For a run that samples: its settings, and what the export does not do as mt does."""
    if not decode.sampling:
        return ""
    draws = max(decode.beam, decode.nbest)  # as mt.search.sample
    keeps = "keeps the best" if decode.nbest == 1 else f"prints the {decode.nbest} best"
    return f"""The run samples (temperature {decode.temperature}, top-k {decode.top_k}, top-p
    {decode.top_p}): mt draws {draws} samples per sentence and {keeps} by their
    length-penalised score; {system} as set up here draws one. """


def _pair(config: Config) -> str:
    return ", ".join(c.direction.replace("-", "→") for c in config.data.directions())


EXAMPLES = {
    "de": "Zwei Hunde spielen im Schnee .",
    "en": "Two dogs play in the snow .",
    "fr": "Deux chiens jouent dans la neige .",
    "cs": "Dva psi si hrají ve sněhu .",
}


def _example(config: Config) -> str:
    """A sentence to show in the READMEs, in the source language of the first direction: a
    stock one, else the first of that direction's dev set where it is a file that can be read
    here (an `hf:` dev set could mean a download for one sentence)."""
    first = config.data.directions()[0]
    if first.src_lang in EXAMPLES or not first.valid or first.valid.startswith("hf:"):
        return EXAMPLES.get(first.src_lang, "...")
    with contextlib.suppress(MtError, OSError):
        corpus = open_corpus(first.valid, first.src_lang, first.tgt_lang, split="validation")
        return next((src for src, _ in corpus.pairs() if src.strip()), "...")
    return "..."


def _min_len_note(decode: DecodeConfig) -> str:
    """What a minimum length adds to the CTranslate2 README's differences ("" without one)."""
    if not decode.min_len:
        return ""
    return (
        f" and a third: below the minimum length ({decode.min_len}) CTranslate2 bans the end "
        "token before its softmax, mt after its own, so beam outputs can differ"
    )


def _literal(text: str) -> str:
    """`text` as a Python string literal for the READMEs' code (JSON's quoting is Python's)."""
    return json.dumps(text, ensure_ascii=False)


def _example_tag(config: Config) -> str:
    """The tag the READMEs ask a multilingual model for: the first direction's target."""
    return tag_piece(config.data.directions()[0].tgt_lang)


def _tags_intro(config: Config, tokenizer: Tokenizer, token: str) -> str:
    """How to ask a multilingual model for a target language (nothing for one target)."""
    if not tokenizer.tags:
        return ""
    # The run's targets: a model fine-tuned on some directions has the tags of all.
    tags = ", ".join(f"`{tag_piece(lang)}`" for lang in config.data.target_languages())
    return f"""The model translates into several languages: start each source with the {token}
    naming the one wanted, one of {tags} (Marian's convention)."""


def _ct2_sources(config: Config, tokenizer: Tokenizer) -> str:
    """The README's line turning `lines` into CT2 sources, after the target's tag if any."""
    if not tokenizer.tags:
        return "sources = src.encode(lines, out_type=str)"
    tag = _example_tag(config)
    return f'sources = [["{tag}", *pieces] for pieces in src.encode(lines, out_type=str)]'
