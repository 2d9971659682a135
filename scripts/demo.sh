#!/usr/bin/env bash
# The README's main job: fetch Multi30k, train German->English for a few minutes on this machine
# (configs/demo.yaml, a model sized for minutes), translate the test set and print its BLEU (with
# the sacreBLEU signature) and a few samples.
#   MINUTES=10 scripts/demo.sh            # train longer (default 5)
#   MT_DATA_MIRROR=DIR scripts/demo.sh    # fetch from a mirror (a directory or a URL)
set -euo pipefail
cd "$(dirname "$0")/.."
MT=${MT:-.venv/bin/mt}
RUN=${RUN:-runs/demo}
MINUTES=${MINUTES:-5}

"$MT" data fetch multi30k data/multi30k --langs de,en
"$MT" train --config configs/demo.yaml run_dir="$RUN" train.max_minutes="$MINUTES" "$@"
echo "== test_2016_flickr, German -> English =="
# Training's report translated the test set already (RUN/test.hyp.en): score that, once, if it
# is of this model (newer than the training records; not of a run trained on since).
if [ "$RUN/test.hyp.en" -nt "$RUN/metrics.jsonl" ]; then
    "$MT" evaluate --hyp "$RUN/test.hyp.en" --ref data/multi30k/test_2016_flickr.en.gz
else  # train.report=false
    "$MT" evaluate --model "$RUN"
fi
echo "== samples =="
gzip -dc data/multi30k/test_2016_flickr.de.gz | sed -n '1,5p' > "$RUN/samples.de"
"$MT" translate "$RUN/samples.de" --model "$RUN" > "$RUN/samples.en"
paste -d '\n' "$RUN/samples.de" "$RUN/samples.en" | sed 'n;s/^/  -> /'
updates=$(grep -o '"step": [0-9]*' "$RUN/metrics.jsonl" | tail -1 | cut -d' ' -f2)
unit=minutes
[ "$MINUTES" = 1 ] && unit=minute
echo "== $updates updates in $MINUTES $unit of training (configs/demo.yaml; MINUTES=10 for more)."
echo "   The one-hour recipe (make train, configs/multi30k.yaml) and its scores on several CPUs:"
echo "   docs/benchmarks.md, \"Multi30k\". =="
