"""mt export: CTranslate2 and Hugging Face Marian exports compute and search like mt.

Three tiny runs (300 steps each): conftest's pre-norm one, a post-norm one, and a post-norm one
with GELU and separate source/target vocabularies and embeddings; and conftest's multilingual
run (post-norm), whose sources start with a target-language tag.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers.benchmarks import written_file
from helpers.ct2_model import read_ct2_model
from helpers.shared import built_once
from helpers.waiting import SAFETY_NET_S
from sacrebleu.metrics import BLEU
from typer.testing import CliRunner

from mt import export as export_module
from mt.cli import app, main
from mt.config import Config, DecodeConfig, load_config
from mt.errors import MtError
from mt.export import export_model
from mt.export.ct2 import save_ct2
from mt.export.ct2_search import TINY_PENALTY, ct2_options, translate_ct2
from mt.export.readme import _ct2_search
from mt.model import Transformer
from mt.rundir import load_trained
from mt.search import max_lengths
from mt.tokenizer import Tokenizer, load_tokenizer
from mt.translate import Translator, decode_settings, encode_prefixes
from mt.vocab import BOS_ID, EOS_ID, PAD_ID

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ROOT / "tests" / "data" / "tiny"
CPU = torch.device("cpu")
NO_CT2 = "ctranslate2 is not installed (pip install -e '.[export]')"
NO_HF = "transformers is not installed (pip install -e '.[bench]')"
PRENORM_REFUSAL = (
    "error: mt export --format hf: model.prenorm=true cannot be represented by MarianMTModel "
    "(post-norm only); use --format ct2\n"
)


def train_tiny(run_dir: Path, *overrides: str) -> Path:
    """A tiny run trained for 300 steps (see conftest.trained_run)."""
    from mt.train import train

    base = [
        f"run_dir={run_dir}",
        "train.max_steps=300",
        "train.valid_every=300",
        f"data.train={TINY_DATA / 'train'}",
        f"data.valid={TINY_DATA / 'valid'}",
        f"data.test={TINY_DATA / 'valid'}",
    ]
    train(load_config(ROOT / "configs" / "tiny.yaml", [*base, *overrides]))
    return run_dir


def shared_run(tmp_path_factory: pytest.TempPathFactory, name: str, *overrides: str) -> Path:
    """train_tiny's run with `overrides`, trained once per session (helpers.shared)."""
    return built_once(tmp_path_factory, name, lambda d: train_tiny(d / "run", *overrides)) / "run"


@pytest.fixture(scope="module")
def postnorm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Post-norm, ReLU, one joint vocabulary, three-way tied embeddings."""
    return shared_run(tmp_path_factory, "export-postnorm", "model.prenorm=false")


@pytest.fixture(scope="module")
def separate_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Post-norm, GELU, source and target SentencePiece models and embeddings of their own."""
    settings = ["model.prenorm=false", "model.activation=gelu", "tokenizer.joint=false"]
    return shared_run(
        tmp_path_factory, "export-separate", *settings, "model.share_embeddings=false"
    )


@pytest.fixture(params=["prenorm", "postnorm", "separate", "multi"])
def any_run(request: pytest.FixtureRequest) -> Path:
    """Each tiny run in turn."""
    name = {"prenorm": "trained_run", "postnorm": "postnorm_run", "separate": "separate_run"}
    return request.getfixturevalue(name.get(request.param, f"{request.param}_run"))


@pytest.fixture(params=["postnorm", "separate", "multi"])
def marian_run(request: pytest.FixtureRequest) -> Path:
    """Each run that MarianMTModel can represent."""
    return request.getfixturevalue(f"{request.param}_run")


def target_language(config: Config, tokenizer: Tokenizer) -> str | None:
    """The language the tests ask a multilingual model for (its first direction's); else None."""
    return config.data.directions()[0].tgt_lang if tokenizer.tags else None


@pytest.fixture
def lines() -> list[str]:
    """The tiny dev sources, plus a blank line (which translates to nothing)."""
    return [*(TINY_DATA / "valid.de").read_text().splitlines(), ""]


