#!/usr/bin/env bash
# The README's main job: fetch Multi30k, train German->English for a few minutes on this machine,
# translate the test set and print its BLEU (with the sacreBLEU signature) and a few samples.
#   MINUTES=10 scripts/demo.sh            # train longer
#   MT_DATA_MIRROR=DIR scripts/demo.sh    # fetch from a mirror (a directory or a URL)
set -euo pipefail
cd "$(dirname "$0")/.."
MT=${MT:-.venv/bin/mt}
RUN=${RUN:-runs/demo}
MINUTES=${MINUTES:-5}

"$MT" data fetch multi30k data/multi30k --langs de,en
# A short run needs a short warm-up; the rest is configs/multi30k.yaml.
"$MT" train --config configs/multi30k.yaml run_dir="$RUN" train.max_minutes="$MINUTES" \
    train.warmup_steps=200 train.lr=2e-3 train.valid_every=100 train.log_every=25 "$@"
echo "== test_2016_flickr, German -> English =="
"$MT" evaluate --model "$RUN"
echo "== samples =="
gzip -dc data/multi30k/test_2016_flickr.de.gz | sed -n '1,5p' > "$RUN/samples.de"
"$MT" translate "$RUN/samples.de" --model "$RUN" > "$RUN/samples.en"
paste -d '\n' "$RUN/samples.de" "$RUN/samples.en" | sed 'n;s/^/  -> /'
