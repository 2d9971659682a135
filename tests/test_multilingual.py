"""One model for several directions: tags, sampling over corpora, per-direction validation."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.corpus import MULTI_DIRECTIONS, multi_config
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from mt import checkpoint as ckpt
from mt import corpora
from mt.batching import MixtureSampler, padding_efficiency
from mt.cli import app
from mt.config import DataConfig, load_config, save_config
from mt.data import encode_corpus
from mt.errors import ConfigError, DataError
from mt.metrics import read_metrics
from mt.rundir import (
    check_tags,
    encode_train,
    load_trained,
    open_run,
    prepare_data,
    prepare_tokenizer,
)
from mt.train import train
from mt.translate import encode_sources


def test_a_run_may_use_some_of_a_tokenizers_tags(tmp_path: Path) -> None:
    # A multilingual model fine-tuned on some of its directions (--resume copies its
    # tokenizer); a run into one language cannot read tagged sources, and says how to go on.
    tags = SimpleNamespace(tags={"de": 4, "en": 5, "fr": 6})
    two = "data.corpora=[{src_lang: de, tgt_lang: en}, {src_lang: en, tgt_lang: de}]"
    check_tags(tags, multi_config(tmp_path, tmp_path / "run", two), tmp_path)  # type: ignore[arg-type]
    one = multi_config(tmp_path, tmp_path / "run", "data.corpora=[{src_lang: de, tgt_lang: en}]")
    with pytest.raises(DataError) as err:
        check_tags(tags, one, tmp_path)  # type: ignore[arg-type]
    assert str(err.value) == (
        f"{tmp_path}: the tokenizer has target-language tags for de, en, fr, but the run "
        "translates into en; a model with tags translates into two languages or more (name "
        "them in data.corpora), or delete the tokenizer to train a model without tags"
    )
    other = multi_config(tmp_path, tmp_path / "run", two.replace("tgt_lang: de", "tgt_lang: it"))
    with pytest.raises(DataError, match=r"translates into en, it; delete it to retrain it$"):
        check_tags(tags, other, tmp_path)  # type: ignore[arg-type]
    check_tags(SimpleNamespace(tags={}), one, tmp_path)  # type: ignore[arg-type]


@pytest.mark.slow
def test_every_direction_is_validated_and_the_mean_selects(multi_run: Path) -> None:
    valid = read_metrics(multi_run, "valid")
    assert [r["step"] for r in valid] == [30, 60]
    for record in valid:
        per = [record[f"{d}/bleu"] for d in MULTI_DIRECTIONS]
        assert record["bleu"] == pytest.approx(np.mean(per))
        assert record["loss"] == pytest.approx(
            np.mean([record[f"{d}/loss"] for d in MULTI_DIRECTIONS])
        )
    best = max(valid, key=lambda r: r["bleu"])
    assert ckpt.best_checkpoint(multi_run).step == best["step"]
    events = EventAccumulator(str(multi_run / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {f"valid/{d}/{k}" for d in MULTI_DIRECTIONS for k in ("bleu", "loss")} <= scalars
    assert [e.value for e in events.Scalars("valid/de-en/bleu")] == pytest.approx(
        [r["de-en/bleu"] for r in valid]
    )


@pytest.mark.slow
def test_sources_start_with_the_target_languages_tag(multi_run: Path) -> None:
    config = load_config(multi_run / "config.yaml")
    tokenizer = prepare_tokenizer(config)
    assert sorted(tokenizer.tags) == ["de", "en", "fr"]
    mix = encode_train(config, tokenizer)
    assert list(mix.parts) == list(MULTI_DIRECTIONS)
    for name, part in mix.parts.items():
        tag = tokenizer.tags[name.split("-")[1]]
        firsts = {src[0] for src, _ in part.pairs(np.arange(len(part)))}
        assert firsts == {tag}
        assert tag not in {t for _, tgt in part.pairs(np.arange(len(part))) for t in tgt}
    np.testing.assert_allclose(mix.probabilities(), [0.25] * 4)  # four corpora of one size


@pytest.mark.slow
def test_data_prepare_describes_the_mixed_batches(
    multi_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(multi_run / "config.yaml", ["data.mixed_batches=true"])
    tokenizer = prepare_tokenizer(config)
    digests = []
    real = corpora._text_digest
    monkeypatch.setattr(corpora, "_text_digest", lambda path: digests.append(path) or real(path))
    lines = list(prepare_data(config, tokenizer, open_run(config, ["train"])))
    assert len(digests) == 2 * len(MULTI_DIRECTIONS)  # each direction's two files, read once
    shares = ", ".join(f"{d} 25.0%" for d in MULTI_DIRECTIONS)
    assert lines[-2] == f"train: sentences drawn from {shares} (data.temperature=5)"
    mix = encode_train(config, tokenizer)
    sampler = MixtureSampler.of(mix, config.train.max_tokens, config.train.seed, mixed=True)
    batches = sampler.epoch_batches(1)
    src, tgt = padding_efficiency(batches, mix.src_lens, mix.tgt_lens)
    assert lines[-1] == (
        f"train: {len(batches):,} mixed batches of <= {config.train.max_tokens} tokens per "
        f"epoch, {src:.1%} / {tgt:.1%} non-pad (source / target)"
    )
    directions = [np.searchsorted(mix.offsets, b, side="right") for b in batches]
    assert max(len(np.unique(d)) for d in directions) == 4  # batches hold every direction


@pytest.mark.slow
@pytest.mark.parametrize("mixed", ["false", "true"])
def test_resume_mid_epoch_is_exact_with_several_corpora(
    multiway: Path, tmp_path: Path, mixed: str
) -> None:
    steps = ["train.valid_every=100", "train.log_every=4", f"data.mixed_batches={mixed}"]
    train(multi_config(multiway, tmp_path / "straight", "train.max_steps=12", *steps))
    train(multi_config(multiway, tmp_path / "resumed", "train.max_steps=8", *steps))  # mid-epoch
    train(multi_config(multiway, tmp_path / "resumed", "train.max_steps=12", *steps))
    runs = (tmp_path / "straight", tmp_path / "resumed")
    a, b = (load_file(ckpt.latest_checkpoint(run).weights) for run in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(runs[1], "train")[-1]["epoch"] == 1
    losses = [[(r["step"], r["loss"]) for r in read_metrics(run, "train")] for run in runs]
    assert losses[0] == losses[1]


def translate_cli(run: Path, source: Path, *options: str) -> list[str]:
    """`mt translate -m RUN SOURCE OPTIONS` in-process, in fp32: its output lines.

    fp32, because `--precision auto` times fp32 against bf16 at every call, and two calls whose
    outputs a test compares could choose differently on a busy machine.
    """
    args = ["translate", "-m", str(run), str(source), "--precision", "fp32", *options]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


@pytest.mark.slow
def test_translate_asks_for_a_target_language(multi_run: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("Ein mann sieht den see .\n\nDas kind findet ein auto .\n", encoding="utf-8")
    outputs = {
        lang: translate_cli(multi_run, source, "--beam", "1", "--tgt-lang", lang)
        for lang in ("en", "fr")
    }
    for lines in outputs.values():
        assert len(lines) == 3 and lines[1] == ""  # blank stays blank, untagged
    assert outputs["en"] != outputs["fr"]  # the tag steers the output
    args = ["translate", "-m", str(multi_run), str(source)]
    missing = CliRunner().invoke(app, args)
    assert str(missing.exception) == (
        "the model translates into en, de, fr: choose one with --tgt-lang, or start each line "
        f"with its tag ({source}: line 1 starts with no >>xx<<)"
    )
    unknown = CliRunner().invoke(app, [*args, "--tgt-lang", "cs"])
    assert str(unknown.exception) == "--tgt-lang cs: the model translates into en, de, fr only"


@pytest.mark.slow
def test_a_line_may_name_its_own_target_language(
    multi_run: Path, trained_run: Path, tmp_path: Path
) -> None:
    lines = ["Ein mann sieht den see .", "Das kind findet ein auto ."]
    plain = tmp_path / "plain.txt"
    plain.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    into = {lang: translate_cli(multi_run, plain, "--beam", "1", "--tgt-lang", lang)
            for lang in ("en", "fr")}  # fmt: skip
    mixed = tmp_path / "mixed.txt"  # Marian's and OPUS-MT's convention; blank stays blank
    mixed.write_text(f">>fr<< {lines[0]}\n\n  >>en<<{lines[1]}\n>>fr<<\n", encoding="utf-8")
    expected = [into["fr"][0], "", into["en"][1], ""]
    assert translate_cli(multi_run, mixed, "--beam", "1") == expected  # no --tgt-lang needed
    assert translate_cli(multi_run, mixed, "--beam", "1", "--tgt-lang", "de") == expected
    _, tokenizer, _, _ = load_trained(multi_run, torch.device("cpu"))
    assert encode_sources([f">>fr<< {lines[0]}"], tokenizer, 128, "en") == (
        encode_sources([lines[0]], tokenizer, 128, "fr")
    )  # the tag's text is not the source: one tag, that of the line
    one = prepare_tokenizer(load_config(trained_run / "config.yaml"))
    assert encode_sources([">>fr<< x"], one, 128) == [one.src.encode(">>fr<< x")]  # its text
    mixed.write_text(f">>en<< {lines[0]}\n>>cs<< {lines[1]}\n", encoding="utf-8")
    args = ["translate", "-m", str(multi_run), str(mixed), "--tgt-lang", "en"]
    unknown = CliRunner().invoke(app, args)
    assert str(unknown.exception) == (
        f"{mixed}: line 2 starts with >>cs<<, but the model translates into en, de, fr only"
    )
    alone = CliRunner().invoke(app, ["attention", str(multi_run), ">>fr<< ", "-o", "a.png"])
    assert str(alone.exception) == "the sentence is empty: nothing to translate"


@pytest.mark.slow
def test_a_multilingual_model_fine_tunes_on_some_of_its_directions(
    multi_run: Path, multiway: Path, tmp_path: Path
) -> None:
    two = "data.corpora=[{src_lang: de, tgt_lang: en}, {src_lang: en, tgt_lang: de}]"
    run = tmp_path / "ft"
    config = multi_config(multiway, run, two, "model.prenorm=false", "train.max_steps=65")
    assert train(config, resume=multi_run).state.step == 65
    source = tmp_path / "in.txt"
    source.write_text("Ein mann sieht den see .\n", encoding="utf-8")
    assert len(translate_cli(run, source, "--beam", "1", "--tgt-lang", "en")) == 1
    args = ["translate", "-m", str(run), str(source), "--tgt-lang", "fr"]
    refused = CliRunner().invoke(app, args)
    assert str(refused.exception) == "--tgt-lang fr: the model translates into en, de only"


@pytest.mark.slow
def test_nbest_lists_follow_the_tag(multi_run: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("Ein mann sieht den see .\nDas kind findet ein auto .\n", encoding="utf-8")
    lists = {}
    for lang in ("en", "fr"):
        best = translate_cli(multi_run, source, "--beam", "2", "--tgt-lang", lang)
        nbest = translate_cli(multi_run, source, "--beam", "2", "--tgt-lang", lang, "--nbest", "2")
        rows = [line.split("\t") for line in nbest]
        assert [int(row[0]) for row in rows] == [0, 0, 1, 1]
        assert [rows[0][2], rows[2][2]] == best  # the best of each first
        assert float(rows[0][1]) >= float(rows[1][1]) and float(rows[2][1]) >= float(rows[3][1])
        lists[lang] = rows
    assert lists["en"] != lists["fr"]


def test_one_target_language_needs_no_tag(trained_run: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("Ein mann sieht den see .\n", encoding="utf-8")
    args = ["translate", "-m", str(trained_run), str(source), "--precision", "fp32"]
    plain, named = (CliRunner().invoke(app, a) for a in (args, [*args, "--tgt-lang", "en"]))
    assert plain.exit_code == named.exit_code == 0 and plain.stdout == named.stdout
    wrong = CliRunner().invoke(app, [*args, "--tgt-lang", "fr"])
    assert str(wrong.exception) == "--tgt-lang fr: the model translates into en only"


@pytest.mark.slow
def test_evaluate_scores_every_test_direction(
    multi_run: Path, multiway: Path, tmp_path: Path
) -> None:
    # fp32: `auto` times fp32 against bf16 on each call, and may choose otherwise on a busy CPU.
    base = ["evaluate", "-m", str(multi_run), "--beam", "1", "--precision", "fp32"]
    result = CliRunner().invoke(app, [*base, "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [r["direction"] for r in records] == list(MULTI_DIRECTIONS)
    assert all(set(r) == {"direction", "bleu", "chrf", "ter"} for r in records)
    table = CliRunner().invoke(app, base)
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["direction", "BLEU", "chrF2", "TER"]
    rows = [line.split() for line in lines[1:5]]
    assert [row[0] for row in rows] == list(MULTI_DIRECTIONS)
    assert [float(row[1]) for row in rows] == pytest.approx(
        [r["bleu"]["score"] for r in records], abs=0.006
    )
    assert lines[5].startswith("BLEU: nrefs:1|") and len(lines) == 8
    # --tgt-lang: the directions into that language only
    into = CliRunner().invoke(app, [*base, "--json", "--tgt-lang", "en"])
    assert into.exit_code == 0, into.output
    assert json.loads(into.stdout) == [r for r in records if r["direction"] in ("de-en", "fr-en")]
    # ... named even where one direction is left: the output keeps its shape.
    into_de = CliRunner().invoke(app, [*base, "--json", "--tgt-lang", "de"])
    assert json.loads(into_de.stdout) == [r for r in records if r["direction"] == "en-de"]
    table = CliRunner().invoke(app, [*base, "--tgt-lang", "de"])
    assert [line.split()[0] for line in table.stdout.splitlines()[:2]] == ["direction", "en-de"]
    wrong = CliRunner().invoke(app, ["evaluate", "-m", str(multi_run), "--tgt-lang", "xx"])
    assert str(wrong.exception) == "--tgt-lang xx: the run's test sets translate into en, de, fr"
    # A run of several directions, one with a test set: named too.
    one = tmp_path / "run"
    shutil.copytree(multi_run, one, ignore=shutil.ignore_patterns("cache", "tensorboard"))
    data = load_config(one / "config.yaml").data
    first = dataclasses.replace(data.corpora[0], test=str(multiway / "valid"))
    data = dataclasses.replace(data, test="", corpora=[first, *data.corpora[1:]])
    save_config(
        dataclasses.replace(load_config(one / "config.yaml"), data=data), one / "config.yaml"
    )
    alone = CliRunner().invoke(
        app, ["evaluate", "-m", str(one), "--json", "--beam", "1", "--precision", "fp32"]
    )
    assert [r["direction"] for r in json.loads(alone.stdout)] == ["de-en"]


def test_a_missing_corpus_file_names_its_entry(multiway: Path, tmp_path: Path) -> None:
    config = multi_config(multiway, tmp_path / "run", "data.corpora=[{src_lang: de, tgt_lang: en}, "
                   "{src_lang: cs, tgt_lang: en}]")  # fmt: skip
    with pytest.raises(DataError) as err:
        open_run(config, ["train", "valid"])
    train = multiway / "train"
    assert str(err.value) == (
        f"data.train for data.corpora[1]: corpus {train}: no cs file (tried {train}.cs, "
        f"{train}.cs.gz)"
    )


@pytest.mark.slow
def test_serve_translates_into_the_requested_language(multi_run: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mt.serve.api import create_app
    from mt.serve.limits import Limits
    from mt.serve.server import load

    lines = ["Ein mann sieht den see .", "Das kind findet ein auto ."]
    served = load(multi_run, torch.device("cpu"), "fp32", 1, Limits())
    try:
        with TestClient(create_app(served)) as client:
            info = client.get("/v1/model").json()
            assert (info["source_languages"], info["target_languages"]) == (
                ["de", "en", "fr"], ["en", "de", "fr"]
            )  # fmt: skip
            assert info["directions"] == list(MULTI_DIRECTIONS)
            assert info["max_source_pieces"] == 128 - 2  # max_positions less EOS and the tag
            for lang in ("en", "fr"):
                answer = client.post("/v1/translate", json={"text": lines, "tgt_lang": lang})
                assert answer.status_code == 200, answer.text
                texts = [t["text"] for t in answer.json()["translations"]]
                cli = CliRunner().invoke(
                    app,
                    ["translate", "-m", str(multi_run), "--beam", "1", "--tgt-lang", lang,
                     "--device", "cpu", "--precision", "fp32"],
                    input="".join(f"{line}\n" for line in lines),
                )  # fmt: skip
                assert texts == cli.stdout.splitlines()
            # Attention over the user's pieces only, as `mt attention` shows it: not the tag.
            request = {"text": lines[0], "tgt_lang": "en", "attention": True, "pieces": True}
            shown = client.post("/v1/translate", json=request).json()["translations"][0]
            _, tokenizer, _, _ = load_trained(multi_run, torch.device("cpu"))
            pieces = tokenizer.src.encode(lines[0], out_type=str)
            assert shown["attention"]["source"] == [*pieces, "</s>"]
            assert shown["source_pieces"] == pieces  # so do the pieces: not >>en<<
            missing = client.post("/v1/translate", json={"text": lines})
            assert missing.status_code == 422
            error = (
                "tgt_lang: missing: this model translates into en, de, fr (or start each "
                "sentence with its tag, e.g. >>en<<)"
            )
            assert missing.json() == {"error": error}
            # A sentence's own tag names its target, as in mt translate (Marian's convention).
            own = {"text": [f">>fr<< {lines[0]}", f">>en<< {lines[1]}"], "pieces": True}
            answer = client.post("/v1/translate", json=own).json()["translations"]
            alone = [
                client.post(
                    "/v1/translate", json={"text": line, "tgt_lang": lang, "pieces": True}
                ).json()["translations"][0]
                for line, lang in zip(lines, ("fr", "en"), strict=True)
            ]
            assert answer == alone  # the tag's text is not among the source pieces either
            unknown = client.post("/v1/translate", json={"text": [lines[0], f">>cs<< {lines[1]}"],
                                                          "tgt_lang": "en"})  # fmt: skip
            assert unknown.json() == {
                "error": "text[1]: starts with >>cs<<, not a target language of this model "
                "(en, de, fr)"
            }
    finally:
        served.batcher.stop()


@pytest.mark.slow
def test_resume_may_change_the_selected_direction_not_the_temperature(
    multi_run: Path, multiway: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(multi_run, run, ignore=shutil.ignore_patterns("tensorboard"))
    fixture = ["model.prenorm=false", "train.max_steps=60", "train.valid_every=30"]  # conftest's
    with pytest.raises(ConfigError) as err:
        train(multi_config(multiway, run, *fixture, "data.temperature=1"))
    assert str(err.value) == (
        f"{run / 'config.yaml'}: the run was started with other settings (data.temperature: 5.0 "
        "-> 1.0); use a new run_dir, or restore those settings to resume"
    )
    before = train(multi_config(multiway, run, *fixture)).state  # at max_steps: restores only
    valid = read_metrics(run, "valid")
    assert before.best_bleu == max(r["bleu"] for r in valid) and before.select_direction == ""
    en_fr = {r["step"]: r["en-fr/bleu"] for r in valid}
    assert len(set(en_fr.values())) == 2  # steps 30 and 60: one is the better
    worse = min(en_fr, key=en_fr.__getitem__)
    ckpt.set_best(
        run,
        ckpt.Checkpoint.from_weights(run / "checkpoints" / f"{ckpt.step_name(worse)}.safetensors"),
    )
    after = train(multi_config(multiway, run, *fixture, "data.select_direction=en-fr")).state
    assert after.best_bleu == max(en_fr.values()) != before.best_bleu
    assert after.select_direction == "en-fr"
    assert ckpt.best_checkpoint(run).step == max(en_fr, key=en_fr.__getitem__) != worse
    caplog.set_level("INFO", logger="mt")
    more = ["train.max_steps=90", "data.select_direction=en-fr"]
    train(multi_config(multiway, run, *fixture, *more))
    # The validation line shows the mean and the selected direction's BLEU, the best of the latter.
    last = read_metrics(run, "valid")[-1]
    best = max(r["en-fr/bleu"] for r in read_metrics(run, "valid"))
    line = next(m for m in caplog.messages if m.startswith("valid step 90 "))
    assert (
        f"| BLEU {last['bleu']:.2f} | en-fr BLEU {last['en-fr/bleu']:.2f} (best {best:.2f}) |"
        in line
    )


@pytest.mark.slow
def test_a_new_selected_direction_outranks_the_saved_best(
    multi_run: Path, multiway: Path, tmp_path: Path
) -> None:
    # The latest checkpoint was saved as the best by the mean BLEU; by en-fr's the first one is
    # (its record edited so): the new choice holds, and counts one validation since its best.
    run = tmp_path / "run"
    shutil.copytree(multi_run, run, ignore=shutil.ignore_patterns("tensorboard"))
    fixture = ["model.prenorm=false", "train.max_steps=60", "train.valid_every=30"]  # conftest's
    before = train(multi_config(multiway, run, *fixture)).state  # at max_steps: restores only
    assert (before.bad_validations, ckpt.best_checkpoint(run).step) == (0, 60)
    metrics = run / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    for record in records:
        if record["kind"] == "valid" and record["step"] == 30:
            record["en-fr/bleu"] = 99.0
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    after = train(multi_config(multiway, run, *fixture, "data.select_direction=en-fr")).state
    assert ckpt.best_checkpoint(run).step == 30
    assert (after.best_bleu, after.bad_validations) == (99.0, 1)


@pytest.mark.slow
def test_resume_may_change_a_corpus_dev_set_not_its_training_data(
    multi_run: Path, multiway: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(multi_run, run, ignore=shutil.ignore_patterns("tensorboard"))
    fixture = ["model.prenorm=false", "train.max_steps=60", "train.valid_every=30"]  # conftest's

    def corpora(key: str, value: Path) -> str:
        """data.corpora as multi_config's, with `key: value` set on the second corpus."""
        items = [
            f"src_lang: {d.split('-')[0]}, tgt_lang: {d.split('-')[1]}" for d in MULTI_DIRECTIONS
        ]
        items[1] += f", {key}: {value}"
        return "data.corpora=[" + ", ".join(f"{{{item}}}" for item in items) + "]"

    with pytest.raises(ConfigError) as err:
        train(multi_config(multiway, run, *fixture, corpora("train", multiway / "valid")))
    assert str(err.value) == (
        f"{run / 'config.yaml'}: the run was started with other settings (data.corpora[1].train: "
        f"'' -> '{multiway / 'valid'}'); use a new run_dir, or restore those settings to resume"
    )
    resumed = train(multi_config(multiway, run, *fixture, corpora("valid", multiway / "valid")))
    assert resumed.state.step == 60


