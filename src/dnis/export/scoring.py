"""Score a CSV/TSV/Parquet file in batches and write the scores (CSV/TSV/Parquet) atomically.

The output has one row per input row, in the input's order: the kept columns, then `score`
(see `Predictor.predict`). Kept by default are the input's *id columns*: the schema's user and
item columns when it names them, and every column called ``id`` or ending in ``_id`` / ``Id``
(``row_id``, ``userId``); `keep` names them explicitly instead (an empty list keeps none).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dnis.data.readers import read_csv, read_parquet
from dnis.errors import DataError, DnisError
from dnis.export.predictor import Predictor
from dnis.io import atomic_write

SCORE = "score"
READERS = {".csv": ",", ".tsv": "\t", ".txt": ","}
PARQUET = (".parquet", ".pq")
_CAMEL_ID = re.compile(r"[a-z0-9]Id$")


@dataclass
class ScoredFile:
    output: Path
    rows: int
    columns: list[str]


def read_table(path: Path, encoding: str = "utf-8") -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix in PARQUET:
        return read_parquet(path)
    if suffix in READERS:
        return read_csv(path, delimiter=READERS[suffix], encoding=encoding)
    raise DataError(
        f"unknown input format {suffix or '(no extension)'!r}",
        path=path,
        fix="give a .csv, .tsv or .parquet file",
    )


def writer_for(path: Path) -> Callable[[pd.DataFrame], bytes]:
    suffix = path.suffix.lower()
    if suffix in PARQUET:
        import io

        def parquet(frame: pd.DataFrame) -> bytes:
            buffer = io.BytesIO()
            frame.to_parquet(buffer, index=False)
            return buffer.getvalue()

        return parquet
    if suffix in READERS:
        sep = READERS[suffix]
        return lambda frame: frame.to_csv(index=False, sep=sep).encode("utf-8")
    raise DnisError(
        f"{path}: unknown output format {suffix or '(no extension)'!r}; name the output .csv, "
        ".tsv or .parquet"
    )


def id_columns(frame: pd.DataFrame, predictor: Predictor) -> list[str]:
    schema = predictor.encoder.schema
    roles = [schema[name].source for name in (schema.user, schema.item) if name is not None]
    named = [
        c for c in frame.columns
        if isinstance(c, str) and (c.lower() == "id" or c.lower().endswith("_id") or _CAMEL_ID.search(c))
    ]  # fmt: skip
    return [c for c in frame.columns if (c in roles or c in named) and c != SCORE]


def predict_file(
    predictor: Predictor,
    input: str | Path,
    output: str | Path,
    *,
    batch_size: int = 8192,
    keep: Sequence[str] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    encoding: str | None = None,
) -> ScoredFile:
    """Score every row of `input` into `output`; `on_batch(rows done, rows total)` after each batch.

    A CSV/TSV input is read with `encoding`, by default the training files' (`predictor.encoding`).
    """
    input, output = Path(input), Path(output)
    if batch_size < 1:
        raise DnisError(f"--batch-size must be >= 1, got {batch_size}")
    write = writer_for(output)  # a bad output name fails before any work
    if output.resolve() == input.resolve():
        raise DnisError(f"{output} is the input file; write the scores to another file")
    frame = read_table(input, encoding or predictor.encoding)
    predictor.check_columns(frame, path=input)
    if keep is None:
        kept = id_columns(frame, predictor)
    else:
        missing = [c for c in keep if c not in frame.columns]
        if missing:
            raise DataError(
                f"--keep names column(s) {missing} the input lacks; it has {list(frame.columns)}",
                path=input,
                column=missing[0],
                fix="name columns of the input file, or leave --keep out",
            )
        if SCORE in keep:
            raise DnisError(f"--keep {SCORE!r}: the output's {SCORE!r} column holds the new scores")
        kept = list(dict.fromkeys(keep))
    total = len(frame)
    scores = np.empty(total, dtype=np.float32)
    for start in range(0, total, batch_size):
        batch = frame.iloc[start : start + batch_size]
        scores[start : start + len(batch)] = predictor.to_score(
            predictor.score_ids(predictor.encode(batch))
        )
        if on_batch is not None:
            on_batch(start + len(batch), total)
    result = frame[kept].reset_index(drop=True).copy()
    result[SCORE] = scores
    data = write(result)
    atomic_write(output, lambda handle: handle.write(data))
    return ScoredFile(output, total, list(result.columns))
