"""Smoke runs of the scripts under scripts/, so that they cannot rot."""

from __future__ import annotations

import argparse
import copy
import gzip
import importlib.util
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers.benchmarks import written_file
from safetensors.torch import load_file

from mt.config import DataConfig, ModelConfig, load_config, save_config
from mt.corpora import open_corpus
from mt.data import encode_corpus
from mt.metrics import read_metrics
from mt.model import Transformer
from mt.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny"
TEST_PREFIX = "test_2016_flickr"


@pytest.mark.slow
def test_bench_decode_prints_a_table(
    trained_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    args = [str(trained_run), "--src", str(TINY / "valid.de"), "--ref", str(TINY / "valid.en"),
            "--beams", "1,2", "--max-tokens", "64,100000", "--repeats", "1", "--threads", "1",
            "--linear", "packed,onednn,plain", "--reorder", "in-place,copy"]  # fmt: skip
    out = run_script(monkeypatch, capsys, "bench_decode", *args)
    rows = [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in out.splitlines()
        if line.startswith("| greedy") or line.startswith("| beam")
    ]
    settings = [
        (search, budget, linear, reorder)
        for search in ("greedy", "beam 2")
        for budget in ("64", "100,000")
        for linear in ("packed", "onednn", "plain")
        for reorder in ("in-place", "copy")
    ]
    assert [tuple(row[:4]) for row in rows] == settings
    bleu = {setting: float(row[7]) for setting, row in zip(settings, rows, strict=True)}
    assert all(b > 50 for b in bleu.values())  # the tiny run has learnt its toy language
    for search, budget, linear, _ in settings:
        # A cache reorder copies rows, never changes them; batching does not change outputs
        # through one kind of product (packed, large batches may go through BLAS instead).
        assert bleu[search, budget, linear, "in-place"] == bleu[search, budget, linear, "copy"]
        if linear != "packed":
            assert bleu[search, "64", linear, "copy"] == bleu[search, "100,000", linear, "copy"]


@pytest.mark.slow
def test_multi30k_script_trains_translates_and_scores(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for split, tiny in (("train", "train"), ("val", "valid"), ("test_2016_flickr", "valid")):
        for lang in ("de", "en"):
            text = (TINY / f"{tiny}.{lang}").read_bytes()
            (data / f"{split}.{lang}.gz").write_bytes(gzip.compress(text))
    tiny_model = [
        "model.dim=32", "model.enc_layers=1", "model.dec_layers=1", "model.heads=2",
        "model.ffn_dim=64", "model.max_positions=128", "tokenizer.vocab_size=100",
        "tokenizer.byte_fallback=false", "data.max_len=64", "train.max_tokens=256",
        "train.max_steps=20", "train.max_minutes=0", "train.valid_every=10", "train.keep_last=2",
        "train.average_last=2", "train.precision=fp32", "train.report=false", "decode.beam=2",
    ]  # fmt: skip
    env = {**os.environ, "DATA": str(data), "RUN_PREFIX": str(tmp_path / "run"),
           "DIRECTIONS": "en-de",  # one direction: the other differs only in its config
           "MT": str(Path(sys.executable).parent / "mt"), "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "multi30k.sh"), *tiny_model],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "run-en-de"
    assert (run / "checkpoints" / "average.safetensors").is_file()
    out = (run / "test.out.de").read_text(encoding="utf-8").splitlines()
    assert len(out) == 40
    assert "== en-de: test_2016_flickr, 40 sentences" in proc.stdout
    scores = [line for line in proc.stdout.splitlines() if line.startswith("BLEU = ")]
    assert len(scores) == 2  # cased, then lowercased
    assert "case:mixed" in scores[0] and "case:lc" in scores[1]


def gpu_bench(tmp_path: Path, *args: str) -> tuple[dict, str]:
    """Run scripts/gpu_bench.py's CPU smoke mode; its JSON results and its Markdown section."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_bench.py"), "--device", "cpu", "--smoke",
         "--no-compile", "--json", str(out), *args],
        capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


def positive(*values: float) -> bool:
    """All finite and above zero."""
    return all(math.isfinite(v) and v > 0 for v in values)


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu(tmp_path: Path) -> None:
    # Structure and invariants only: the speeds depend on the CPU and on its load.
    res, out = gpu_bench(tmp_path)
    t, pad = res["train"], res["train"]["padding"]
    assert t["params"] == 115_520  # the --smoke model with a 500-piece vocabulary
    assert positive(t["tgt_tok_s"], t["flop_s"], t["real_flop_s"], res["peak_flop_s"])
    assert t["real_flop_s"] < t["flop_s"]  # the same seconds, fewer FLOPs: pads are not real
    assert res["datasheet_flop_s"] is None  # a CPU is not in the table of cards
    # Padding counts: 3 timed batches, real tokens at most the padded positions, some pads.
    assert pad["batches"] == 3 and 0 <= pad["batches_without_src_padding"] <= 3
    assert 0 < pad["src_tokens"] < pad["src_positions"]
    assert 0 < pad["tgt_tokens"] < pad["tgt_positions"]
    assert res["decode"]["sentences"] == 16 and positive(res["decode"]["sentences_s"])
    # An untrained model would end each sentence at once: the search is made to output 32 pieces.
    assert res["decode"]["out_tok_s"] / res["decode"]["sentences_s"] == pytest.approx(32)
    assert res["precision"] == "fp32"  # the default on a CPU
    # CPU training attends with SDPA's math kernel in every precision (mt.device.autocast).
    assert "aten::_scaled_dot_product_attention_math" in t["sdpa_kernels"]
    assert not any("flash" in kernel for kernel in t["sdpa_kernels"])
    # Each kernel was tried alone, with and without padding; the math kernel runs everything.
    assert set(t["sdpa_alone"]) == {"flash", "memory-efficient", "cudnn", "math"}
    assert t["sdpa_alone"]["math"] == {"no padding": True, "padding": True}
    for heading in ("| **MFU, measured peak** |", "| MFU, datasheet peak | n/a",
                    "| **MFU (real tokens), measured peak** |", "| padding: source / target",
                    "| SDPA kernel alone |", "| beam-5 decoding"):  # fmt: skip
        assert heading in out
    mfu = t["flop_s"] / res["peak_flop_s"]
    assert f"| **MFU, measured peak** | **{mfu:.1%}** |" in out


@pytest.mark.slow
def test_gpu_bench_makes_enough_batches_under_the_base_budget() -> None:
    # The first GPU run stopped at "only 37 batches, 46 needed": too few sentences were drawn.
    gpu_bench = load_script("gpu_bench")
    config = gpu_bench.load_config(ROOT / "configs" / "base.yaml")
    batches = gpu_bench.synthetic_batches(config, 46)
    assert len(batches) == 46
    assert all(b.src.numel() <= config.train.max_tokens for b in batches)


@pytest.mark.slow
def test_gpu_bench_trainer_section_runs_mt_train_on_cpu(tmp_path: Path) -> None:
    res, out = gpu_bench(tmp_path, "--trainer", "--workdir", str(tmp_path / "work"))
    w = res["trainer"]
    assert res["ranks"] == 1 and res["update"] == [2, 512]  # base.yaml's update_freq, --smoke
    assert w["steps"] == 18  # 20 steps logged every 2: the first window is left out
    assert positive(w["tgt_tok_s"], res["model_tgt_tok_s"], res["wall_seconds"])
    assert 0 <= w["data_share"] < 1
    steps = [r["step"] for r in read_metrics(tmp_path / "work" / "run", "train")]
    assert steps == list(range(2, 21, 2))
    ratio = w["tgt_tok_s"] / res["model_tgt_tok_s"]
    assert f"| **trainer speed / model speed** | **{ratio:.0%}** |" in out
    assert out.startswith("## GPU: `mt train` against its model (configs/base.yaml)")


@pytest.mark.slow
def test_bench_data_smoke_counts_every_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    args = ["--smoke", "--keep", "--workdir", str(tmp_path)]
    lines = run_script(monkeypatch, capsys, "bench_data", *args).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| pairs | kept |"))
    rows = itertools.takewhile(lambda line: line.startswith("|"), lines[start + 2 :])
    table = {int(r.split("|")[1].replace(",", "")): r.split("|")[1:-1] for r in rows}
    assert list(table) == [2000, 4000]  # one row per size
    for pairs, row in table.items():
        kept, pairs_s = (float(row[i].replace(",", "")) for i in (1, 3))
        assert 0 < kept <= pairs and pairs_s > 0
    results = json.loads((tmp_path / "results.json").read_text())
    for res in results:
        assert res["total"] == res["pairs"]  # every generated line was read
        assert res["batched"] == res["kept"]  # one epoch's batches hold every kept pair once
    # The sizes share their first pairs (the corpus is generated chunk by chunk from a seed) ...
    small, large = (tmp_path / f"pairs-{n}" / "train.src" for n in (2000, 4000))
    assert large.read_text().splitlines()[:2000] == small.read_text().splitlines()
    # ... and encoding the kept corpus again, independently, keeps the same pairs.
    corpus = open_corpus(str(tmp_path / "pairs-2000" / "train"), "src", "tgt")
    tokenizer = load_tokenizer(tmp_path / "tokenizer")
    again = encode_corpus(corpus, tokenizer, tmp_path / "again", DataConfig(), filter_lengths=True)
    assert again.stats.kept == int(table[2000][1].replace(",", ""))


@pytest.mark.slow
def test_ema_compare_scores_the_ema_and_the_trained_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--run", str(tmp_path / "run"),
            "--steps", "4,8", "--decays", "0.9", "--device", "cpu", "--precision", "fp32", "--",
            f"data.cache_dir={tmp_path / 'cache'}", "decode.beam=1",
            "decode.max_len_b=5"]  # fmt: skip
    out = run_script(monkeypatch, capsys, "ema_compare", *args)  # `mt train` in a child
    rows = [line.split("|")[1:5] for line in out.splitlines() if line.startswith("| ")]
    assert [(r[0].strip(), r[1].strip()) for r in rows[1:]] == [
        ("4", "trained"), ("4", "EMA 0.9"), ("8", "trained"), ("8", "EMA 0.9")
    ]  # fmt: skip
    assert all(0 <= float(r[2]) <= 100 and 0 <= float(r[3]) <= 100 for r in rows[1:])
    trained = load_file(tmp_path / "run-ema0.9" / "trained" / "step-00000008.safetensors")
    ema = load_file(tmp_path / "run-ema0.9" / "checkpoints" / "step-00000008.safetensors")
    assert trained.keys() == ema.keys()
    assert not all(torch.equal(trained[k], ema[k]) for k in ema)
    # --existing scores the same run's checkpoints again, without training: the same table.
    again = ["--existing", str(tmp_path / "run-ema0.9"), "--steps", "4,8", "--device", "cpu",
             "--precision", "fp32"]  # fmt: skip
    out2 = run_script(monkeypatch, capsys, "ema_compare", *again)
    assert [line for line in out2.splitlines() if line.startswith("| ")] == [
        line for line in out.splitlines() if line.startswith("| ")
    ]


def load_script(name: str) -> ModuleType:
    """A script under scripts/ as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # where dataclasses look a module's names up
    spec.loader.exec_module(module)
    return module


def run_script(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, name: str, *args: str
) -> str:
    """scripts/NAME.py ARGS in this process, through its main(), from the checkout: its stdout.

    A Python start-up (torch, mt) saved per run; the scripts' own children still run apart.
    The torch thread count a script sets (--threads) is undone for the tests after it.
    """
    script = load_script(name)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *args])
    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        script.main()
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


def test_bench_padding_mirrors_the_model_and_both_losses_agree() -> None:
    bench = load_script("bench_padding")
    torch.manual_seed(0)
    shape = ModelConfig(dim=16, enc_layers=1, dec_layers=1, heads=2, ffn_dim=32)
    model = Transformer(shape, 50, 50).eval()
    src, tgt_in, tgt_out = bench.batch(6, 7, 0.8, 50)
    assert int((tgt_out != 0).sum()) == 42 - round(0.2 * 42)
    states = bench.decoder_states(model, src, tgt_in)  # (B, T, D)
    torch.testing.assert_close(F.linear(states, model.tgt_embed.weight), model(src, tgt_in))
    full = bench.full_loss(model, states, tgt_out, 0.1)
    torch.testing.assert_close(bench.gathered_loss(model, states, tgt_out, 0.1), full)


def test_bench_attention_variants_agree_with_sdpa_on_the_decoders_layouts() -> None:
    bench = load_script("bench_attention")
    res = bench.case((3, 4, 1, 64), (3, 4, 7, 64), torch.float32, 1, 1, time_major=True)
    assert list(res) == ["sdpa", "sdpa math", "matmul"] and res["sdpa"][1] == 0.0
    assert all(seconds > 0 and diff < 1e-5 for seconds, diff in res.values())
    labels = [label for label, *_ in bench.shapes([160], [32], 20, 5, 16)]
    assert labels == ["self, N=160, L=20, time-major keys", "cross, B=32, G=5, S=16"]
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    torch.testing.assert_close(bench.matmuls(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.slow
def test_bench_constraints_prints_a_table(
    trained_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    sources = (TINY / "valid.de").read_text(encoding="utf-8").splitlines()[:8]
    refs = (TINY / "valid.en").read_text(encoding="utf-8").splitlines()[:8]
    src, ref = tmp_path / "src.de", tmp_path / "ref.en"
    src.write_text("\n".join(sources) + "\n", encoding="utf-8")
    # Each source's reference is its neighbour's, so that outputs miss words to constrain.
    ref.write_text("\n".join(refs[1:] + refs[:1]) + "\n", encoding="utf-8")
    args = [str(trained_run), "--src", str(src), "--ref", str(ref), "--counts", "1,2",
            "--beam", "2", "--repeats", "1", "--threads", "1"]  # fmt: skip
    out = run_script(monkeypatch, capsys, "bench_constraints", *args)
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 1 ")]
    rows += [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 2 ")]
    assert len(rows) == 2
    for row in rows:  # whether BLEU rises is the benchmark's finding, not a tiny model's
        assert int(row[1]) >= 6 and row[2].strip() == "100.0%"
        assert all(float(x) >= 0 for x in row[3:])


@pytest.mark.slow
def test_bench_mixed_batches_smoke_prints_both_runs(multi30k: Path, tmp_path: Path) -> None:
    if not (multi30k / f"{TEST_PREFIX}.fr.gz").is_file():
        pytest.skip(f"no French Multi30k files in {multi30k}")
    args = [sys.executable, str(ROOT / "scripts" / "bench_mixed_batches.py"), "--smoke",
            "--threads", "1", "--data", str(multi30k), "--workdir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("## Multilingual batches: one direction or mixed (Multi30k)\n")
    for name, mixed in (("one-direction", "false"), ("mixed", "true")):
        config = (tmp_path / name / "config.yaml").read_text()
        assert f"mixed_batches: {mixed}\n" in config and "max_steps: 10\n" in config
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    cells = {row[0].strip(): [c.strip() for c in row[1:]] for row in rows}
    for name in ("one direction", "mixed"):
        updates, _, speed, mean, *directions = cells[name]
        assert updates == "10" and float(speed.replace(",", "")) > 0 and len(directions) == 4
        assert float(mean) == pytest.approx(sum(map(float, directions)) / 4, abs=0.011)
    # Both validate at update 10 (the smoke runs' valid_every and last step): one curve row.
    assert cells["10"] == [cells["one direction"][3], cells["mixed"][3]]


def levers_run(run: Path) -> dict:
    """bench_levers' record of a run with these metrics, read up to update 150."""
    records = [
        {"kind": "train", "step": 50, "tokens_per_update": 1000.0, "tgt_tok_s": 10.0},
        {"kind": "valid", "step": 60, "bleu": 1.5},
        {"kind": "train", "step": 100, "tokens_per_update": 2000.0, "tgt_tok_s": 30.0},
        {"kind": "valid", "step": 120, "bleu": 2.5},
        {"kind": "train", "step": 150, "tokens_per_update": 3000.0, "tgt_tok_s": 20.0},
        {"kind": "valid", "step": 180, "bleu": 9.0},
        {"kind": "train", "step": 200, "tokens_per_update": 9999.0, "tgt_tok_s": 99.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_script("bench_levers").run_record(run, 150, ["model.dropout=0.1"])


def test_bench_levers_reads_a_run_up_to_its_step(tmp_path: Path) -> None:
    record = levers_run(tmp_path)
    assert record["steps"] == 150 and record["tok_s"] == 20.0
    # Each train record's mean tokens per update over the updates of its window.
    assert record["tokens"] == 50 * 1000.0 + 50 * 2000.0 + 50 * 3000.0
    assert record["bleu"] == {60: 1.5, 120: 2.5} and record["changes"] == ["model.dropout=0.1"]
    # A validation inside a window counts that window's mean for the updates before it.
    assert record["seen"] == {
        60: 50 * 1000.0 + 10 * 2000.0,
        120: 50 * 1000.0 + 50 * 2000.0 + 20 * 3000.0,
    }
    # A run stopped 30 updates after its last record: that record's mean for them.
    train = [{"step": 50, "tokens_per_update": 1000.0}, {"step": 100, "tokens_per_update": 2000.0}]
    assert load_script("bench_levers").tokens_at(train, 130) == 50 * 1000.0 + 80 * 2000.0


def test_bench_levers_lists_each_validation_by_tokens_seen(tmp_path: Path) -> None:
    rows = load_script("bench_levers").rows_by_tokens({"small": levers_run(tmp_path)})
    assert rows == [
        "| run | updates | target tokens | dev BLEU |",
        "|---|---:|---:|---:|",
        "| small | 60 | 0.07 M | 1.50 |",
        "| small | 120 | 0.21 M | 2.50 |",
    ]


def test_bench_levers_refuses_a_variant_named_like_the_baseline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as stopped:  # argparse's exit, as the script would exit
        run_script(monkeypatch, capsys, "bench_levers", "--variant", "recipe", "model.dropout=0.1")
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].endswith("error: --variant names must be unique and not 'recipe'")


def test_bench_levers_refuses_a_baseline_of_another_recipe(tmp_path: Path) -> None:
    levers = load_script("bench_levers")
    recipe = ROOT / "configs" / "multi30k.yaml"
    args = argparse.Namespace(baseline=str(tmp_path), steps=1200, data=tmp_path, overrides=[])

    def baseline(*overrides: str) -> None:
        save_config(
            load_config(recipe, [f"run_dir={tmp_path}", *overrides]), tmp_path / "config.yaml"
        )

    baseline("train.max_steps=1200", "train.max_minutes=0", "train.keep_last=30")
    levers.check_baseline(args)  # the recipe to the same updates: kept only more checkpoints
    baseline("train.max_minutes=58")  # the hour recipe: its cool-down is at its own end
    with pytest.raises(SystemExit) as stopped:
        levers.check_baseline(args)
    assert str(stopped.value) == (
        f"bench_levers: --baseline {tmp_path} did not train the recipe the variants change "
        "(train.max_steps: 100000 -> 1200; train.max_minutes: 58.0 -> 0.0); leave --baseline out "
        "to train it here"
    )
    args.overrides = ["train.cooldown=0"]  # no cool-down: where a run ends does not matter
    baseline("train.max_minutes=58", "train.cooldown=0")
    levers.check_baseline(args)


@pytest.mark.slow
def test_bench_levers_smoke_trains_the_recipe_and_each_variant(
    multi30k: Path, tmp_path: Path
) -> None:
    if not (multi30k / f"{TEST_PREFIX}.fr.gz").is_file():
        pytest.skip(f"no French Multi30k files in {multi30k}")
    script = [sys.executable, str(ROOT / "scripts" / "bench_levers.py"), "--smoke", "--threads",
              "1", "--data", str(multi30k), "--workdir", str(tmp_path)]  # fmt: skip
    variants = ["--variant", "heads-1", "model.heads=1",
                "--variant", "ls-0", "train.label_smoothing=0"]  # fmt: skip
    proc = subprocess.run([*script, *variants], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("## Recipe levers at a fixed number of updates (Multi30k)\n")
    configs = {
        name: (tmp_path / name / "config.yaml").read_text() for name in ("recipe", "heads-1")
    }
    assert "heads: 2\n" in configs["recipe"] and "heads: 1\n" in configs["heads-1"]
    assert all("max_steps: 10\n" in config for config in configs.values())
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [c.strip() for c in rows[0]][-1] == "dev BLEU @ 10"
    cells = {row[0].strip(): [c.strip() for c in row[1:]] for row in rows[1:]}
    assert list(cells) == ["recipe", "heads-1", "ls-0"]
    assert cells["recipe"][0] == "none" and cells["heads-1"][0] == "`model.heads=1`"
    read = load_script("bench_levers").run_record
    for name, (_, updates, speed, tokens, bleu) in cells.items():
        assert updates == "10" and float(speed.replace(",", "")) > 0 and float(bleu) >= 0
        assert read(tmp_path / name, 10, [])["tokens"] > 0
        assert tokens == f"{read(tmp_path / name, 10, [])['tokens'] / 1e6:.2f} M"
    # The finished recipe run as --baseline: read, not trained again, with the same numbers.
    again = [*script, "--baseline", str(tmp_path / "recipe"), *variants[:3]]
    proc = subprocess.run(again, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout.replace("\n", " ")
    assert f"the baseline is the existing run {tmp_path / 'recipe'}" in text
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert {row[0].strip(): [c.strip() for c in row[1:]] for row in rows[1:]} == {
        name: cells[name] for name in ("recipe", "heads-1")
    }


@pytest.mark.slow
def test_bench_multilingual_smoke_prints_and_writes_its_tables(
    multi30k: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    if not (multi30k / f"{TEST_PREFIX}.fr.gz").is_file():
        pytest.skip(f"no French Multi30k files in {multi30k}")
    out_md = tmp_path / "benchmarks.md"
    options = ["--minutes", "5", "--set", "model.heads=1"]
    options += ["--multi-set", "tokenizer.vocab_size=210"]
    args = [sys.executable, str(ROOT / "scripts" / "bench_multilingual.py"), "--smoke",
            "--threads", "1", "--data", str(multi30k), "--workdir", str(tmp_path / "work"),
            *options, "--speed-minutes", "1", "--write", str(out_md)]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("## Multilingual vs bilingual models (Multi30k)\n")
    command = (
        "`scripts/bench_multilingual.py --smoke --minutes 5 --set model.heads=1 --multi-set "
        "tokenizer.vocab_size=210 --speed-minutes 1` on "
    )
    assert command in out.replace("\n", " ")
    config = (tmp_path / "work" / "multi" / "config.yaml").read_text()
    assert "heads: 1\n" in config and "max_steps: 20\n" in config
    assert out_md.read_text() == written_file(out)
    main, speed = out.split("The same comparison at the same vocabulary size")
    cells = table_cells(main)
    for direction in ("de-en", "en-de", "fr-en", "en-fr"):
        bilingual, multilingual, difference = map(float, cells[direction])
        assert difference == pytest.approx(multilingual - bilingual, abs=0.011)
    for direction in ("de-fr", "fr-de"):  # the zero-shot ones
        bleu, off_target = cells[direction]
        assert float(bleu) >= 0 and 0 <= float(off_target.rstrip("%")) <= 100
    runs = ["multilingual", *(f"bilingual {d}" for d in ("de-en", "en-de", "fr-en", "en-fr"))]
    # The multilingual model makes twice the bilingual runs' updates (their max_steps is 10).
    assert_speeds(main, cells, runs, ["20", *["10"] * 4])
    # The speed runs: every model with the multilingual vocabulary, the smoke's 10 steps.
    opening = " (210 pieces everywhere), fresh runs of 1 minutes each in fp32, one after another"
    assert speed.replace("\n", " ").startswith(opening)
    assert_speeds(speed, table_cells(speed), runs, ["10"] * 5)
    for name in ("multi", "de-en", "en-de", "fr-en", "en-fr"):
        config = (tmp_path / "work" / "speed" / name / "config.yaml").read_text()
        for line in ("vocab_size: 210", "heads: 1", "max_minutes: 1.0", "valid_every: 1000000"):
            assert f"  {line}\n" in config, (name, line)
    assert "  vocab_size: 200\n" in (tmp_path / "work" / "de-en" / "config.yaml").read_text()
    # --bilingual takes those runs instead of training them: a new workdir holds only the
    # multilingual model, trained alike, so the tables come out the same but for its speed.
    bilingual = [str(tmp_path / "work" / d) for d in ("de-en", "en-de", "fr-en", "en-fr")]
    again = [*args[: args.index("--workdir") + 1], str(tmp_path / "work2"),
             *options, "--bilingual", *bilingual]  # fmt: skip
    proc = subprocess.run(again, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "work2").iterdir()) == ["multi", "smoke-data"]

    def tables(text: str) -> list[str]:
        return [x for x in text.splitlines() if x.startswith("|") and "| multilingual |" not in x]

    assert "same vocabulary size" not in proc.stdout
    assert tables(proc.stdout) == tables(main)
    # Refusals in-process (a Python start-up each saved): the script's main() as it runs.
    script = load_script("bench_multilingual")

    def refusal(argv: list[str]) -> tuple[object, str]:
        monkeypatch.setattr(sys, "argv", argv[1:])
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            script.main()
        return stopped.value.code, capsys.readouterr().err

    wrong = [*again[: again.index("--bilingual") + 1], str(tmp_path / "work" / "multi")]
    assert refusal(wrong)[0] == (
        f"--bilingual {tmp_path / 'work' / 'multi'}: trains de-en, en-de, fr-en, en-fr; "
        "expected one of de-en, en-de, fr-en, en-fr"
    )  # (printed to stderr, exit status 1, by Python)
    # --score: the finished multilingual run scored alone, the same numbers as its table.
    scored = [*args[: args.index("--workdir") + 1], str(tmp_path / "work"), "--score",
              str(tmp_path / "work" / "multi")]  # fmt: skip
    proc = subprocess.run(scored, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    opening = f"`scripts/bench_multilingual.py --score {tmp_path}/work/multi` (20 updates) on "
    assert proc.stdout.replace("\n", " ").startswith(opening)
    alone = table_cells(proc.stdout)
    for direction in ("de-en", "en-de", "fr-en", "en-fr"):
        assert alone[direction] == [cells[direction][1], ""]
    for direction in ("de-fr", "fr-de"):
        assert alone[f"{direction} (zero-shot)"] == cells[direction]
    code, err = refusal([*scored, "--write", str(out_md)])
    assert (code, err.splitlines()[-1]) == (
        2,
        "bench_multilingual.py: error: --score prints its table; --write is for the whole "
        "benchmark's section",
    )


def table_cells(text: str) -> dict[str, list[str]]:
    """The Markdown table rows of `text` by their first cell: the other cells, stripped."""
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ")]
    return {row[0].strip(): [c.strip() for c in row[1:]] for row in rows}


def assert_speeds(text: str, cells: dict, runs: list[str], steps: list[str]) -> None:
    """The speed table of bench_multilingual: each run's steps, and the ratio it states."""
    speeds = [float(cells[run][2].replace(",", "")) for run in runs]
    assert [cells[run][0] for run in runs] == steps and min(speeds) > 0
    ratio = re.search(r"throughput is ([\d.]+) x the bilingual", text.replace("\n", " "))
    assert ratio is not None
    assert float(ratio.group(1)) == pytest.approx(speeds[0] / (sum(speeds[1:]) / 4), abs=0.011)


@pytest.mark.slow
def test_bench_ensemble_scores_each_member_and_the_ensemble(trained_run: Path) -> None:
    bench = load_script("bench_ensemble")
    step = trained_run / "checkpoints" / "step-00000200.safetensors"
    args = argparse.Namespace(
        model=[step, step], weights=None, src=TINY / "valid.de", ref=TINY / "valid.en",
        beam=2, repeats=1, threads=1,
    )  # fmt: skip
    lines = bench.bench(args)
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ")][1:]
    assert [row[0].strip() for row in rows] == [str(step), str(step), "ensemble of 2"]
    bleus = [float(row[1]) for row in rows]
    assert bleus[0] == bleus[1] > 50  # the tiny run has learnt its toy language
    # A model in an ensemble with itself scores as itself (up to the rounding of a log_softmax).
    assert abs(bleus[2] - bleus[0]) < 0.5
    assert rows[2][4].strip() == f"{bleus[2] - bleus[0]:+.2f}"


@pytest.mark.slow
def test_bench_demo_trains_both_configs_and_tables_their_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "multi30k"  # the tiny corpus under Multi30k's file names
    data.mkdir()
    tiny = ROOT / "tests/data/tiny"
    for split, name in [("train", "train"), ("valid", "val"), ("valid", "test_2016_flickr")]:
        for lang in ("de", "en"):
            text = (tiny / f"{split}.{lang}").read_bytes()
            (data / f"{name}.{lang}.gz").write_bytes(gzip.compress(text))
    tiny_model = ["tokenizer.vocab_size=100", "tokenizer.byte_fallback=false", "model.dim=32",
                  "model.enc_layers=1", "model.dec_layers=1", "model.heads=2", "model.ffn_dim=64",
                  "train.max_steps=6", "train.valid_every=3", "train.max_tokens=256",
                  "train.precision=fp32", "train.device=cpu", "train.report=false",
                  "decode.beam=1"]  # fmt: skip
    out_md = tmp_path / "benchmarks.md"
    command = ["--data", str(data), "--minutes", "0", "--out", str(tmp_path / "runs"),
               "--write", str(out_md), "--set", *tiny_model]  # fmt: skip
    out = run_script(monkeypatch, capsys, "bench_demo", *command)  # each `mt train` a child
    assert out.startswith("## make demo: what a newcomer gets in minutes\n")
    assert out_md.read_text() == written_file(out)
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| c")]
    assert [row[0].strip() for row in rows][1:] == [
        "configs/demo.yaml", "configs/multi30k.yaml, warm-up 200, lr 2e-3 (the demo before)"
    ]  # fmt: skip
    for (_, updates, speed, dev, test), index in zip(rows[1:], (0, 1), strict=True):
        run = tmp_path / "runs" / f"run{index}"
        assert int(updates) == 6 == read_metrics(run, "end")[-1]["step"]
        assert float(speed.replace(",", "")) > 0
        assert float(dev) == round(read_metrics(run, "valid")[-1]["bleu"], 2)
        assert 0 <= float(test) <= 100


@pytest.mark.slow
def test_bench_length_penalty_scores_each_setting_on_dev_and_test(trained_run: Path) -> None:
    bench = load_script("bench_length_penalty")
    settings = bench.parse_settings("gnmt:1.5,average,none")
    assert settings == [("gnmt", 1.5), ("average", 0.0), ("none", 0.0)]
    res = bench.bench([trained_run], settings)
    own = ("gnmt", 0.6)  # configs/tiny.yaml leaves decode.alpha at its default
    assert list(res[trained_run]) == [own, *settings]  # the run's own setting first
    # The tiny run's dev and test sets are the same file: the same BLEU on both.
    for scores in res[trained_run].values():
        assert scores["valid"] == scores["test"] and scores["valid"]["de-en"] > 50
    args = argparse.Namespace(settings="gnmt:1.5,average,none")
    lines = bench.report(args, res).splitlines()
    rows = [line.split("|")[1:-1] for line in lines if line.startswith(f"| {trained_run} ")]
    assert [row[2].strip().split(" (")[0] for row in rows] == [
        "gnmt 0.6",
        "gnmt 1.5",
        "average",
        "none",
    ]
    assert "(own)" in rows[0][2] and sum("(best)" in row[2] for row in rows) == 1
    best = max(rows, key=lambda row: float(row[3]))
    assert "(best)" in best[2]
    means = {
        line.split("|")[1].strip(): line.split("|")[2:4] for line in lines if line.startswith("| ")
    }
    assert [x.strip() for x in means["gnmt 0.6"]] == ["+0.00", "+0.00"]
    for row in rows:  # one direction: the mean change is the row's change from the own setting
        change = float(row[3]) - float(rows[0][3])
        assert float(means[row[2].strip().split(" (")[0]][0]) == pytest.approx(change, abs=0.011)


def test_bench_rerank_weight_zero_is_the_forward_models_own_best(trained_run: Path) -> None:
    from mt.evaluate import score, translate_test_sets

    bench = load_script("bench_rerank")
    res = bench.bench(trained_run, trained_run, nbest=2, weights=[0.0, 1.0])
    ((hyps, refs, _),) = translate_test_sets(trained_run, "cpu", "fp32", split="valid").values()
    assert res["valid"]["0"] == pytest.approx(score(hyps, refs)["bleu"].score)
    assert set(res) == {"valid", "test"} and all(
        set(r) == {"0", "1", "oracle"} for r in res.values()
    )
    cands = [[("a b c", -1.0, -math.inf), ("the dog runs", -2.0, -1.0)]]  # -inf: unscored
    assert bench.top(cands, 0.0) == ["a b c"] and bench.top(cands, 1.0) == ["the dog runs"]
    assert bench.oracle(cands, ["the dog runs"]) == ["the dog runs"]
    args = argparse.Namespace(forward=trained_run, reverse=trained_run, nbest=2, weights="0,1")
    rows = [line for line in bench.report(args, res).splitlines() if line.startswith("| ")]
    names = [row.split(" |")[0].removesuffix(" (chosen)") for row in rows[1:]]
    assert names == ["| 0", "| 1", "| oracle"]
    assert sum("(chosen)" in row for row in rows) == 1


def test_bench_multilingual_stops_when_a_run_was_stopped_by_a_signal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # mt train stops gracefully on SIGTERM and returns; the benchmark must not take the cut run
    # as finished and go on to the next one.
    import mt.train

    bench = load_script("bench_multilingual")
    monkeypatch.setattr(mt.train, "train", lambda config: mt.train.TrainResult(None, signum=15))
    config = SimpleNamespace(run_dir=str(tmp_path / "en-fr"))
    with pytest.raises(SystemExit) as stopped:
        bench.train_run(config)
    assert str(stopped.value) == (
        f"bench_multilingual: {tmp_path / 'en-fr'} stopped by signal 15; run the same command "
        "again to resume it"
    )


@pytest.mark.slow  # a second or more: the full suite runs it
def test_bench_ct2_decodes_mt_in_a_child_and_shares_threads_among_ct2_workers(
    trained_run: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed")
    from mt.packing import pack
    from mt.rundir import load_trained
    from mt.translate import decode_settings

    bench = load_script("bench_ct2")
    config, tokenizer, model, _ = load_trained(trained_run, torch.device("cpu"))
    lines = (TINY / "valid.de").read_text(encoding="utf-8").splitlines()[:12]
    child = bench.mt_process(str(trained_run), "packed", 1, beam=2, nbest=1)
    here = bench.mt_decoder(
        pack(copy.deepcopy(model), torch.device("cpu"), "fp32"),
        tokenizer,
        decode_settings(config, beam=2),
    )
    assert child(lines) == here(lines) and len(child(lines)) == 12
    directory = bench.export_all(model, tokenizer, tmp_path)["CT2 float32"]
    threads = torch.get_num_threads()
    try:
        assert bench.ct2_translator(str(directory), 2, workers=2).num_translators == 2
        assert bench.ct2_translator(str(directory), 2).num_translators == 1
    finally:
        torch.set_num_threads(threads)  # CTranslate2 may set this thread's OpenMP threads


PERF_REPORT = """\
# Samples: 16K of event 'cpu-clock'
#
 56.90%  |  9154 |libtorch_cpu.so   |[.] mkl_blas_def_sgemm_kernel_0_zen
  3.70%  |   595 |libtorch_cpu.so   |[.] mkl_blas_def_sgemm_scopy_right16_bdz
  8.90%  |  1432 |libc.so.6         |[.] __memmove_avx_unaligned_erms
  2.90%  |   467 |libtorch_cpu.so   |[.] Sleef_finz_expf8_u10avx2
  1.20%  |   193 |[JIT] tid 21676   |[.] 0x00007f45de40939c
  3.30%  |   531 |libct2.so         |[.] ctranslate2::ops::TopK::compute<(ctranslate2::Device)0>
  4.50%  |   724 |libgomp.so.1      |[.] 0x000000000001de62
  1.00%  |   161 |[JIT] tid 21677   |[.] 0x00007f45de40a000
  0.50%  |    80 |libgomp.so.1      |[.] 0x000000000001e02a
  1.90%  |   306 |libpython3.11.so  |[.] _PyEval_EvalFrameDefault
  0.70%  |   113 |[kernel.kallsyms] |[k] clear_page_erms
  0.40%  |    64 |libc10.so         |[.] c10::TensorImpl::release_resources | something
"""


def test_profile_decode_groups_perf_samples_by_what_the_code_does() -> None:
    profiler = load_script("profile_decode")
    samples, rows = profiler.parse_report(PERF_REPORT)
    assert samples == 9154 + 595 + 1432 + 467 + 193 + 531 + 724 + 161 + 80 + 306 + 113 + 64
    assert rows[0] == (0.569, "libtorch_cpu.so", "mkl_blas_def_sgemm_kernel_0_zen")
    # Code without symbols: one row per library, JIT code of every thread one row.
    assert rows[2] == (pytest.approx(0.05), "libgomp.so.1", "(no symbol)")
    assert (pytest.approx(0.022), "[JIT]", "(no symbol)") in rows
    assert len(rows) == 10 and rows == sorted(rows, reverse=True)
    assert rows[-1][2] == "c10::TensorImpl::release_resources | something"  # a | in a symbol
    groups = profiler.Profile("mt", 8.2, samples, rows).groups()
    assert list(groups) == [name for name, _ in profiler.GROUPS] + ["other"]
    # MKL's copy inside a product counts as the product; oneDNN's JIT kernels too.
    assert groups["matrix products (BLAS, oneDNN, JIT kernels)"] == pytest.approx(0.628)
    assert groups["copies and gathers"] == pytest.approx(0.089)
    assert groups["softmax, log-softmax and exp"] == pytest.approx(0.029)
    assert groups["top-k and maxima"] == pytest.approx(0.033)
    assert groups["OpenMP runtime (threads waiting)"] == pytest.approx(0.05)
    assert groups["Python interpreter"] == pytest.approx(0.019)
    assert groups["operating system kernel"] == pytest.approx(0.007)
    assert groups["other"] == pytest.approx(0.004)
    assert sum(groups.values()) == pytest.approx(sum(share for share, _, _ in rows))


@pytest.mark.slow
def test_profile_decode_samples_mt_and_ct2_passes_in_their_own_processes(
    trained_run: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed")
    profiler = load_script("profile_decode")
    unusable = profiler.perf_usable()
    if unusable:
        pytest.skip(unusable)
    lines = (TINY / "valid.de").read_text(encoding="utf-8").splitlines()[:40]
    profiles = profiler.profile(trained_run, lines, 1, 2, tmp_path, length=6)
    assert [p.name for p in profiles] == ["mt", "CTranslate2"]
    for p in profiles:
        assert p.seconds > 0 and p.samples > 0 and p.symbols
        assert sum(p.groups().values()) == pytest.approx(1.0, abs=0.02)  # perf's rounding
    args = argparse.Namespace(threads=1, beam=2, top=3, fixed_length=6)
    section = profiler.report(args, profiles, len(lines))
    assert section.startswith(profiler.SECTION + ", 6 pieces per output\n")
    assert "Every output exactly 6 pieces" in section
    assert "| where the time goes | mt | CTranslate2 |" in section
    assert section.count("'s top symbols:") == 2


@pytest.mark.slow  # two tiny `mt train` processes
def test_bench_memory_tables_resident_memory_after_each_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    args = ["--config", "configs/tiny.yaml", "--data", str(TINY), "--test", "valid", "--steps",
            "6", "--valid-every", "2", "--", f"data.valid={TINY / 'valid'}",
            "train.log_every=1"]  # fmt: skip
    out = run_script(monkeypatch, capsys, "bench_memory", *args)
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| 2", "| 4", "| peak over the run"]
    for row in rows:
        trimmed, untrimmed = (
            float(cell.replace(",", "")) for cell in row.strip("| ").split(" | ")[1:]
        )
        assert min(trimmed, untrimmed) > 50  # MiB: a Python process with torch
