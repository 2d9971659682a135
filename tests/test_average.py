"""`mt average`: parameter means, tied weights, which checkpoints, metadata, errors, loading."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mt import checkpoint as ckpt
from mt.average import AVERAGE_NAME, average_checkpoints, average_run
from mt.cli import app
from mt.config import CONFIG_FILE, ModelConfig, load_config, save_config
from mt.errors import MtError
from mt.metrics import MetricsLog
from mt.model import Transformer
from mt.rundir import load_trained, model_checkpoint
from mt.translate import Translator

CPU = torch.device("cpu")
TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
META = {"tokenizer_sha256": "ab" * 32, "src_vocab": "24", "tgt_vocab": "24"}


def tiny_model(seed: int) -> Transformer:
    """A small Transformer with three-way tied embeddings, randomly initialised from `seed`."""
    torch.manual_seed(seed)
    config = ModelConfig(dim=8, enc_layers=1, dec_layers=1, heads=2, ffn_dim=16, max_positions=16)
    return Transformer(config, 24, 24)


def make_run(run_dir: Path, steps: list[int], bleu: dict[int, float] | None = None) -> Path:
    """A run directory with a checkpoint per step (seeded by the step) and dev BLEU records."""
    for step in steps:
        ckpt.save_checkpoint(run_dir, step, tiny_model(step), {"step": step}, META)
    metrics = MetricsLog(run_dir, tensorboard=False)
    for step, score in (bleu or {}).items():
        metrics.write("valid", step, {"loss": 1.0, "bleu": score})
    metrics.close()
    return run_dir


def test_average_is_the_parameter_mean(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", [10, 20])
    out = average_run(run, last=2)
    assert out == run / "checkpoints" / AVERAGE_NAME
    a, b = (load_file(run / "checkpoints" / f"step-000000{s}.safetensors") for s in (10, 20))
    mean = load_file(out)
    assert set(mean) == set(a) == set(b)  # tied weights stored once, under the same name
    for name, tensor in mean.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, (a[name] + b[name]) / 2, rtol=0, atol=1e-7)
    metadata = ckpt.read_metadata(out)
    assert {k: metadata[k] for k in META} == META
    assert "step" not in metadata and ckpt.averaged_steps(out) == [10, 20]
    # It is not a step checkpoint: never listed, resumed from or pruned.
    assert [c.step for c in ckpt.list_checkpoints(run)] == [10, 20]


def test_tied_weights_stay_tied(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", [1, 2, 3])
    out = average_run(run, last=3)
    model = tiny_model(99)
    ckpt.load_weights(out, model, expected=META)
    assert model.src_embed.weight is model.tgt_embed.weight
    models = [tiny_model(s) for s in (1, 2, 3)]
    expected = sum(m.tgt_embed.weight.detach().double() for m in models) / 3
    torch.testing.assert_close(model.tgt_embed.weight.detach(), expected.float())


def test_last_k_picks_the_highest_steps(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", [10, 20, 30])
    assert ckpt.averaged_steps(average_run(run, last=2)) == [20, 30]
    one = run / "checkpoints" / "one.safetensors"
    assert ckpt.averaged_steps(average_run(run, last=1, output=one)) == [30]


def test_best_k_picks_the_best_dev_bleu(tmp_path: Path) -> None:
    # Step 40 has the best BLEU but no checkpoint (pruned); step 10's record is superseded.
    bleu = {10: 1.0, 20: 9.0, 30: 7.0, 40: 99.0}
    run = make_run(tmp_path / "run", [10, 20, 30], bleu)
    metrics = MetricsLog(run, tensorboard=False)
    metrics.write("valid", 10, {"bleu": 8.0})  # a resumed run re-validated step 10
    metrics.close()
    assert ckpt.averaged_steps(average_run(run, best=1)) == [20]
    assert ckpt.averaged_steps(average_run(run, best=2)) == [10, 20]
    with pytest.raises(MtError, match=rf"best 4 checkpoints but {run} has 3 with a dev BLEU"):
        average_run(run, best=4)


def test_best_k_leaves_out_validations_whose_dev_loss_was_not_finite(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", [10, 20, 30], {10: 1.0, 20: 9.0})
    metrics = MetricsLog(run, tensorboard=False)
    metrics.write("valid", 30, {"loss": math.nan, "bleu": 50.0})  # never a best in training
    metrics.close()
    assert ckpt.averaged_steps(average_run(run, best=2)) == [10, 20]


def test_best_k_follows_the_runs_selected_direction(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", [10, 20, 30])
    metrics = MetricsLog(run, tensorboard=False)
    for step, (de_en, en_de) in {10: (9.0, 1.0), 20: (2.0, 3.0), 30: (1.0, 6.0)}.items():
        record = {"loss": 1.0, "bleu": (de_en + en_de) / 2, "de-en/bleu": de_en}
        metrics.write("valid", step, {**record, "en-de/bleu": en_de})
    metrics.close()
    assert ckpt.averaged_steps(average_run(run, best=1)) == [10]  # the best mean, 5.0
    corpora = "data.corpora=[{src_lang: de, tgt_lang: en}, {src_lang: en, tgt_lang: de}]"
    config = load_config(TINY_CONFIG, [corpora, "data.select_direction=en-de"])
    save_config(config, run / CONFIG_FILE)
    a, b = run / "checkpoints" / "a.safetensors", run / "checkpoints" / "b.safetensors"
    assert ckpt.averaged_steps(average_run(run, best=1, output=a)) == [30]
    assert ckpt.averaged_steps(average_run(run, best=2, output=b)) == [20, 30]


def test_bad_requests_are_one_line_errors(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", [10, 20, 30])
    with pytest.raises(MtError, match=rf"^asked to average 5 checkpoints but {run} has 3$"):
        average_run(run, last=5)
    with pytest.raises(MtError, match="one of --last K or --best K"):
        average_run(run)
    with pytest.raises(MtError, match="one of --last K or --best K"):
        average_run(run, last=1, best=1)
    with pytest.raises(MtError, match="no checkpoints directory"):
        average_run(tmp_path / "nothing", last=1)
    assert not (run / "checkpoints" / AVERAGE_NAME).exists()


def test_an_average_goes_only_where_it_loads_and_overwrites_no_training_file(
    tmp_path: Path,
) -> None:
    run = make_run(tmp_path / "run", [10, 20])
    directory = run / "checkpoints"
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    elsewhere = tmp_path / "avg.safetensors"
    refused = {
        elsewhere: f"{elsewhere}: an average goes in {directory}, where it loads with the "
        "run's config and tokenizer",
        run / "config.yaml": f"{run / 'config.yaml'}: an average goes in {directory}, where it "
        "loads with the run's config and tokenizer",
        directory / "best": f"{directory / 'best'}: an average's file name ends in .safetensors",
        directory / "step-00000010.safetensors": f"{directory / 'step-00000010.safetensors'}: a "
        "checkpoint's or a kept one's name; choose another (e.g. average.safetensors)",
        directory / "damaged-step-00000010.safetensors": f"{directory}/damaged-step-00000010."
        "safetensors: a checkpoint's or a kept one's name; choose another (e.g. "
        "average.safetensors)",
    }
    for output, message in refused.items():
        with pytest.raises(MtError) as error:
            average_run(run, last=2, output=output)
        assert str(error.value) == message
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert not elsewhere.exists()
    relative = Path(os.path.relpath(directory, Path.cwd())) / "mine.safetensors"
    assert ckpt.averaged_steps(average_run(run, last=2, output=relative)) == [10, 20]


def test_inputs_must_agree(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    directory.mkdir()
    a, b, c = directory / "a.safetensors", directory / "b.safetensors", directory / "c.safetensors"
    ckpt.save_weights(a, tiny_model(1), META)
    ckpt.save_weights(b, tiny_model(2), {**META, "tgt_vocab": "25"})
    with pytest.raises(MtError, match="their tgt_vocab differs"):
        average_checkpoints([a, b], tmp_path / "out.safetensors")
    ckpt.save_tensors(c, {"w": torch.zeros(3)}, META)
    with pytest.raises(MtError, match="only one has tensor"):
        average_checkpoints([a, c], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_damaged_or_diverged_inputs_are_refused(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", [10, 20])
    damaged = run / "checkpoints" / "step-00000020.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-4:] = b"\x00\x00\x96\x43"  # the last float becomes 300.0: the digest no longer fits
    damaged.write_bytes(bytes(data))
    with pytest.raises(MtError) as err:
        average_run(run, last=2)
    assert str(err.value) == f"{damaged}: corrupt checkpoint (weights digest mismatch)"
    diverged = tmp_path / "c" / "nan.safetensors"
    diverged.parent.mkdir()
    model = tiny_model(1)
    with torch.no_grad():
        model.encoder[0].ffn.fc1.weight[0, 0] = math.nan
    ckpt.save_weights(diverged, model, META)
    good = run / "checkpoints" / "step-00000010.safetensors"
    with pytest.raises(MtError, match=r"nan.safetensors: tensor .* holds non-finite values"):
        average_checkpoints([good, diverged], tmp_path / "c" / "out.safetensors")
    assert not (run / "checkpoints" / AVERAGE_NAME).exists()
    assert not (tmp_path / "c" / "out.safetensors").exists()


def test_a_run_shipped_without_its_training_states_averages_and_decodes(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", [10, 20, 30], bleu={10: 5.0, 20: 7.0, 30: 6.0})
    for state in (run / "checkpoints").glob("*.state.pt"):
        state.unlink()
    assert ckpt.list_checkpoints(run) == []  # nothing to resume from
    assert ckpt.resolve_checkpoint(run).step == 30  # the latest weights, to decode with
    assert ckpt.averaged_steps(average_run(run, last=2)) == [20, 30]
    assert ckpt.averaged_steps(average_run(run, best=2)) == [20, 30]


def test_a_runs_model_is_its_average_while_the_run_makes_one_and_it_is_current(
    tmp_path: Path,
) -> None:
    run = make_run(tmp_path / "run", [10, 20, 30])
    ckpt.set_best(
        run, ckpt.Checkpoint.from_weights(run / "checkpoints" / "step-00000010.safetensors")
    )
    save_config(load_config(TINY_CONFIG, ["train.average_last=0"]), run / CONFIG_FILE)
    average = ckpt.Checkpoint.from_weights(average_run(run, last=2))
    assert model_checkpoint(run).step == 10  # a run that does not average: its best
    save_config(load_config(TINY_CONFIG, ["train.average_last=2"]), run / CONFIG_FILE)
    assert model_checkpoint(run) == model_checkpoint(run / "checkpoints") == average
    assert model_checkpoint(average.weights) == average
    with pytest.raises(MtError) as error:  # `mt average RUN --last 1` would replace the model
        average_run(run, last=1)
    assert str(error.value) == (
        f"{average.weights}: the run's own average of its last 2 checkpoints, its model; name "
        "another file with --output"
    )
    assert ckpt.averaged_steps(average.weights) == [20, 30]
    assert average_run(run, last=2, replace_own=True) == average.weights  # the run's end
    assert model_checkpoint(run / "checkpoints" / "step-00000020").step == 20  # a name: as named
    ckpt.save_checkpoint(run, 35, tiny_model(35), {"step": 35}, META, resume_point=True)
    assert model_checkpoint(run).step == 10  # trained on past the average: its best again
    with pytest.raises(MtError) as error:  # another average there could pass for the model
        average_run(run, last=1)
    assert str(error.value) == (
        f"{average.weights}: the name of the run's own average of its last 2 checkpoints "
        "(train.average_last), which mt train makes at its end; name another file with --output"
    )
    for step in (10, 20, 30, 35):  # shipped with the average alone
        (run / "checkpoints" / ckpt.step_name(step)).with_suffix(".safetensors").unlink()
    (run / "checkpoints" / "best").unlink()
    assert model_checkpoint(run) == average


def test_low_precision_weights_keep_their_dtype(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    y = torch.tensor([2.0, 2.0, 4.0], dtype=torch.bfloat16)
    ckpt.save_tensors(a, {"w": x}, META)
    ckpt.save_tensors(b, {"w": y}, META)
    out = load_file(average_checkpoints([a, b], tmp_path / "out.safetensors"))
    assert out["w"].dtype == torch.bfloat16
    assert out["w"].tolist() == [1.5, 2.0, 3.5]


def test_cli_average_of_a_trained_run_translates(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    result = CliRunner().invoke(app, ["average", str(run), "--last", "2"])
    assert result.exit_code == 0, result.output
    out = Path(result.stdout.strip())
    assert out == run / "checkpoints" / AVERAGE_NAME
    config, tokenizer, model, loaded = load_trained(out, torch.device("cpu"))
    assert loaded.weights == out and not model.training
    hyps = Translator(tokenizer, model, config.decode, CPU).translate(["Der hund mag den see ."])
    assert len(hyps) == 1 and hyps[0][0].text
