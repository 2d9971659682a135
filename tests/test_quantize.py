"""`--quantize int8`: every matrix product in int8, predictions kept, the options' errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu
import torch
from click.testing import Result
from torch import nn
from typer.testing import CliRunner

from mt.cli import app
from mt.errors import MtError
from mt.quantize import check_quantization, quantize
from mt.rundir import load_trained
from mt.search import Ensemble
from mt.translate import load_models, resolve_runtime
from mt.vocab import BOS_ID, PAD_ID

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny"
CPU = torch.device("cpu")


def pad(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows of ids as one (B, L) tensor, PAD after each."""
    return nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=PAD_ID)


def int8_linears(model: nn.Module) -> int:
    """How many of model's modules are dynamically quantised linear layers."""
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    return sum(isinstance(module, dynamic) for module in model.modules())


def plain_linears(model: nn.Module) -> int:
    """How many of model's modules are fp32 nn.Linear layers."""
    return sum(type(module) is nn.Linear for module in model.modules())


def test_int8_swaps_every_linear_and_the_tied_projection(trained_run: Path) -> None:
    _, _, fp32, _ = load_trained(trained_run, CPU)
    _, _, int8, _ = load_trained(trained_run, CPU)
    linears = plain_linears(fp32)
    # tiny.yaml: 2 encoder layers (4 attention + 2 FFN) and 2 decoder layers (8 + 2).
    assert linears == 2 * 6 + 2 * 10
    assert quantize(int8, "int8") is int8
    assert plain_linears(int8) == 0
    assert int8_linears(int8) == linears + 1  # the output projection as well
    assert int8.output_layer is not None and fp32.output_layer is None
    # The embedding lookups stay fp32 and untouched.
    assert torch.equal(int8.tgt_embed.weight, fp32.tgt_embed.weight)
    assert quantize(fp32, "none") is fp32 and plain_linears(fp32) == linears


def test_int8_keeps_the_models_predictions(trained_run: Path) -> None:
    """Teacher-forced on the dev set, int8 predicts the fp32 model's next piece almost always."""
    _, tokenizer, fp32, _ = load_trained(trained_run, CPU)
    _, _, int8, _ = load_trained(trained_run, CPU)
    quantize(int8, "int8")
    src_lines = (TINY / "valid.de").read_text(encoding="utf-8").splitlines()[:32]
    tgt_lines = (TINY / "valid.en").read_text(encoding="utf-8").splitlines()[:32]
    src = pad([torch.tensor(ids) for ids in tokenizer.encode_src(src_lines)])  # (B, S)
    tgt = pad([torch.tensor([BOS_ID, *ids]) for ids in tokenizer.encode_tgt(tgt_lines)])  # (B, T)
    real = tgt != PAD_ID  # (B, T)
    with torch.no_grad():
        expected, got = fp32(src, tgt).argmax(-1), int8(src, tgt).argmax(-1)  # (B, T)
    agree = (expected == got)[real].float().mean().item()
    assert agree >= 0.95, agree


def test_ensemble_quantizes_each_model(trained_run: Path) -> None:
    _, _, ensemble, _ = load_models([trained_run, trained_run], CPU, quantization="int8")
    assert isinstance(ensemble, Ensemble)
    assert all(model.output_layer is not None for model in ensemble.models)
    assert all(plain_linears(model) == 0 for model in ensemble.models)


def test_int8_runs_in_fp32_on_the_cpu_only() -> None:
    check_quantization("none", torch.device("cuda"), "bf16")  # nothing to check
    check_quantization("int8", CPU, "auto")
    check_quantization("int8", CPU, "fp32")
    with pytest.raises(MtError) as err:
        check_quantization("int8", torch.device("cuda", 0), "auto")
    assert str(err.value) == "--quantize int8 runs on the CPU, not cuda:0: add --device cpu"
    with pytest.raises(MtError) as err:
        check_quantization("int8", CPU, "bf16")
    assert str(err.value) == "--quantize int8 decodes in fp32: drop --precision bf16"
    with pytest.raises(MtError) as err:
        check_quantization("int4", CPU, "auto")
    assert str(err.value) == "--quantize int4: expected one of none, int8"


def test_int8_resolves_auto_precision_to_fp32_without_timing(trained_run: Path) -> None:
    assert resolve_runtime("cpu", "auto", trained_run, "int8") == (CPU, "fp32")


def translate(run: Path, *args: str) -> Result:
    """`mt translate` of the tiny dev set on the CPU, in-process."""
    args = ("translate", str(TINY / "valid.de"), "-m", str(run), "--device", "cpu", *args)
    return CliRunner().invoke(app, args)


def test_translate_int8_matches_fp32_quality(trained_run: Path) -> None:
    refs = (TINY / "valid.en").read_text(encoding="utf-8").splitlines()
    fp32, int8 = (
        translate(trained_run, "--precision", "fp32"),
        translate(trained_run, "--quantize", "int8"),
    )
    assert (fp32.exit_code, int8.exit_code) == (0, 0)
    fp32_lines, int8_lines = fp32.stdout.splitlines(), int8.stdout.splitlines()
    assert len(int8_lines) == len(refs)
    fp32_bleu = sacrebleu.corpus_bleu(fp32_lines, [refs]).score
    int8_bleu = sacrebleu.corpus_bleu(int8_lines, [refs]).score
    assert fp32_bleu > 90 and int8_bleu > fp32_bleu - 5, (fp32_bleu, int8_bleu)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quantize", "int4"], "--quantize int4: expected one of none, int8"),
        (
            ["--quantize", "int8", "--precision", "bf16"],
            "--quantize int8 decodes in fp32: drop --precision bf16",
        ),
    ],
)
def test_translate_quantize_errors(trained_run: Path, args: list[str], message: str) -> None:
    result = translate(trained_run, *args)
    assert isinstance(result.exception, MtError) and result.stdout == ""
    assert str(result.exception) == message


def test_evaluate_scores_the_int8_model(trained_run: Path) -> None:
    result = CliRunner().invoke(
        app, ["evaluate", "--model", str(trained_run), "--device", "cpu", "--quantize", "int8",
              "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bleu"]["score"] > 90
