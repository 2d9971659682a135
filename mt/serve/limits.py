"""The limits of `mt serve`: what one request may ask and how much work the server holds.

Plain settings without imports beyond the standard library, so that the CLI can show their
defaults without loading the web stack.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from mt.errors import MtError

MAX_BATCH_WAIT_MS = 3_600_000  # an hour; more is a mistake (inf overflowed the worker's clock)


@dataclass(frozen=True)
class Limits:
    """Each field is a `mt serve` option of the same name (--max-request-bytes, ...)."""

    max_request_bytes: int = 65_536  # a larger request body is refused (413)
    max_sentences: int = 64  # sentences in one request
    max_beam: int = 16  # the largest beam (and n-best) a request may ask for
    max_constraints: int = 16  # phrases one sentence may be constrained to contain
    # Cross-attention weights one request may ask for (decoder layers x output limit x source
    # pieces, summed over its sentences): each becomes a JSON number in the answer.
    max_attention_weights: int = 2_000_000
    max_queue: int = 512  # sentences waiting for the model; beyond it, 503 with Retry-After
    batch_wait_ms: float = 20.0  # how long the worker gathers requests before it decodes
    max_tokens: int | None = None  # source tokens per decoding batch (None: the run's decode)

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "batch_wait_ms" and not 0 <= value <= MAX_BATCH_WAIT_MS:
                raise MtError(f"--batch-wait-ms {value}: must be in [0, {MAX_BATCH_WAIT_MS:,}]")
            if field.name != "batch_wait_ms" and value is not None and value < 1:
                raise MtError(f"--{option(field.name)} {value}: must be >= 1")
        if self.max_sentences > self.max_queue:
            raise MtError(
                f"--max-sentences {self.max_sentences} exceeds --max-queue {self.max_queue}: "
                "such a request could never be queued"
            )


def option(name: str) -> str:
    """The command-line option of a Limits field, e.g. max_queue -> max-queue."""
    return name.replace("_", "-")
