"""scripts/bench.py: the Marian twin of an mt model, the docs section writer, a smoke run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.benchmarks import load_bench, written_file

from mt.config import ModelConfig
from mt.model import Transformer

ROOT = Path(__file__).resolve().parents[1]
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(
    not HAS_TRANSFORMERS, reason="transformers is not installed (pip install -e '.[bench]')"
)


@needs_transformers
@pytest.mark.slow  # a second or more: the full suite runs it
def test_marian_twin_computes_the_same_function() -> None:
    bench = load_bench()
    torch.manual_seed(0)
    shape = ModelConfig(
        dim=16, enc_layers=2, dec_layers=2, heads=2, ffn_dim=32, prenorm=False, max_positions=64
    )
    model = Transformer(shape, 50, 50).eval()
    hf = bench.marian_from_mt(model).eval()
    src = torch.tensor([[5, 6, 7, 3], [8, 9, 3, 0]])
    tgt_in = torch.tensor([[2, 10, 11, 12], [2, 13, 0, 0]])
    with torch.no_grad():
        ours, theirs = model(src, tgt_in), bench.hf_logits(hf, src, tgt_in)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not hf.model.encoder.layers[0].self_attn.k_proj.bias.requires_grad


@needs_transformers
def test_marian_twin_refuses_a_prenorm_model() -> None:
    bench = load_bench()
    model = Transformer(ModelConfig(dim=8, enc_layers=1, dec_layers=1, heads=2, ffn_dim=16), 20, 20)
    with pytest.raises(ValueError, match="post-norm"):
        bench.marian_from_mt(model)


def test_write_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    bench = load_bench()
    end = bench.END_MARK + "\n"
    path = tmp_path / "benchmarks.md"
    path.write_text(
        f"# Benchmarks\n\n## Decoding\n\nkeep me\n\n{bench.SECTION}\n\nold numbers\n\n"
        "## Later\n\nkeep me too\n"
    )
    bench.write_section(path, f"{bench.SECTION}\n\nnew numbers\n")
    text = path.read_text()
    assert "old numbers" not in text and text.count(bench.SECTION) == 1
    assert (
        text.index("keep me\n")
        < text.index("new numbers")
        < text.index(end)
        < text.index("## Later")
    )
    assert text.endswith("keep me too\n")
    fresh = tmp_path / "new.md"
    bench.write_section(fresh, f"{bench.SECTION}\n\nx\n")
    assert fresh.read_text() == f"# Benchmarks\n\n{bench.SECTION}\n\nx\n{end}"
    # A subsection ends at the next heading of its level: its sibling stays.
    path.write_text("## A\n\n### One\n\nold\n\n#### Detail\n\nold too\n\n### Two\n\nkeep\n")
    bench.write_section(path, "### One\n\nnew\n", heading="### One")
    assert path.read_text() == f"## A\n\n### One\n\nnew\n{end}\n### Two\n\nkeep\n"


def test_write_section_keeps_what_was_added_after_its_end(tmp_path: Path) -> None:
    bench = load_bench()
    end = bench.END_MARK + "\n"
    path = tmp_path / "benchmarks.md"
    added = "### The same on another CPU (by hand)\n\nkept\n"
    code = "```bash\n# a comment, not a heading\nmake bench\n```\n"
    path.write_text(f"# B\n\n{bench.SECTION}\n\n{code}\nold\n{end}\n{added}\n## Next\n\nx\n")
    bench.write_section(path, f"{bench.SECTION}\n\n{code}\nnew\n")
    assert (
        path.read_text() == f"# B\n\n{bench.SECTION}\n\n{code}\nnew\n{end}\n{added}\n## Next\n\nx\n"
    )


@pytest.mark.slow
@needs_transformers
def test_smoke_run_prints_and_writes_the_tables(multi30k: Path, tmp_path: Path) -> None:
    out_md = tmp_path / "benchmarks.md"
    args = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--smoke", "--threads", "1",
            "--data", str(multi30k), "--workdir", str(tmp_path / "work"),
            "--write", str(out_md)]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("## Speed: mt vs Hugging Face Marian\n")
    assert out_md.read_text() == written_file(out)
    assert "greedy outputs identical on 10 of 10" in " ".join(out.split())  # prose is wrapped
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| fp32 |")]
    systems = [row[2].strip() for row in rows]
    expected = ["mt", "HF Marian", "HF Marian, mt's malloc setting"]
    expected += ["**mt / HF**", "**mt / HF (same malloc)**"]
    assert systems == expected * 2  # training, then decoding
    assert float(rows[0][3].replace(",", "")) > 0  # mt's target tokens/s
    assert "| `aten::" in out  # the profile of mt's step
