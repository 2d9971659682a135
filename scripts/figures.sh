#!/usr/bin/env bash
# The figures of docs/transformer.md, from a trained Multi30k de-en run (`make multi30k`):
#   docs/figures/curves.png     train loss, dev loss and dev BLEU vs steps and wall-clock (mt plot)
#   docs/figures/attention.png  decoder cross-attention over one test sentence (mt attention)
# Usage: scripts/figures.sh [RUN]     RUN defaults to runs/multi30k-de-en
#   MT=path/to/mt     the mt command (default .venv/bin/mt)
#   FIGURES=DIR       where to write the PNGs (default docs/figures)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MT=${MT:-$ROOT/.venv/bin/mt}
RUN=${1:-$ROOT/runs/multi30k-de-en}
FIGURES=${FIGURES:-$ROOT/docs/figures}
# Line 1 of the Multi30k 2016 Flickr test set, test_2016_flickr.de.gz: a verb-final relative clause.
SENTENCE="Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt."
mkdir -p "$FIGURES"
"$MT" plot "$RUN" --output "$FIGURES/curves.png"
MODEL=$RUN/checkpoints/average.safetensors  # the run's result when it averaged checkpoints
[ -f "$MODEL" ] || MODEL=$RUN
"$MT" attention "$MODEL" "$SENTENCE" --output "$FIGURES/attention.png"
