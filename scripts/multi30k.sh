#!/usr/bin/env bash
# Multi30k (task 1, test_2016_flickr) end to end, both directions, as in docs/benchmarks.md:
# fetch, tokenizer + train (58 minutes each on a 2-core CPU), translate the test set with the
# run's model (its best checkpoint; its average where train.average_last is set), score it
# (cased and lowercased BLEU, chrF, TER, with signatures).
#   scripts/multi30k.sh                     # de-en, then en-de
#   DIRECTIONS=de-en scripts/multi30k.sh    # one direction
#   scripts/multi30k.sh train.max_minutes=5 # any override is passed to mt train
#   MT_DATA_MIRROR=DIR scripts/multi30k.sh  # fetch from a mirror (a directory or a URL)
#   DATA=DIR scripts/multi30k.sh            # use Multi30k-named files already in DIR, no fetch
# Each run directory ends with report.md, curves.png and test.hyp.<lang>.
set -euo pipefail
cd "$(dirname "$0")/.."
MT=${MT:-.venv/bin/mt}
DIRECTIONS=${DIRECTIONS:-de-en en-de}
if [ -z "${DATA:-}" ]; then
    DATA=data/multi30k
    "$MT" data fetch multi30k "$DATA" --langs de,en >/dev/null
fi
for direction in $DIRECTIONS; do
    src=${direction%-*}
    tgt=${direction#*-}
    case $direction in
        de-en) config=configs/multi30k.yaml ;;
        en-de) config=configs/multi30k-en-de.yaml ;;
        *) echo "multi30k.sh: unknown direction $direction (de-en or en-de)" >&2; exit 2 ;;
    esac
    run=${RUN_PREFIX:-runs/multi30k}-$direction
    echo "== $direction: training into $run =="
    "$MT" train --config "$config" run_dir="$run" data.train="$DATA/train" \
        data.valid="$DATA/val" data.test="$DATA/test_2016_flickr" "$@"
    model=$run  # the run's model: its best checkpoint, or its average where train.average_last
    gzip -dc "$DATA/test_2016_flickr.$src.gz" > "$run/test.$src"
    gzip -dc "$DATA/test_2016_flickr.$tgt.gz" > "$run/test.$tgt"
    "$MT" translate "$run/test.$src" --model "$model" --output "$run/test.out.$tgt"
    echo "== $direction: test_2016_flickr, $(wc -l < "$run/test.$src") sentences, $model =="
    "$MT" evaluate --hyp "$run/test.out.$tgt" --ref "$run/test.$tgt"
    "$MT" evaluate --hyp "$run/test.out.$tgt" --ref "$run/test.$tgt" --lowercase | head -1
done
