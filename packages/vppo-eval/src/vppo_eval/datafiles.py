"""Local data files and folders into `datasets`, with errors that name the file, the line and the fix.

Used by evaluation (`benchmarks.load_benchmark`) and by the training recipes (`vppo_recipes.data.load_source`), so
both read a file the same way and fail the same way:

- a file: ``.parquet``, ``.jsonl`` / ``.json``, ``.csv``, ``.arrow``. An empty file, a line that is not JSON, bytes
  that are not UTF-8 or a damaged parquet file raise ``ValueError`` naming the file (and the line), not the bare
  ``StopIteration`` / "position 47" / ``ArrowInvalid`` that ``datasets`` gives;
- a JSON file holding one object keyed by item id (``{"1": {...}, "2": {...}}``, how LogicVista's and DynaMath's
  GitHub releases ship) is read as one row per key, the key in an ``id`` column (unless the item has its own);
- a folder: a hub snapshot (it has a ``README.md`` dataset card, which may define configs and splits) is read by
  ``datasets``' own inference; any other folder is read as the data files it holds (split names taken from the file
  names as ``datasets`` does), ignoring other files. ``datasets`` alone would read a folder with one ``.jsonl`` and
  an ``imgs/`` folder of PNGs as an image folder, with only an ``image`` column.

Rows are read as written (`iter_rows`, `row_decoder`): both readers take rows through the Arrow format (image cells
stay ``{"bytes", "path"}`` for our decoder to count bad ones), which skips the decoding ``datasets`` applies to its
``Json`` feature: a JSON field that mixes numbers and text (one ``"answer": 3`` among strings), or a sharegpt
``content`` that is text in one turn and a list of parts in another, is stored as JSON text, and every string would
come back quoted (``'"red"'``). `row_decoder` undoes that for every ``Json`` feature, at any depth.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["FILE_BUILDERS", "decode_json_cells", "iter_rows", "load_data_file", "load_data_folder", "row_decoder"]

# suffix -> `datasets` builder
FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}


def _first_bad_json_line(path: Path) -> str | None:
    """Where a JSON Lines file stops being JSON Lines: "line N: <why>: <start of the line>", or None."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {number} is not UTF-8 ({err}); re-encode the file as UTF-8 (e.g. iconv -t utf-8)"
            if not text.strip():
                continue
            try:
                value = json.loads(text.strip())
            except json.JSONDecodeError as err:
                return f"line {number}, column {err.colno}: {err.msg}: {text.strip()[:80]!r}"
            if not isinstance(value, dict):
                return f"line {number} is a JSON {type(value).__name__}, not an object with one field per column"
    return None


