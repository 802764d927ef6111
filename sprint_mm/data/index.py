"""Index files that list a dataset's items: JSONL (one object per line) or CSV (a header naming the columns).

The reader checks the file's format only; each dataset checks the fields it needs and resolves the paths.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

INDEX_FORMATS = (".jsonl", ".csv")


class IndexRow(NamedTuple):
    """One item: a JSON object, or a CSV row keyed by the header (None in the cells a short row lacks)."""

    fields: dict[str, Any]
    line: int  # 1-based line number in the index file


class MissingColumn(KeyError, ValueError):
    """A CSV header without a required column: a missing key (KeyError) in a malformed file (ValueError)."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError's own str would quote the message


def read_index(index: str | Path, columns: tuple[str, ...], items: str = "items") -> list[IndexRow]:
    """The rows of a `.jsonl` or `.csv` index (suffix in any case), blank JSONL lines skipped.

    A CSV header must name every one of `columns`; `items` names what the index lists, for the error an index
    without rows raises.
    """
    index = Path(index)
    if not index.is_file():
        raise FileNotFoundError(f"index file {str(index)!r} does not exist")
    suffix = index.suffix.lower()
    if suffix not in INDEX_FORMATS:
        raise ValueError(
            f"index {str(index)!r} has an unknown format: use a .jsonl file (one object per line) or a .csv file "
            f"(header {','.join(columns)})"
        )
    is_csv = suffix == ".csv"
    with open(index, newline="" if is_csv else None, encoding="utf-8") as file:
        rows = list(_csv_rows(file, str(index), columns) if is_csv else jsonl_rows(file, str(index), columns))
    if not rows:
        raise ValueError(f"index {str(index)!r} lists no {items}")
    return rows


def jsonl_rows(lines: Iterable[str], source: str, columns: tuple[str, ...]) -> Iterator[IndexRow]:
    """The objects of JSONL `lines`, blank lines skipped; `source` names the file and `columns` the keys in errors."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}: line {number} is not JSON ({error})") from None
        if not isinstance(fields, dict):
            raise ValueError(
                f"{source}: line {number} must hold a JSON object with keys {', '.join(columns)}, got {line.strip()!r}"
            )
        yield IndexRow(fields, number)


def _csv_rows(lines: Iterable[str], source: str, columns: tuple[str, ...]) -> Iterator[IndexRow]:
    """The rows of a CSV file (the csv module: quoted cells may hold commas, quotes and line breaks). A row with more
    or fewer cells than the header is refused at its line: an unquoted comma in a caption would otherwise cut it."""
    reader = csv.DictReader(lines)
    missing = [column for column in columns if column not in (reader.fieldnames or [])]
    if missing:
        raise MissingColumn(
            f"index {source!r} has the CSV header {reader.fieldnames}, which lacks column {missing[0]!r} "
            f"(it must name {','.join(columns)})"
        )
    header = len(reader.fieldnames)
    for row in reader:
        cells = header + len(row.get(None, ())) - sum(value is None for key, value in row.items() if key is not None)
        if cells != header:
            raise ValueError(f"{source}:{reader.line_num} has {cells} cells but the header names {header} columns "
                             f"({','.join(reader.fieldnames)}): quote a cell that holds a comma, e.g. "
                             '"a photo, with a comma"')
        yield IndexRow(row, reader.line_num)
