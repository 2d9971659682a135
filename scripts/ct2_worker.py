"""CTranslate2's own search in a process without torch: bench_ct2.py's "own process" rows.

    python scripts/ct2_worker.py '[directory, threads, beam, batch, length, most, workers]'

One JSON line of source pieces in per call, one JSON line of output pieces out. Nothing here
imports torch: loaded first, torch's OpenMP runtime would serve CTranslate2's calls too (as it
does in bench_ct2.py's own process), and glibc's malloc keeps its defaults, as CTranslate2's
users run it.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def ct2_translator(directory: str, threads: int, weights: str = "float32", workers: int = 1) -> Any:
    """A CTranslate2 Translator for the export in `directory` on `threads` threads in all.

    workers > 1: that many batches decoded at once (inter_threads), the threads shared out.
    """
    import ctranslate2  # here, so that importing this file needs no CTranslate2

    return ctranslate2.Translator(
        directory,
        device="cpu",
        compute_type=weights,
        inter_threads=workers,
        intra_threads=max(1, threads // workers),
    )


def own_search(
    translator: Any,
    sources: list[list[str]],
    beam: int,
    batch: int,
    length: int = 0,
    most: int = 256,
) -> list[list[str]]:
    """CTranslate2's own search over source pieces, given only the beam size and batching.

    `length` > 0: every output holds exactly that many pieces (its min and max decoding length);
    else at most `most` (CTranslate2's default, lower only for a model with fewer positions).
    """
    exact = {"min_decoding_length": length} if length else {}
    exact["max_decoding_length"] = length or most
    results = translator.translate_batch(
        sources, beam_size=beam, max_batch_size=batch, batch_type="tokens", **exact
    )
    return [r.hypotheses[0] for r in results]


def main() -> None:
    """Serve `own_search` calls on stdin until it closes."""
    directory, threads, beam, batch, length, most, workers = json.loads(sys.argv[1])
    translator = ct2_translator(directory, threads, workers=workers)
    for line in sys.stdin:
        found = own_search(translator, json.loads(line), beam, batch, length, most)
        print(json.dumps(found), flush=True)


if __name__ == "__main__":
    main()
