"""BLEU's tokenizer for a target language, as `sacrebleu -l xx-LANG` picks it.

sacreBLEU's default, 13a, splits at spaces and punctuation only: unsegmented Chinese would be one
word a clause, and BLEU near 0 whatever the translation. Validation, reports and `mt evaluate`
all take the tokenizer from here.
"""

from __future__ import annotations

import functools
import logging
import re

from sacrebleu.metrics import BLEU

log = logging.getLogger("mt")

LANGUAGE_TOKENIZERS = {"zh": "zh", "ja": "ja-mecab", "ko": "ko-mecab"}  # 13a for the rest
DEFAULT_TOKENIZER = "13a"


def bleu_tokenizer(tgt_lang: str | None) -> str:
    """The BLEU tokenizer for text in `tgt_lang` (e.g. zh, zh-Hans, ja_JP): see
    LANGUAGE_TOKENIZERS. Without MeCab (`pip install "sacrebleu[ja]"`, `[ko]`), char, with a
    warning: a run must not fail at its first validation for want of it."""
    name = LANGUAGE_TOKENIZERS.get(re.split(r"[-_]", tgt_lang or "")[0].lower(), DEFAULT_TOKENIZER)
    return name if available(name) else "char"


@functools.cache
def missing_extra(name: str) -> str | None:
    """Why sacreBLEU cannot make tokenizer `name` here (MeCab's need extras), or None."""
    try:
        BLEU(tokenize=name)
    except RuntimeError as error:
        return " ".join(str(error).split())
    except OSError as error:  # flores101, flores200 and spm fetch a SentencePiece model once
        return f"sacreBLEU could not fetch what it needs ({' '.join(str(error).split())})"
    return None


@functools.cache
def available(name: str) -> bool:
    """Whether sacreBLEU can make tokenizer `name` here; warns once if not."""
    if missing_extra(name) is None:
        return True
    log.warning(
        f'warning: BLEU\'s {name} tokenizer needs MeCab (pip install "sacrebleu[{name[:2]}]"):'
        " scoring with char instead (see the signature)"
    )
    return False
