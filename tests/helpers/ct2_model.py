"""A reader of CTranslate2's model.bin, to check what an export stored (CTranslate2 has none)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

# The DataType enum of CTranslate2's include/ctranslate2/types.h, in order.
DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, None)  # None: bfloat16


def _unpack(file: BinaryIO, fmt: str) -> int:
    return struct.unpack(fmt, file.read(struct.calcsize(fmt)))[0]


def _string(file: BinaryIO) -> str:
    size = _unpack(file, "H")
    return file.read(size)[:-1].decode("utf-8")  # NUL-terminated


def read_ct2_model(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The variables of a model.bin (binary version 6) by name, and its aliases' targets."""
    with path.open("rb") as file:
        version = _unpack(file, "I")
        assert version == 6, f"{path}: model.bin version {version}, this reader knows 6"
        _string(file), _unpack(file, "I")  # spec name, revision
        variables, aliases = {}, {}
        for _ in range(_unpack(file, "I")):
            name = _string(file)
            shape = [_unpack(file, "I") for _ in range(_unpack(file, "B"))]
            dtype = DTYPES[_unpack(file, "B")]
            data = file.read(_unpack(file, "I"))
            assert dtype is not None, f"{path}: {name} is bfloat16"
            variables[name] = np.frombuffer(data, dtype=dtype).reshape(shape)
        for _ in range(_unpack(file, "I")):
            alias = _string(file)
            aliases[alias] = _string(file)
    return variables, aliases