def run_main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """`mt ARGS` through the real entry point, in-process: its exit code."""
    monkeypatch.setattr(sys, "argv", ["mt", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0)


def mt_outputs(
    model: Transformer,
    tokenizer: Tokenizer,
    lines: list[str],
    decode: DecodeConfig,
    prefixes: list[list[int]] | None = None,
    tgt_lang: str | None = None,
) -> list[list[int]]:
    """mt's own translations of the lines (starting with `prefixes`, if given): target ids."""
    out = Translator(tokenizer, model, decode, CPU).translate(
        lines, prefixes=prefixes, tgt_lang=tgt_lang
    )
    return [h[0].tokens for h in out]


def ct2_translator(run: Path, out: Path) -> Any:
    """A CTranslate2 Translator (CPU, one thread) of the run's CT2 export, written to `out`."""
    ctranslate2 = pytest.importorskip("ctranslate2", reason=NO_CT2)
    export_model(run, out, "ct2")
    return ctranslate2.Translator(str(out), device="cpu", intra_threads=1)


# --- CTranslate2 ------------------------------------------------------------------------------


@pytest.mark.slow  # trains more tiny runs, or exports and runs CT2 or Marian
def test_ct2_export_scores_and_searches_like_mt(
    any_run: Path, lines: list[str], tmp_path: Path
) -> None:
    translator = ct2_translator(any_run, tmp_path / "ct2")
    config, tokenizer, model, _ = load_trained(any_run, CPU)
    tgt_lang = target_language(config, tokenizer)

    # The same function: teacher-forced log-probabilities of the references.
    refs = (TINY_DATA / "valid.en").read_text().splitlines()[:10]
    src_ids, ref_ids = tokenizer.encode_src(lines[:10], tgt_lang), tokenizer.encode_tgt(refs)
    src_pieces = [[tokenizer.src.id_to_piece(i) for i in ids] for ids in src_ids]  # tag first
    scored = translator.score_batch(src_pieces, tokenizer.tgt.encode(refs, out_type=str))
    for src, ref, result in zip(src_ids, ref_ids, scored, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([[*src, EOS_ID]]), torch.tensor([[BOS_ID, *ref]]))[0]
        ours = F.log_softmax(logits, dim=-1).gather(1, torch.tensor([[*ref, EOS_ID]]).T)[:, 0]
        torch.testing.assert_close(torch.tensor(result.log_probs), ours, rtol=0, atol=1e-4)

    # The same search: every greedy output, and at least 95% of beam-5 outputs.
    for beam, wanted in ((1, 1.0), (5, 0.95)):
        decode = decode_settings(config, beam=beam, nbest=1)
        ours = mt_outputs(model, tokenizer, lines, decode, tgt_lang=tgt_lang)
        limit = model.max_positions
        theirs = translate_ct2(translator, tokenizer, lines, decode, limit, tgt_lang=tgt_lang)
        same = sum(a == b for a, b in zip(ours, theirs, strict=True))
        assert same >= wanted * len(lines), f"beam {beam}: {same} of {len(lines)} identical"


@pytest.mark.slow  # trains more tiny runs, or exports and runs CT2 or Marian
def test_ct2_export_takes_target_prefixes_like_mt(
    trained_run: Path, lines: list[str], tmp_path: Path
) -> None:
    translator = ct2_translator(trained_run, tmp_path / "ct2")
    config, tokenizer, model, _ = load_trained(trained_run, CPU)
    long = " ".join(["A dog"] * 20)  # more pieces than the usual limit: it is raised
    texts = ["A dog", "", "The child sees", "Two men", long, "The"]
    texts = [texts[i % len(texts)] for i in range(len(lines))]
    prefixes = encode_prefixes(Path("p"), texts, tokenizer, model.max_positions - 2)
    assert len(prefixes[4]) > 1.2 * len(tokenizer.encode_src([lines[4]])[0]) + 10

    # CT2 leaves the prefix's log-probability out of its scores: without a length penalty that
    # ranks hypotheses as mt does (see mt.export.ct2_search).
    for beam, wanted in ((1, 1.0), (5, 0.95)):
        decode = decode_settings(config, beam=beam, nbest=1, length_penalty="none")
        ours = mt_outputs(model, tokenizer, lines, decode, prefixes)
        theirs = translate_ct2(translator, tokenizer, lines, decode, model.max_positions, prefixes)
        started = [t[: len(p)] == p for t, p in zip(theirs, prefixes, strict=True)]
        assert all(started[:-1]) and theirs[-1] == []  # the last line is blank
        same = sum(a == b for a, b in zip(ours, theirs, strict=True))
        assert same >= wanted * len(lines), f"beam {beam}: {same} of {len(lines)} identical"


@pytest.mark.slow  # trains more tiny runs, or exports and runs CT2 or Marian
def test_ct2_int8_export_stores_the_weights_within_rounding(
    postnorm_run: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ctranslate2", reason=NO_CT2)
    _, tokenizer, model, _ = load_trained(postnorm_run, CPU)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    for weights in ("float32", "int8"):
        (tmp_path / weights).mkdir()
        save_ct2(model, tokenizer, tmp_path / weights, None if weights == "float32" else weights)
    for name, p in model.state_dict().items():  # CT2 quantizes its arrays in place
        assert torch.equal(p, before[name]), name

    exports = {w: tmp_path / w / "model.bin" for w in ("float32", "int8")}
    (full, full_aliases), (int8, aliases) = (read_ct2_model(exports[w]) for w in exports)
    assert aliases == full_aliases  # the tied embeddings and output projection stay tied
    quantized = {name for name in int8 if f"{name}_scale" in int8}
    assert len(quantized) == 23  # 2 x 4 encoder and 2 x 7 decoder linears, the embeddings
    assert set(int8) - set(full) == {f"{name}_scale" for name in quantized}
    for name, value in full.items():
        if name not in quantized:
            assert np.array_equal(int8[name], value), name  # biases, norms, positions
            continue
        q, scale = int8[name], int8[f"{name}_scale"]  # (out, in) int8, (out,) float32
        assert q.dtype == np.int8 and q.shape == value.shape, name
        # Per output row, the largest weight maps to +-127, and every weight lies within half
        # a step (1 / scale) of its stored value.
        rows_max = np.abs(value).max(axis=1)
        np.testing.assert_allclose(scale, 127 / rows_max, rtol=1e-6, err_msg=name)
        assert (np.abs(q).max(axis=1) == 127).all(), name
        error = np.abs(value - q / scale[:, None]) * scale[:, None]  # in steps
        assert error.max() <= 0.5 + 1e-4, name
    assert exports["int8"].stat().st_size < 0.6 * exports["float32"].stat().st_size


@pytest.mark.slow  # trains more tiny runs, or exports and runs CT2 or Marian
def test_ct2_int8_export_translates_like_the_model(
    postnorm_run: Path, lines: list[str], tmp_path: Path
) -> None:
    ctranslate2 = pytest.importorskip("ctranslate2", reason=NO_CT2)
    export_model(postnorm_run, tmp_path / "int8", "ct2", quantization="int8")
    config, tokenizer, model, _ = load_trained(postnorm_run, CPU)
    refs = [(TINY_DATA / "valid.en").read_text().splitlines()]
    # CT2 dequantizes int8 weights for float32 compute: what the file holds, decoded by kernels
    # that agree on every CPU up to float32 rounding. In 5 tiny runs (3 architectures, 3 seeds),
    # at beam 1 and 2, the 40-sentence dev BLEU moved by 1.5 at most.
    int8 = str(tmp_path / "int8")
    int8_file = ctranslate2.Translator(int8, compute_type="float32", intra_threads=1)
    for beam in (1, 2):
        decode = decode_settings(config, beam=beam)
        ours = tokenizer.decode_tgt(mt_outputs(model, tokenizer, lines[:-1], decode))
        theirs = translate_ct2(int8_file, tokenizer, lines[:-1], decode, model.max_positions)
        bleu = [
            BLEU().corpus_score(out, refs).score for out in (ours, tokenizer.decode_tgt(theirs))
        ]
        assert abs(bleu[0] - bleu[1]) <= 3, (beam, bleu)

    # int8 compute runs and translates every line. Its quality is not asserted: CPUs without
    # VNNI (AVX2 only) sum u8 x s8 products in int16 pairs, which saturate, so the same file
    # can score far lower there than on CPUs with VNNI or AMX (weights rounded to 7 bits
    # instead, which cannot saturate, score there as float32 does).
    int8_compute = ctranslate2.Translator(int8, compute_type="int8", intra_threads=1)
    assert int8_compute.compute_type.startswith("int8")
    outputs = translate_ct2(int8_compute, tokenizer, lines, decode, model.max_positions)
    assert len(outputs) == len(lines) and outputs[-1] == []


@pytest.mark.slow  # trains more tiny runs, or exports and runs CT2 or Marian
def test_ct2_export_directory_layout_and_readme(postnorm_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2", reason=NO_CT2)
    out = tmp_path / "deep" / "ct2"
    assert export_model(postnorm_run, out, "ct2", quantization="int8") == out
    names = {"README.md", "config.json", "model.bin", "shared_vocabulary.json", "spm.model"}
    assert {p.name for p in out.iterdir()} == names
    readme = (out / "README.md").read_text()
    assert "ctranslate2.Translator" in readme and "int8" in readme
    assert max(len(line) for line in readme.splitlines()) <= 100
    assert [p.name for p in out.parent.iterdir()] == ["ct2"]  # no temp directory left


@pytest.mark.slow
@pytest.mark.parametrize("name", ["postnorm_run", "multi_run"])
def test_ct2_readme_code_cuts_a_long_line_as_mt_does(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    pytest.importorskip("ctranslate2", reason=NO_CT2)
    run = request.getfixturevalue(name)
    out = export_model(run, tmp_path / "ct2", "ct2")
    code = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    long = "der hund mag den see . " * 100  # far more pieces than the model's positions
    code = re.sub(r"^lines = .*$", f"lines = [{long!r}]", code, flags=re.MULTILINE)
    cut = load_config(run / "config.yaml").model.max_positions - 1  # mt's: EOS takes one
    by_hand = code.replace("results = ", f"sources = [s[:{cut}] for s in sources]\nresults = ")
    printed = []
    for program in (code, by_hand):
        result = subprocess.run(
            [sys.executable, "-c", program], cwd=out, capture_output=True, text=True,
            timeout=SAFETY_NET_S,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        printed.append(result.stdout)
    assert printed[0] == printed[1] and printed[0].startswith("['")


class Pieces:
    """A tokenizer's target side that names each id."""

    def id_to_piece(self, i: int) -> str:
        return f"<{i}>"


@pytest.mark.parametrize(
    "decode", [DecodeConfig(alpha=0.0), DecodeConfig(length_penalty="none", alpha=0.6)]
)
def test_no_length_penalty_is_never_ct2s_zero_which_stops_at_the_first_finished_beam(
    decode: DecodeConfig,
) -> None:
    tokenizer = SimpleNamespace(tgt=Pieces())
    assert ct2_options(decode, tokenizer, 12, 1024)["length_penalty"] == TINY_PENALTY
    assert f"length_penalty={TINY_PENALTY}," in _ct2_search(decode)  # the README's example
    assert ct2_options(DecodeConfig(alpha=0.6), tokenizer, 15, 1024)["length_penalty"] == 0.45


def readme_code(directory: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run the Python block of an export's README.md in the export directory: its names."""
    code = (directory / "README.md").read_text().split("```python\n")[1].split("```")[0]
    code = code.replace("intra_threads=2", "intra_threads=1")  # the CPU may be shared
    monkeypatch.chdir(directory)
    names: dict[str, Any] = {}
    exec(code, names)
    return names


@pytest.mark.slow  # trains more tiny runs, or exports and runs CT2 or Marian
@pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")  # never used by Marian
def test_readmes_show_how_to_ask_a_multilingual_model_for_a_language(
    multi_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    pytest.importorskip("ctranslate2", reason=NO_CT2)
    pytest.importorskip("transformers", reason=NO_HF)
    _, tokenizer, _, _ = load_trained(multi_run, CPU)
    assert list(tokenizer.tags) == ["en", "de", "fr"]
    wanted = tokenizer.encode_src(["Zwei Hunde spielen im Schnee ."], "en")[0]  # >>en<< first
    tags = [">>en<<", ">>de<<", ">>fr<<"]
    for fmt in ("ct2", "hf"):
        out = export_model(multi_run, tmp_path / fmt, fmt)
        prose = " ".join((out / "README.md").read_text().split())
        assert "(de→en, en→de, fr→en, en→fr)" in prose
        assert "naming the one wanted, one of `>>en<<`, `>>de<<`, `>>fr<<`" in prose
        names = readme_code(out, monkeypatch)
        if fmt == "ct2":
            vocabulary = json.loads((out / "shared_vocabulary.json").read_text())
            assert [vocabulary[i] for i in tokenizer.tags.values()] == tags
            sources = [[tokenizer.src.piece_to_id(p) for p in s] for s in names["sources"]]
        else:
            vocabulary = json.loads((out / "vocab.json").read_text())
            assert [vocabulary[tag] for tag in tags] == list(tokenizer.tags.values())
            sources = [row[:-1] for row in names["batch"]["input_ids"].tolist()]  # without EOS
        assert sources == [wanted]
        printed = capsys.readouterr().out
        assert printed.startswith("['") and printed.endswith("']\n")  # one translation


@pytest.mark.slow  # trains more tiny runs, or exports and runs CT2 or Marian
@pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")  # never used by Marian
def test_exports_of_a_run_that_samples_sample_with_its_settings(
    postnorm_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    pytest.importorskip("ctranslate2", reason=NO_CT2)
    pytest.importorskip("transformers", reason=NO_HF)
    from transformers import GenerationConfig

    run = tmp_path / "run"
    shutil.copytree(postnorm_run, run)
    tree = yaml.safe_load((run / "config.yaml").read_text())
    sampling = {"sampling": True, "beam": 2, "nbest": 4, "temperature": 0.7, "top_k": 5}
    tree["decode"] |= sampling | {"top_p": 0.9}
    (run / "config.yaml").write_text(yaml.safe_dump(tree))

    gen = GenerationConfig.from_pretrained(export_model(run, tmp_path / "hf", "hf"))
    assert (gen.do_sample, gen.num_beams, gen.temperature, gen.top_k, gen.top_p) == (
        True, 1, 0.7, 5, 0.9,
    )  # fmt: skip
    ct2 = export_model(run, tmp_path / "ct2", "ct2")
    for out in (tmp_path / "hf", ct2):
        prose = " ".join((out / "README.md").read_text().split())
        assert (
            "The run samples (temperature 0.7, top-k 5, top-p 0.9): mt draws 4 samples per "
            "sentence and prints the 4 best by their length-penalised score" in prose
        )
    code = (ct2 / "README.md").read_text()
    assert "beam_size=1,\n    sampling_topk=5,\n    sampling_topp=0.9," in code
    readme_code(ct2, monkeypatch)  # CTranslate2 takes the arguments
    assert capsys.readouterr().out.startswith("['")


def test_readme_example_of_a_language_without_a_stock_one_is_a_dev_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mt.export.readme import _example, _literal

    (tmp_path / "dev.pt").write_text('\nO "cão" corre .\n', encoding="utf-8")
    (tmp_path / "dev.en").write_text("\nThe dog runs .\n", encoding="utf-8")
    corpora = f"data.corpora=[{{src_lang: pt, tgt_lang: en, valid: {tmp_path / 'dev'}}}]"
    config = load_config(ROOT / "configs" / "tiny.yaml", [corpora])
    assert _example(config) == 'O "cão" corre .'  # the first with text
    assert eval(_literal(_example(config))) == 'O "cão" corre .'  # a literal in the code
    missing = f"data.corpora=[{{src_lang: pt, tgt_lang: en, valid: {tmp_path / 'none'}}}]"
    assert _example(load_config(ROOT / "configs" / "tiny.yaml", [missing])) == "..."
    # A dev set on the Hub is not read (a download for one sentence): the stock "...".
    readme_module = sys.modules[_example.__module__]
    opened = []
    monkeypatch.setattr(readme_module, "open_corpus", lambda *args, **kw: opened.append(args))
    hub = "data.corpora=[{src_lang: pt, tgt_lang: en, valid: 'hf:some/dataset'}]"
    assert _example(load_config(ROOT / "configs" / "tiny.yaml", [hub])) == "..."
    assert opened == []


def test_ct2_readme_names_a_minimum_length_among_the_differences(postnorm_run: Path) -> None:
    from mt.export.readme import ct2_readme

    tokenizer = load_tokenizer(postnorm_run / "tokenizer")
    weights = Path("step-00000060.safetensors")
    for overrides, said in [
        (["decode.min_len=3"], "but for two settings and a third: below the minimum length (3) "
         "CTranslate2 bans the end token before its softmax, mt after its own, so beam outputs "
         "can differ. mt limits"),
        ([], "but for two settings. mt limits"),
    ]:  # fmt: skip
        config = load_config(postnorm_run / "config.yaml", overrides)
        assert said in " ".join(ct2_readme(config, tokenizer, weights, None).split())


# --- Hugging Face Marian ----------------------------------------------------------------------


@pytest.mark.slow  # trains more tiny runs, or exports and runs CT2 or Marian
@pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")  # never used by Marian
def test_hf_export_loads_and_computes_like_mt(
    marian_run: Path, lines: list[str], tmp_path: Path
) -> None:
    pytest.importorskip("transformers", reason=NO_HF)
    from transformers import MarianMTModel, MarianTokenizer

    export_model(marian_run, tmp_path / "hf", "hf")
    hf = MarianMTModel.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = MarianTokenizer.from_pretrained(tmp_path / "hf")
    lines = [line for line in lines if line]  # mt leaves blank lines untranslated
    lines.append("Das ist <s>alt</s> neu <unk> <pad>")  # text, not special tokens, for both
    config, tokenizer, model, _ = load_trained(marian_run, CPU)
    tgt_lang = target_language(config, tokenizer)
    decode = decode_settings(config, beam=1)
    greedy = mt_outputs(model, tokenizer, lines, decode, tgt_lang=tgt_lang)

    # Marian's convention: the tag, as text, starts the source; MarianTokenizer keeps it whole.
    tagged = [f">>{tgt_lang}<< {line}" if tgt_lang else line for line in lines]
    batch = hf_tokenizer(tagged, return_tensors="pt", padding=True)
    ids_of = tokenizer.encode_src(lines, tgt_lang)
    for row, ids in zip(batch["input_ids"].tolist(), ids_of, strict=True):
        assert row[: len(ids) + 1] == [*ids, EOS_ID] and set(row[len(ids) + 1 :]) <= {PAD_ID}
    longest = max(map(len, greedy))
    tgt_in = torch.tensor([[BOS_ID, *g] + [PAD_ID] * (longest - len(g)) for g in greedy])
    with torch.no_grad():
        ours = model(batch["input_ids"], tgt_in)
        theirs = hf(**batch, decoder_input_ids=tgt_in).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)

    gen = hf.generation_config
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id) == (2, 3, 0)
    theirs_ids = hf_greedy(hf, hf_tokenizer, tagged, config.decode, model.max_positions)
    assert theirs_ids == greedy
    # Sentence by sentence: outputs that run to mt's limit (the multilingual run's, trained 60
    # steps) need each sentence's own max_new_tokens, which one batched generate cannot give.
    texts = hf_tokenizer.batch_decode(theirs_ids, skip_special_tokens=True)
    assert texts == tokenizer.decode_tgt(greedy)


def hf_greedy(
    hf: Any, hf_tokenizer: Any, lines: list[str], decode: DecodeConfig, limit: int
) -> list[list[int]]:
    """generate(num_beams=1) sentence by sentence, each with mt's length limit for it."""
    outputs = []
    for line in lines:
        batch = hf_tokenizer([line], return_tensors="pt")
        length = max_lengths(batch["input_ids"], decode.max_len_a, decode.max_len_b, limit - 1)
        out = hf.generate(**batch, num_beams=1, max_new_tokens=int(length[0]))
        outputs.append([t for t in out[0, 1:].tolist() if t not in (EOS_ID, PAD_ID)])
    return outputs


def test_hf_export_refuses_a_prenorm_model(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    pytest.importorskip("transformers", reason=NO_HF)
    out = tmp_path / "hf"
    assert run_main(monkeypatch, "export", "--format", "hf", str(trained_run), str(out)) == 1
    assert capsys.readouterr().err == PRENORM_REFUSAL
    assert not out.exists()


# --- the command ------------------------------------------------------------------------------


def test_help_shows_the_options() -> None:
    result = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    for text in ("RUN", "OUT", "--format", "ct2|hf", "[required]", "--quantization", "--force"):
        assert text in result.stdout, text


def test_missing_ctranslate2_prints_the_install_hint(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # `import ctranslate2` now fails
    monkeypatch.setattr(export_module, "load_trained", None)  # refused before the model loads
    out = tmp_path / "ct2"
    assert run_main(monkeypatch, "export", "-f", "ct2", str(trained_run), str(out)) == 1
    assert capsys.readouterr().err == (
        "error: mt export --format ct2 needs CTranslate2: "
        "pip install 'mt[export]' (or pip install ctranslate2)\n"
    )
    assert not out.exists()


@pytest.mark.slow  # trains more tiny runs, or exports and runs CT2 or Marian
def test_out_is_replaced_only_with_force(postnorm_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2", reason=NO_CT2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MtError, match="exists and is not empty; use --force"):
        export_model(postnorm_run, out, "ct2")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_model(postnorm_run, out, "ct2", force=True)
    assert "model.bin" in {p.name for p in out.iterdir()} and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(MtError, match="holds the checkpoint being exported"):
        export_model(postnorm_run, postnorm_run, "ct2", force=True)
    with pytest.raises(MtError) as err:  # replacing it would leave the run without a tokenizer
        export_model(postnorm_run, postnorm_run / "tokenizer", "hf", force=True)
    assert str(err.value) == (
        f"{postnorm_run / 'tokenizer'}: holds files of the run being exported; choose another "
        "directory"
    )


@pytest.mark.slow  # trains more tiny runs, or exports and runs CT2 or Marian
def test_out_through_a_symlink_fills_its_target(postnorm_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2", reason=NO_CT2)
    target, link = tmp_path / "target", tmp_path / "link"
    target.mkdir()
    link.symlink_to(target)
    export_model(postnorm_run, link, "ct2")
    assert link.is_symlink() and (target / "model.bin").is_file()
    (target / "model.bin").unlink()
    export_model(postnorm_run, link, "ct2", force=True)  # a non-empty target, replaced
    assert link.is_symlink() and (target / "model.bin").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]


@pytest.mark.slow  # trains more tiny runs, or exports and runs CT2 or Marian
def test_out_that_cannot_be_a_new_directory_is_refused(
    postnorm_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "afile").write_text("x")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    odd = tmp_path / os.fsdecode(b"o\xfe")  # not UTF-8
    for out, message in [
        (odd, f"{odd}: the Hugging Face export needs a directory whose path is UTF-8"),
        (tmp_path / "afile" / "out", f"{tmp_path / 'afile' / 'out'}: {tmp_path / 'afile'} is not "
         "a directory"),
        (Path("."), ".: the working directory (or above it); name a directory to create"),
        (tmp_path, f"{tmp_path}: the working directory (or above it); name a directory to create"),
    ]:  # fmt: skip
        with pytest.raises(MtError) as err:
            export_model(postnorm_run, out, "hf", force=True)
        assert str(err.value) == message
    assert list(here.iterdir()) == []


@pytest.mark.slow  # trains more tiny runs, or exports and runs CT2 or Marian
@pytest.mark.parametrize(
    ("fmt", "quantization", "message"),
    [
        ("ct2", "int3", "--quantization int3: expected one of int8, "),
        ("hf", "int8", "--quantization applies to --format ct2 only"),
        ("onnx", None, "--format onnx: expected one of ct2, hf"),
    ],
)
def test_bad_options_fail_before_any_work(
    postnorm_run: Path, tmp_path: Path, fmt: str, quantization: str | None, message: str
) -> None:
    if fmt == "ct2":
        pytest.importorskip("ctranslate2", reason=NO_CT2)
    with pytest.raises(MtError, match=message):
        export_model(postnorm_run, tmp_path / "out", fmt, quantization=quantization)
    assert not (tmp_path / "out").exists()


# --- scripts/bench_ct2.py ---------------------------------------------------------------------


@pytest.mark.slow  # trains more tiny runs, or exports and runs CT2 or Marian
def test_bench_ct2_smoke_prints_and_writes_its_table(
    multi30k: Path, postnorm_run: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ctranslate2", reason=NO_CT2)
    out_md = tmp_path / "benchmarks.md"
    args = [sys.executable, str(ROOT / "scripts" / "bench_ct2.py"), "--smoke", "--threads", "1",
            "--run", str(postnorm_run), "--data", str(multi30k),
            "--workdir", str(tmp_path / "work"), "--fixed-length", "6",
            "--write", str(out_md)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the CPU may be shared
    proc = subprocess.run(args, capture_output=True, text=True, timeout=SAFETY_NET_S, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("## Speed: mt vs CTranslate2\n")
    assert out_md.read_text() == written_file(out)
    real = out[: out.index("Fixed-length protocol")]
    rows = [line.split("|") for line in real.splitlines() if line.startswith(("| mt ", "| CT2"))]
    names = [row[1].strip() for row in rows]
    # A bf16 row only where `--precision auto` picks bf16: it times both on this CPU.
    auto = ["mt bf16 (--precision auto here)"] if len(names) == 8 else []
    assert names == [
        "mt", "mt int8", *auto, "CT2 float32", "CT2 int8", "CT2 float32, its defaults",
        "CT2 float32, its defaults, 4,096-token batches",
        "CT2 float32, its defaults, 4,096-token batches, own process",
    ]  # fmt: skip
    assert all(float(row[3]) > 0 for row in rows)  # sentences/s
    # The same search in a child process (glibc's default malloc) finds the same outputs.
    assert rows[-1][5:] == rows[-2][5:]  # BLEU, outputs identical to mt's
    assert all(row[6].strip().endswith("of 8") for row in rows)  # outputs identical to mt's
    assert rows[0][6].strip() == "8 of 8"
    # The fixed-length protocol: every system made exactly 6 pieces for each of the 8 sentences.
    table = out[out.index("| system | seconds | sentences/s | vs mt | outputs of 6 pieces |") :]
    fixed = [line.split("|")[1:-1] for line in table.splitlines()[2:] if line.startswith("| ")]
    assert [row[0].strip() for row in fixed] == [
        "mt", "CT2 float32", "CT2 float32, 4,096-token batches",
        "CT2 float32, 4,096-token batches, own process",
    ]  # fmt: skip
    assert [row[4].strip() for row in fixed] == ["8 of 8"] * 4 and fixed[0][3].strip() == "1.00x"