@pytest.mark.slow
def test_tokenizer_encode_puts_the_target_languages_tag_first(multi_run: Path) -> None:
    tokenizer = prepare_tokenizer(load_config(multi_run / "config.yaml"))
    args = ["tokenizer", "encode", "-m", str(multi_run), "--tgt-lang", "fr"]
    pieces = CliRunner().invoke(app, [*args, "--pieces"], input="Ein mann .\n\n")
    assert pieces.exit_code == 0, pieces.output
    assert pieces.stdout.splitlines() == [
        " ".join([">>fr<<", *tokenizer.src.encode("Ein mann .", out_type=str)]),
        "",  # a blank line stays blank, untagged
    ]
    ids = CliRunner().invoke(app, args, input="Ein mann .\n")
    assert ids.stdout.split()[0] == str(tokenizer.tags["fr"])
    own = CliRunner().invoke(app, [*args, "--pieces"], input=">>en<< Ein mann .\n")
    assert own.stdout.split() == [">>en<<", *tokenizer.src.encode("Ein mann .", out_type=str)]
    target = CliRunner().invoke(app, [*args, "--side", "tgt"], input="a man .\n")
    assert str(target.exception) == "--tgt-lang tags sources: it needs --side src"


def test_a_pre_tagged_corpus_trains_on_what_translate_reads(
    multi_run: Path, tmp_path: Path
) -> None:
    tokenizer = prepare_tokenizer(load_config(multi_run / "config.yaml"))
    lines = [">>fr<< Ein mann .", "Ein mann .", ">>en<< Ein mann ."]  # OPUS-MT's pre-tagged form
    (tmp_path / "pre.de").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "pre.fr").write_text("un homme .\n" * 3, encoding="utf-8")
    corpus = corpora.open_corpus(str(tmp_path / "pre"), "de", "fr")
    encoded = encode_corpus(
        corpus, tokenizer, tmp_path / "cache", DataConfig(), filter_lengths=False
    )
    sources = [src for src, _ in encoded.pairs(np.arange(3))]
    plain = [tokenizer.tags["fr"], *tokenizer.src.encode("Ein mann .")]
    # A leading tag of the corpus's own target is not text (mt translate strips it too): the
    # first two lines encode alike, as encode_sources encodes the first for translation.
    assert sources[0] == sources[1] == plain == encode_sources(lines[:1], tokenizer, 100, None)[0]
    # Another language's tag contradicts the corpus's target: it stays, as text.
    assert sources[2] == [tokenizer.tags["fr"], *tokenizer.src.encode(">>en<< Ein mann .")]