def _diagnose(path: Path, builder: str, err: Exception) -> str:
    """The most specific reason `datasets` could not read `path`."""
    if builder == "json":
        if path.suffix.lower() == ".jsonl" or _looks_like_json_lines(path):
            where = _first_bad_json_line(path)
            if where is not None:
                return where
        else:
            try:
                json.loads(path.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as bad:
                return f"not UTF-8 ({bad}); re-encode the file as UTF-8"
            except json.JSONDecodeError as bad:
                return f"not valid JSON at line {bad.lineno}, column {bad.colno}: {bad.msg}"
    if builder == "parquet":
        return f"not a readable parquet file (truncated or damaged?): {type(err).__name__}: {err}"
    return f"{type(err).__name__}: {err}"


def _looks_like_json_lines(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(1).strip()
    return head == b"{"


def _keyed_rows(path: Path) -> list[dict[str, Any]] | None:
    """Rows of a ``.json`` file that is one object keyed by item id (every value an object), else None."""
    if path.suffix.lower() != ".json":
        return None
    raw = path.read_bytes()
    if not raw.lstrip()[:1] == b"{":
        return None  # a list of rows: datasets' own reader
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # JSON Lines in a .json file, or broken: datasets' reader and _diagnose give the message
    if not isinstance(value, dict) or not value or not all(isinstance(v, dict) for v in value.values()):
        return None
    return [{"id": str(key), **item} if "id" not in item else dict(item) for key, item in value.items()]


def load_data_file(path: str | Path, split: str = "train", *, label: str = "data.source") -> Any:
    """One local data file as a `datasets.Dataset` (its rows become split `split`).

    Raises ValueError naming `label` and the file: unsupported suffix, empty file, unreadable content (with the
    line for JSON), or a file without rows.
    """
    import datasets

    path = Path(path)
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"{label}={str(path)!r} is a file with suffix {path.suffix!r}; supported files: "
            f"{', '.join(sorted(FILE_BUILDERS))} (or a folder, or a hub id)"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"{label}={str(path)!r} is empty (0 bytes): there are no rows to read")
    keyed = _keyed_rows(path) if builder == "json" else None
    if keyed is not None:
        try:
            # A field that is a number in one item and text in another becomes a `Json` column, as the json builder
            # makes it for a JSON list or JSON Lines file; `row_decoder` reads it back as written.
            dataset = datasets.Dataset.from_list(keyed, split=datasets.Split(split), on_mixed_types="use_json")
        except Exception as err:  # e.g. a field that is an object in one item and a list in another
            raise ValueError(
                f"{label}={str(path)!r} is a JSON object keyed by item id whose items do not share one schema: "
                f"{type(err).__name__}: {err}"
            ) from err
        if len(dataset) == 0:
            raise ValueError(f"{label}={str(path)!r} has no rows")
        return dataset
    try:
        dataset = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
    except Exception as err:  # datasets / pyarrow raise many types; the diagnosis names the file and line
        raise ValueError(f"{label}={str(path)!r} cannot be read as {builder}: {_diagnose(path, builder, err)}") from err
    if len(dataset) == 0:
        raise ValueError(f"{label}={str(path)!r} has no rows")
    return dataset


def load_data_folder(path: str | Path, *, label: str = "data.source", config: str | None = None) -> Any:
    """A local folder as a `datasets.DatasetDict` (see the module docstring for how a folder is read).

    config: a hub snapshot's config (subset) name; ignored for a plain folder of data files.
    """
    import datasets
    from datasets.data_files import DataFilesDict, get_data_patterns

    path = Path(path)
    if (path / "README.md").is_file():  # a hub snapshot: its card may name configs, splits and data files
        try:
            try:
                return datasets.load_dataset(str(path), name=config)
            except ValueError:
                if config is None:
                    raise
                return datasets.load_dataset(str(path))  # a folder of plain data files has no named configs
        except Exception as err:
            raise ValueError(
                f"{label}={str(path)!r} was read as a hub snapshot (it has a README.md dataset card) and failed: "
                f"{type(err).__name__}: {err}"
            ) from err
    root = path.resolve()
    patterns = get_data_patterns(str(root))
    resolved = DataFilesDict.from_patterns(patterns, base_path=str(root))

    def is_data_file(name: str) -> bool:
        """A data file inside the folder, not in a hidden sub-folder (.cache, .git); the folder itself may sit
        under a hidden one (a virtual environment's tmp, ~/.cache)."""
        relative = Path(name).resolve().relative_to(root)
        return relative.suffix.lower() in FILE_BUILDERS and not any(part.startswith(".") for part in relative.parts)

    data_files: dict[str, list[str]] = {}
    for split, files in resolved.items():
        kept = [f for f in files if is_data_file(f)]
        if kept:
            data_files[str(split)] = kept
    every_file = sorted({f for files in data_files.values() for f in files})
    if not every_file:
        raise ValueError(
            f"{label}={str(path)!r} holds no data file ({', '.join(sorted(FILE_BUILDERS))}); point {label} at a "
            "data file, a folder of them, a save_to_disk folder or a hub snapshot"
        )
    builders = {FILE_BUILDERS[Path(f).suffix.lower()] for f in every_file}
    if len(builders) > 1:
        raise ValueError(
            f"{label}={str(path)!r} mixes data file kinds ({', '.join(sorted(builders))}): "
            f"{[Path(f).name for f in every_file]}; point {label} at one file"
        )
    empty = [f for f in every_file if Path(f).stat().st_size == 0]
    if empty:
        raise ValueError(f"{label}={str(path)!r}: empty data file(s) {empty}; remove them or fill them")
    (builder,) = builders
    try:
        return datasets.load_dataset(builder, data_files=data_files)
    except Exception as err:
        for f in every_file:  # find the file at fault: the same checks and messages as for a single file
            load_data_file(Path(f), label=f"{label} file")
        raise ValueError(f"{label}={str(path)!r} ({builder} files {every_file}): {type(err).__name__}: {err}") from err


def _holds_json(feature: Any) -> bool:
    """Whether a `datasets` feature is, or contains at any depth, a ``Json`` feature."""
    import datasets

    if isinstance(feature, datasets.Json):
        return True
    if isinstance(feature, dict):
        return any(_holds_json(f) for f in feature.values())
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return _holds_json(feature.feature)
    return False


def decode_json_cells(value: Any, feature: Any) -> Any:
    """`value`, one cell as Arrow's ``to_pylist`` gives it, with every ``Json`` cell inside `feature` decoded.

    feature: the column's `datasets` feature (``Json``, a struct ``dict``, ``List`` / ``LargeList``, or any other,
        left as is). ``Json`` cells are JSON text in Arrow; decoding gives back what the file held (``"red"`` ->
    ``red``, ``3`` -> ``3``, a list of parts -> that list), which is what ``datasets``' own ``Json.decode_example``
    does when rows are read through its Python format.
    """
    import datasets

    if value is None:
        return None
    if isinstance(feature, datasets.Json):
        return json.loads(value) if isinstance(value, str) else value
    if isinstance(feature, dict) and isinstance(value, dict):
        return {key: decode_json_cells(v, feature[key]) if key in feature else v for key, v in value.items()}
    if isinstance(feature, (datasets.List, datasets.LargeList)) and isinstance(value, list):
        return [decode_json_cells(v, feature.feature) for v in value]
    return value


def row_decoder(features: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A function taking one row as Arrow gives it (``{column: cell}``) to the row as the file wrote it.

    features: the dataset's `datasets.Features`. Columns without a ``Json`` feature are passed through untouched
    (images stay ``{"bytes", "path"}``), so a file without mixed fields costs nothing.
    """
    json_columns = {name: f for name, f in (features or {}).items() if _holds_json(f)}
    if not json_columns:
        return lambda row: row

    def decode(row: dict[str, Any]) -> dict[str, Any]:
        return {k: decode_json_cells(v, json_columns[k]) if k in json_columns else v for k, v in row.items()}

    return decode


def iter_rows(dataset: Any, batch_size: int = 64) -> Iterator[dict[str, Any]]:
    """The rows of a `datasets.Dataset` in order, as plain Python values read as written (`row_decoder`), images
    left as ``{"bytes", "path"}`` (read through the Arrow format, so ``datasets`` neither decodes them — the caller
    does, turning a bad image into a counted skip — nor copies the table)."""
    decode = row_decoder(dataset.features)
    for batch in dataset.with_format("arrow").iter(batch_size=batch_size):
        for row in batch.to_pylist():
            yield decode(row)
