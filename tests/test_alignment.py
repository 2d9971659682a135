"""Tests for mt.alignment and `mt attention`: weights that reproduce SDPA, and the heatmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mt.alignment import Alignment, align, attention_weights
from mt.cli import app
from mt.errors import MtError
from mt.plot import DPI, heatmap_inches
from mt.rundir import load_trained

SENTENCE = "der Hund läuft schnell ."  # in the tiny corpus's vocabulary


def test_weights_reproduce_the_attention_output(trained_run: Path) -> None:
    config, tokenizer, model, _ = load_trained(trained_run, torch.device("cpu"))
    found = align(model, tokenizer, SENTENCE, config.decode)
    S = len(tokenizer.encode_src([SENTENCE])[0]) + 1  # + EOS
    T = len(found.target_pieces)
    assert found.weights.shape == (2, 2, T, S)  # layers, heads, targets, sources
    assert found.source_pieces[-1] == found.target_pieces[-1] == "</s>"
    assert torch.allclose(found.weights.sum(-1), torch.ones(2, 2, T), atol=1e-5)
    # The recomputed weights, applied to the values, give the layer's SDPA output exactly.
    seen = {}
    attn = model.decoder[1].cross_attn
    hook = attn.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(args=args, kwargs=kwargs, out=out),
        with_kwargs=True,
    )
    ids = tokenizer.encode_tgt([found.translation])[0]
    with torch.no_grad():
        model(torch.tensor([[*tokenizer.encode_src([SENTENCE])[0], 3]]), torch.tensor([[2, *ids]]))
        hook.remove()
        x, k, v = seen["args"]
        w = attention_weights(attn, x, k, seen["kwargs"]["mask"])
        mixed = (w @ v).transpose(1, 2).reshape(x.shape)  # (B, T, D)
        assert torch.allclose(attn.out_proj(mixed), seen["out"], atol=1e-5)


@pytest.mark.slow
def test_attention_command_writes_a_heatmap_sized_by_tokens(
    trained_run: Path, tmp_path: Path
) -> None:
    config, tokenizer, model, _ = load_trained(trained_run, torch.device("cpu"))
    found = align(model, tokenizer, SENTENCE, config.decode)
    S, T = len(found.source_pieces), len(found.target_pieces)
    runner = CliRunner()
    for layer, panels in ((0, 2), (2, 1)):
        out = tmp_path / f"layer{layer}.png"
        args = ["attention", str(trained_run), SENTENCE, "-o", str(out), "--layer", str(layer)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert result.output.splitlines() == [found.translation, str(out)]
        width, height = heatmap_inches(S, T, panels)
        assert Image.open(out).size == (round(width * DPI), round(height * DPI))
    result = runner.invoke(app, ["attention", str(trained_run), SENTENCE, "--layer", "3"])
    assert isinstance(result.exception, MtError)
    assert str(result.exception) == "--layer 3: the model has 2 decoder layers"
    for sentence, message in [
        ("", "the sentence is empty: nothing to translate"),
        ("  \t ", "the sentence is empty: nothing to translate"),
        ("Der \udcff hund", "the sentence is not valid UTF-8"),  # argv byte 0xff, as Python has it
    ]:
        out = tmp_path / "refused.png"
        result = runner.invoke(app, ["attention", str(trained_run), sentence, "-o", str(out)])
        assert str(result.exception) == message
        assert not out.exists()


def test_heatmap_labels_must_match_the_weights(tmp_path: Path) -> None:
    from mt.plot import plot_attention

    with pytest.raises(ValueError, match="weights of 2 x 3 for 2 x 2 labels"):
        plot_attention(np.zeros((1, 2, 3)), ["a", "b"], ["x", "y"], ["t"], tmp_path / "a.png")


def test_a_heatmap_too_large_to_draw_is_refused_in_one_line(tmp_path: Path) -> None:
    from mt.plot import plot_attention

    # Six decoder layers of a 400-piece sentence: 73,380 pixels across; matplotlib raised.
    out = tmp_path / "a.png"
    weights = np.zeros((6, 3, 400))
    with pytest.raises(MtError) as err:
        plot_attention(weights, ["s"] * 400, ["t"] * 3, ["layer"] * 6, out)
    assert str(err.value) == (
        "6 heatmaps of 3 x 400 pieces would be 73,200 x 350 pixels, over the 65,535 a side a "
        "PNG can be drawn at (one layer's with --layer is smaller)"
    )
    assert not out.exists()
    plot_attention(weights[:1], ["s"] * 400, ["t"] * 3, ["layer"], out)  # one panel fits
    assert Image.open(out).size == (12200, 350)


@pytest.mark.slow  # conftest's multilingual run
def test_attention_of_a_multilingual_model_hides_its_tag_unless_asked(
    multi_run: Path, tmp_path: Path
) -> None:
    config, tokenizer, model, _ = load_trained(multi_run, torch.device("cpu"))
    shown = align(model, tokenizer, SENTENCE, config.decode, "fr", show_tag=True)
    found = align(model, tokenizer, SENTENCE, config.decode, "fr")
    assert shown.source_pieces[0] == ">>fr<<" and found.source_pieces == shown.source_pieces[1:]
    assert torch.equal(found.weights, shown.weights[..., 1:])
    T = len(shown.target_pieces)
    assert torch.allclose(shown.weights.sum(-1), torch.ones(2, 2, T), atol=1e-5)
    assert found.translation == shown.translation != align(
        model, tokenizer, SENTENCE, config.decode, "en"
    ).translation  # fmt: skip
    runner = CliRunner()
    for flags, source in (([], found.source_pieces), (["--show-tag"], shown.source_pieces)):
        out = tmp_path / f"{len(flags)}.png"
        args = ["attention", str(multi_run), SENTENCE, "-o", str(out), "--tgt-lang", "fr"]
        result = runner.invoke(app, [*args, "--layer", "1", *flags])
        assert result.exit_code == 0, result.output
        assert result.output.splitlines() == [found.translation, str(out)]
        width, height = heatmap_inches(len(source), T, 1)
        assert Image.open(out).size == (round(width * DPI), round(height * DPI))
    missing = runner.invoke(app, ["attention", str(multi_run), SENTENCE])
    assert (
        str(missing.exception) == "the model translates into en, de, fr: choose one with --tgt-lang"
    )


def test_a_short_sentence_still_gets_a_panel_wide_enough_for_its_title() -> None:
    assert heatmap_inches(2, 3, 1)[0] == 4.5  # 2.0 + 2 x 0.3 would cut the title
    assert heatmap_inches(20, 3, 2)[0] == 2 * (2.0 + 20 * 0.3)


def test_heads_averaged_keeps_the_layers_and_averages_the_heads() -> None:
    weights = torch.rand(2, 4, 3, 5).softmax(dim=-1)  # (layers, heads, T, S)
    found = Alignment(["a", "b", "c", "d", "</s>"], ["x", "y", "</s>"], weights, "x y")
    averaged = found.heads_averaged()
    assert averaged.weights.shape == (2, 1, 3, 5)
    torch.testing.assert_close(averaged.weights[:, 0], weights.mean(dim=1))
    torch.testing.assert_close(averaged.weights.sum(dim=-1), torch.ones(2, 1, 3))
    assert (averaged.source_pieces, averaged.target_pieces) == (
        found.source_pieces,
        found.target_pieces,
    )
