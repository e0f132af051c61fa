"""avg@k evaluation of a sampler on benchmarks, resumable item by item (ALGORITHMS.md §8).

For every item: k responses at (temperature, top_p, max_new_tokens), each graded with the training reward's
accuracy (`vppo_eval.reward.compute_rewards`); the item's accuracy is the mean over its k samples, a benchmark's
avg@k the mean over its scored items, and the reported average the mean over benchmarks (Table 1's "Avg" column).

Resume: every finished item is appended as one JSON line to ``<out_dir>/items.jsonl`` (flushed and fsynced per
sampler call). A rerun with the same settings reads that file, skips the items it holds and samples only the rest.
Results belong to one model and one item set: the model's identity (`model_identity`: its resolved path and a
fingerprint of its config and weight files) and every item's content hash (`vppo_eval.benchmarks.item_sha256`,
stored in each row) must match for a stored result to be reused; a mismatch is refused, naming the stored and the
new, never resumed over. A benchmark that keeps no item is an error (`EmptyBenchmarkError`) unless
``allow_empty=True``.
Items are grouped into sampler calls of ``batch_size`` items by their position in the benchmark (not by what is
left to do), and each call's seed is derived from ``seed`` and the call's first item, so with a deterministic
sampler an interrupted-and-resumed run gives exactly the numbers of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

ITEMS_FILE = "items.jsonl"
CONFIG_FILE = "eval_config.json"
RESULTS_FILE = "results.json"

# Settings that change what a stored item means: a rerun into the same out_dir must match them exactly.
_FROZEN_SETTINGS = (
    "k",
    "temperature",
    "top_p",
    "max_new_tokens",
    "seed",
    "format_weight",
    "multiple_choice",
    "system_prompt",
    "protocol",
)


class EmptyBenchmarkError(ValueError):
    """A benchmark kept no item to score; the message names it and every skip reason with its count.

    results: what `evaluate` computed when the benchmark emptied during evaluation (all items skipped at prompt
    building), already written to results.json; None when it was empty before sampling.
    """

    def __init__(self, message: str, results: EvalResults | None = None) -> None:
        super().__init__(message)
        self.results = results


class ResumeRefusedError(ValueError):
    """out_dir holds results that are not this run's to resume: another model, other settings, or items that have
    changed since; the message names the stored and the new, and the fix."""


@dataclasses.dataclass(frozen=True)
class BenchmarkResult:
    """Summary of one benchmark.

    avg_at_k: mean over scored items of the per-item accuracy (mean over its k samples), in [0, 1].
    format_rate: mean format reward over all scored samples, in [0, 1].
    truncated_rate: fraction of scored samples that stopped at max_new_tokens (finish reason "length").
    skipped: reason -> count of loaded items that could not be evaluated (excluded from avg_at_k).
    load_skipped: reason -> count of raw rows the benchmark loader dropped (bad image, empty answer, the
        exact-match filter, ...), from `load_benchmark_report`; empty when records were passed in directly.
    """

    name: str
    avg_at_k: float
    n_items: int
    n_skipped: int
    format_rate: float
    truncated_rate: float
    skipped: dict[str, int]
    load_skipped: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class EvalResults:
    """What `evaluate` returns (and writes to ``<out_dir>/results.json``).

    benchmarks: name -> BenchmarkResult, in the order evaluated.
    average: mean of avg_at_k over the benchmarks that have at least one scored item, in [0, 1]
        (NaN when none has).
    items: one dict per item, exactly the rows of items.jsonl (keys: benchmark, id, status, and for scored items
        question, answer, responses, finish_reasons, accuracy [k], format [k], item_accuracy).
    config: the evaluation settings.
    """

    k: int
    benchmarks: dict[str, BenchmarkResult]
    average: float
    items: list[dict[str, Any]]
    config: dict[str, Any]

    def item_accuracy(self) -> dict[tuple[str, str], float]:
        """(benchmark, item id) -> per-item accuracy (mean over k) for every scored item."""
        return {(r["benchmark"], r["id"]): r["item_accuracy"] for r in self.items if r["status"] == "scored"}

    def to_dict(self, *, with_items: bool = False) -> dict[str, Any]:
        # NaN (a benchmark with no scored item) becomes null: JSON has no NaN.
        out = {
            "k": self.k,
            "average": _nan_to_none(self.average),
            "benchmarks": {
                name: {key: _nan_to_none(v) for key, v in dataclasses.asdict(b).items()}
                for name, b in self.benchmarks.items()
            },
            "config": self.config,
        }
        if with_items:
            out["items"] = self.items
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalResults:
        """Inverse of `to_dict` (items are empty when the dict has none)."""
        return cls(
            k=int(data["k"]),
            benchmarks={
                name: BenchmarkResult(**{key: math.nan if v is None else v for key, v in b.items()})
                for name, b in data["benchmarks"].items()
            },
            average=math.nan if data["average"] is None else float(data["average"]),
            items=list(data.get("items", [])),
            config=dict(data.get("config", {})),
        )


def _nan_to_none(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else x


def _item_seed(seed: int, benchmark: str, item_id: str) -> int:
    # A stable (process-independent, unlike hash()) seed per sampler call, keyed by its first item.
    return (seed + zlib.crc32(f"{benchmark}\x00{item_id}".encode())) % (2**31 - 1)


def read_items(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of an items.jsonl file. A torn last line (the process died mid-write) is dropped and cut off the file.

    Any other unreadable line is an error: resuming over it could silently lose or duplicate items.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for a line cut inside a UTF-8 character
            is_last = i == len(lines) - 1  # no trailing newline: the write was interrupted
            if not is_last:
                raise ValueError(
                    f"{path}: line {i + 1} is not valid JSON ({err}); the file is corrupt. Fix or delete that line "
                    "(or use a new out_dir) before resuming."
                ) from err
            with path.open("r+b") as f:  # drop the torn tail so the next append starts on a fresh line
                f.truncate(len(raw) - len(line))
            break
        if not isinstance(row, dict) or not {"benchmark", "id", "status"} <= row.keys():
            raise ValueError(
                f"{path}: line {i + 1} is not an evaluation item (needs benchmark, id, status); is this an "
                "items.jsonl written by vppo_eval.evaluate? Use a new out_dir."
            )
        rows.append(row)
    else:
        if raw and not raw.endswith(b"\n"):  # a complete last row without its newline: end the line before appending
            with path.open("ab") as f:
                f.write(b"\n")
    return rows


_DATA_SUFFIXES = ("", ".parquet", ".jsonl", ".json", ".csv", ".arrow")


_TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag")
_DEFAULT_TAGS = ("from", "value", "human", "gpt")  # LLaMA-Factory's, for a declaration without tags


def _dataset_info_file(data_dir: Path, names: Sequence[str]) -> Path | None:
    """The file a LLaMA-Factory ``dataset_info.json`` in data_dir names for the first of ``names`` it declares, after
    checking the declaration is the sharegpt form this reader follows; None when there is no such entry."""
    from vppo_eval.row_readers import SHAREGPT_TURN_SPELLINGS as _READ_TAGS  # the turn spellings the reader reads

    info_path = data_dir / "dataset_info.json"
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{info_path} is not valid JSON: {err}") from err
    for name in names:
        entry = info.get(name) if isinstance(info, dict) else None
        if not isinstance(entry, dict) or "file_name" not in entry:
            continue
        # LLaMA-Factory's defaults for what a declaration leaves out (its DatasetAttr): messages column
        # "conversations", tags from / value / human / gpt. The reader reads both spellings of the turns.
        columns = {"messages": "conversations", **(entry.get("columns") or {})}
        tags = {**dict(zip(_TAG_KEYS, _DEFAULT_TAGS, strict=True)), **(entry.get("tags") or {})}
        found = {
            "formatting": entry.get("formatting"),
            "columns": {k: columns.get(k) for k in ("messages", "images")},
            "tags": {k: tags.get(k) for k in _TAG_KEYS},
        }
        readable = (
            found["formatting"] == "sharegpt"
            and found["columns"]["messages"] in ("messages", "conversations")
            and found["columns"]["images"] == "images"
            and tuple(found["tags"].values()) in _READ_TAGS
        )
        if not readable:
            raise ValueError(
                f"{info_path}: dataset {name!r} is declared as {found}, not the sharegpt form vppo-eval reads "
                "(formatting 'sharegpt'; columns messages 'messages' or 'conversations', images 'images'; tags "
                f"{' or '.join(str(dict(zip(_TAG_KEYS, t, strict=True))) for t in _READ_TAGS)}); convert the file "
                "or rename its fields"
            )
        return data_dir / entry["file_name"]
    return None


def data_dirs(data_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """``data_dir`` (one folder, or a list of them in the order to search) -> absolute folders, resolved once.

    Raises ValueError for an empty list.
    """
    items = [data_dir] if isinstance(data_dir, (str, os.PathLike)) else list(data_dir)
    if not items:
        raise ValueError("data_dir is an empty list; pass a folder, or a list of folders to search in order")
    return [Path(d).expanduser().resolve() for d in items]


def _find_in(root: Path, name: str, protocol: str | None) -> tuple[Path | None, list[Path], list[str]]:
    """Benchmark ``name`` in one data dir: (the path, or None; the paths tried; notes for the error message)."""
    from vppo_eval.benchmarks import get_benchmark
    from vppo_eval.releases import candidate_files

    spec = get_benchmark(name)
    tried: list[Path] = []
    notes: list[str] = []
    if protocol in (None, "raw"):
        for suffix in _DATA_SUFFIXES:
            path = root / f"{name}{suffix}"
            tried.append(path)
            if path.exists():
                return path, tried, notes
    if protocol in (None, "vppo"):
        stems = (name, *spec.sharegpt_names)
        # A LLaMA-Factory data folder's own declaration first: in data_dir, or in data/ of a release root.
        for info_dir in (root, root / "data"):
            declared = _dataset_info_file(info_dir, stems)
            if declared is None:
                continue
            if declared.is_file():
                return declared, tried, notes
            # PAPO-Eval's dataset_info.json names papo/We-Math_We-Math.json, its prepare_data.py writes
            # papo/We_Math.json: a declaration of a file that is not there falls back to the names.
            notes.append(f"{info_dir / 'dataset_info.json'} names {declared}, which does not exist")
        for path in candidate_files(root, stems):
            tried.append(path)
            if path.is_file():
                return path, tried, notes
    return None, tried, notes


def benchmark_source(
    data_dir: str | os.PathLike | Sequence[str | os.PathLike], name: str, protocol: str | None = None
) -> Path:
    """Where benchmark `name` lives under data_dir: one folder, or a list searched in order (the first folder that
    holds the benchmark is read: say both releases' folders, PAPO-Eval's and VPPO-Eval's, for protocol vppo).

    protocol "raw" (or None): ``data_dir/name`` (a folder) or ``data_dir/name.<ext>`` (a file, e.g. the
    benchmark's own release). protocol "vppo" (or None, when no raw copy is there): the authors' file, the one a
    ``dataset_info.json`` in data_dir (or its ``data/``) declares for it if that file exists, else the first of
    `vppo_eval.releases.candidate_files` for the stems ``name`` and ``Benchmark.sharegpt_names``: a JSON file in
    ``.``, ``papo/``, ``vppo/``, ``data/``, ``data/papo/``, ``data/vppo/`` (PAPO-Eval's prepared ``DATA/papo/
    We_Math.json``, VPPO-Eval's ``data/vppo/MathLLMs_MathVision.json``), then the hub's parquet shard in ``data/``
    or ``.`` (PAPO-Eval's ``data/We_Math-00000-of-00001.parquet``).
    Raises FileNotFoundError naming the names looked for and what each folder holds.
    """
    from vppo_eval.benchmarks import get_benchmark
    from vppo_eval.releases import folder_holdings

    spec = get_benchmark(name)
    roots = data_dirs(data_dir)
    tried: list[Path] = []
    notes: list[str] = []
    for root in roots:
        found, tried_here, notes_here = _find_in(root, name, protocol)
        if found is not None:
            return found
        tried += tried_here
        notes += notes_here
    what = {
        "raw": "the benchmark's own release (raw schema)",
        "vppo": "the authors' file (see the vppo-eval README, 'Getting the authors' data')",
        None: "its data",
    }[protocol]
    where = f"data_dir={str(roots[0])!r}" if len(roots) == 1 else f"none of data_dir={[str(r) for r in roots]}"
    parts = [f"{where} has no benchmark {name!r} for protocol {protocol or 'any'}: place {what} there"]
    if protocol in (None, "vppo"):
        release = f"{spec.release}, {spec.release_rows:,} rows" if spec.release else "the authors' release"
        parts.append(
            f"names looked for: {', '.join((name, *spec.sharegpt_names))} ({release}), as <name>.json in "
            "., papo/, vppo/, data/, data/papo/, data/vppo/ or <name>-00000-of-00001.parquet in data/ or ."
        )
    else:
        parts.append(
            "looked for: "
            + ", ".join(str(p) for p in tried[:4])
            + (f" (+{len(tried) - 4} more)" if len(tried) > 4 else "")
        )
    for root in roots:
        held = folder_holdings(root)
        parts.append(f"{root} holds: {', '.join(held) if held else 'no .json, .parquet or .zip file where looked'}")
    parts += notes
    if protocol == "vppo":
        for root in roots:
            raw = [root / f"{name}{suffix}" for suffix in _DATA_SUFFIXES if (root / f"{name}{suffix}").exists()]
            if raw:
                parts.append(f"{raw[0]} is there: the benchmark's own release, which protocol 'raw' reads")
                break
    raise FileNotFoundError("; ".join(parts) + ". Or drop data_dir to load it from the hub.")


def load_benchmark_reports(
    benchmarks: str | Sequence[str],
    *,
    data_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    limit: int | None = None,
    protocol: str | None = None,
) -> dict[str, Any]:
    """Load registry benchmarks: ("all" | "a,b" | [names]) -> name -> LoadReport (records, skips, source, form).

    data_dir: one folder or a list searched in order (`benchmark_source`); None: the hub. A benchmark also found
    in a later folder is read from the first and the others are recorded (``LoadReport.also_in``).
    Unknown names and missing files raise before anything is loaded; protocol: see `load_benchmark_report`.
    """
    from vppo_eval.benchmarks import load_benchmark_report, resolve_benchmark_names

    names = resolve_benchmark_names(benchmarks)
    roots = data_dirs(data_dir) if data_dir is not None else None
    sources = {name: benchmark_source(roots, name, protocol) if roots is not None else None for name in names}
    reports = {name: load_benchmark_report(name, sources[name], limit, protocol=protocol) for name in names}
    for name, report in reports.items():
        if roots is not None and len(roots) > 1:
            first = next(i for i, root in enumerate(roots) if _find_in(root, name, protocol)[0] is not None)
            report.also_in = tuple(
                str(path) for root in roots[first + 1 :] if (path := _find_in(root, name, protocol)[0]) is not None
            )
    return reports


def load_benchmarks(
    benchmarks: str | Sequence[str],
    *,
    data_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    limit: int | None = None,
    protocol: str | None = None,
) -> tuple[dict[str, list[Any]], dict[str, dict[str, int]]]:
    """Load registry benchmarks: ("all" | "a,b" | [names]) -> (name -> records, name -> {skip reason: count}).

    Unknown names raise ValueError (with the closest valid name) before anything is loaded.
    """
    reports = load_benchmark_reports(benchmarks, data_dir=data_dir, limit=limit, protocol=protocol)
    return {n: list(r.records) for n, r in reports.items()}, {n: dict(r.skipped) for n, r in reports.items()}


def records_from_rows(
    rows: Iterable[Mapping[str, Any]],
    *,
    question: str = "problem",
    answer: str = "answer",
    images: str = "images",
    id_column: str | None = "id",
) -> tuple[list[Any], dict[str, int]]:
    """Rows of any question/answer/images dataset (e.g. a `datasets` split) -> (Records for `evaluate`, skips).

    The defaults are the ViRL39K / synthetic-task column names. `images` may hold one image or a list (PIL, bytes,
    {"bytes", "path"} or a path). Rows with an undecodable image or none are skipped and counted by reason
    (pass the counts to `evaluate(load_skipped={name: skips})`); ids fall back to the row index when `id_column`
    is None or absent. A missing question/answer/images column is a ValueError naming it.
    """
    from vppo_eval.records import Record
    from vppo_rollout.images import SkipRow, decode_image

    records, skipped = [], Counter()
    for index, row in enumerate(rows):
        missing = [c for c in (question, answer, images) if c not in row]
        if missing:
            raise ValueError(f"row {index} has no column(s) {missing}; it has {sorted(row)}. Pass question=, answer=, "
                             "images= to name the columns")  # fmt: skip
        raw = row[images]
        raw = list(raw) if isinstance(raw, (list, tuple)) else [raw]
        try:
            if not raw or raw == [None]:
                raise SkipRow("missing_image")
            pil = [decode_image(v) for v in raw]
        except SkipRow as skip:
            skipped[skip.reason] += 1
            continue
        rid = row[id_column] if id_column is not None and id_column in row else index
        records.append(Record(id=str(rid), question=str(row[question]), images=pil, answer=str(row[answer])))
    return records, dict(skipped)


# Weight files whose names and sizes enter a model's fingerprint (a Hugging Face folder's shards).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_identity(path: str | os.PathLike) -> dict[str, str]:
    """What names a model in an evaluation's results: ``{"path": resolved folder, "fingerprint": sha256}``.

    The fingerprint covers the folder's ``config.json`` bytes and the names and sizes of its weight files
    (``*.safetensors``, ``*.bin``, ...) and of their index: cheap (no weight is read), and different for another
    architecture, size or sharding. Two checkpoints of one training run at one path with equal file sizes are not
    told apart by it; the path is part of the identity for that reason.
    """
    import hashlib

    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"model={str(path)!r} is not a folder; pass the checkpoint's local Hugging Face folder")
    digest = hashlib.sha256()
    config = root / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"no config.json")
    for file in sorted(root.iterdir()):
        if file.is_file() and (file.suffix in _WEIGHT_SUFFIXES or file.name.endswith(".index.json")):
            digest.update(f"\n{file.name}\t{file.stat().st_size}".encode())
    return {"path": str(root), "fingerprint": digest.hexdigest()}


def _describe_model(identity: Any) -> str:
    if not identity:
        return "no model named (evaluate(model=None))"
    return f"{identity.get('path')} (fingerprint {str(identity.get('fingerprint'))[:16]})"


def _check_config(out_dir: Path, config: dict[str, Any]) -> None:
    """Refuse to resume into out_dir when its stored evaluation was of another model or with other settings."""
    path = out_dir / CONFIG_FILE
    if not path.exists():
        return
    old = json.loads(path.read_text())
    if "model" not in old and config["model"]:
        raise ResumeRefusedError(
            f"out_dir={str(out_dir)!r} holds results written by an older vppo-eval, which did not record the model "
            f"they are of, so they cannot be checked to be of {_describe_model(config['model'])}. Use a new out_dir "
            "(vppo-eval --out)."
        )
    if old.get("model") != config["model"]:
        raise ResumeRefusedError(
            f"out_dir={str(out_dir)!r} holds the results of model {_describe_model(old.get('model'))}; this run is "
            f"of model {_describe_model(config['model'])}. Resuming would report the stored model's results under "
            "this one's name. Use a new out_dir (vppo-eval --out) for this model."
        )
    diff = {key: (old.get(key), config[key]) for key in _FROZEN_SETTINGS if old.get(key) != config[key]}
    if diff:
        listed = ", ".join(f"{key}: stored {a!r} vs now {b!r}" for key, (a, b) in diff.items())
        raise ResumeRefusedError(
            f"out_dir={str(out_dir)!r} holds an evaluation with other settings ({listed}); resuming would mix "
            "them. Use a new out_dir, or the stored settings."
        )


def _check_stored_items(
    out_dir: Path, done: Mapping[tuple[str, str], Mapping[str, Any]], hashes: Mapping[tuple[str, str], str]
) -> None:
    """Refuse stored results whose item is not the item now under that id (the data changed since)."""
    changed = [
        (key, row.get("item_sha256"), hashes[key])
        for key, row in done.items()
        if key in hashes and row.get("item_sha256") != hashes[key]
    ]
    if changed:
        shown = "; ".join(
            f"{name} item {rid}: stored {str(old)[:16] if old else 'no hash (written before item hashes)'} vs now "
            f"{new[:16]}"
            for (name, rid), old, new in changed[:3]
        )
        raise ResumeRefusedError(
            f"out_dir={str(out_dir)!r} holds results of {len(changed)} item(s) that differ from the items now "
            f"({shown}{', ...' if len(changed) > 3 else ''}): the data changed since they were sampled, and reusing "
            "them would score other items. Use a new out_dir (vppo-eval --out), or delete "
            f"{out_dir / ITEMS_FILE} to sample every item again."
        )


def _write_config(out_dir: Path, config: dict[str, Any]) -> None:
    path = out_dir / CONFIG_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    tmp.replace(path)


def _empty_message(
    name: str, info: Mapping[str, Any], load_skipped: Mapping[str, int], skipped: Mapping[str, int]
) -> str:
    rows = info.get("rows")
    reasons = {
        **{f"{k} (at load)": v for k, v in load_skipped.items()},
        **{f"{k} (at evaluation)": v for k, v in skipped.items()},
    }
    why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "no skip recorded (the data held no item)"
    return (
        f"benchmark {name!r} kept no item to score ({rows if rows is not None else '?'} row(s) read from "
        f"{info.get('source', '?')}; skipped: {why}). Fix the data (reasons: vppo_rollout.images.SKIP_REASONS), or "
        "pass allow_empty=True (vppo-eval --allow-empty) to report it as an empty row."
    )


def check_kept_items(
    data: Mapping[str, Sequence[Any]],
    load_skipped: Mapping[str, Mapping[str, int]] | None = None,
    data_info: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Raise `EmptyBenchmarkError` naming every benchmark of `data` (name -> records) that holds no record, with the
    loader's skip reasons (`load_skipped`) and what `data_info` (name -> `LoadReport.summary()`) says of its source."""
    empty = [name for name, records in data.items() if not records]
    if empty:
        raise EmptyBenchmarkError(
            "\n".join(
                _empty_message(n, (data_info or {}).get(n) or {}, (load_skipped or {}).get(n) or {}, {}) for n in empty
            )
        )


def _append(f, rows: Iterable[dict[str, Any]]) -> None:
    for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def summarize(
    items: Sequence[Mapping[str, Any]],
    *,
    order: Sequence[str] | None = None,
    load_skipped: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[str, BenchmarkResult]:
    """Per-benchmark summary of item rows (the items.jsonl schema).

    order: benchmark names to report, in order (default: order of first appearance).
    load_skipped: benchmark -> {reason: count} of rows dropped at load time, copied into the result.
    """
    names = list(order) if order is not None else list(dict.fromkeys(r["benchmark"] for r in items))
    out = {}
    for name in names:
        rows = [r for r in items if r["benchmark"] == name]
        scored = [r for r in rows if r["status"] == "scored"]
        skipped = Counter(r.get("reason", "unknown") for r in rows if r["status"] == "skipped")
        n_samples = sum(len(r["accuracy"]) for r in scored)
        out[name] = BenchmarkResult(
            name=name,
            avg_at_k=sum(r["item_accuracy"] for r in scored) / len(scored) if scored else math.nan,
            n_items=len(scored),
            n_skipped=sum(skipped.values()),
            format_rate=sum(sum(r["format"]) for r in scored) / n_samples if n_samples else math.nan,
            truncated_rate=(
                sum(fr == "length" for r in scored for fr in r["finish_reasons"]) / n_samples if n_samples else math.nan
            ),
            skipped=dict(sorted(skipped.items())),
            load_skipped=dict(sorted((load_skipped or {}).get(name, {}).items())),
        )
    return out


def _average(benchmarks: Mapping[str, BenchmarkResult]) -> float:
    vals = [b.avg_at_k for b in benchmarks.values() if b.n_items > 0]
    return sum(vals) / len(vals) if vals else math.nan


def evaluate(
    sampler,
    benchmarks: str | Sequence[str] | Mapping[str, Sequence[Any]],
    *,
    processor,
    k: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 2048,
    limit: int | None = None,
    out_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    format_weight: float = 0.1,
    multiple_choice: bool = True,
    system_prompt: str = "You are a helpful assistant.",
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
    load_skipped: Mapping[str, Mapping[str, int]] | None = None,
    protocol: str | None = "default",
    data_info: Mapping[str, Mapping[str, Any]] | None = None,
    model: str | os.PathLike | Mapping[str, Any] | None = None,
    allow_empty: bool = False,
) -> EvalResults:
    """avg@k of `sampler` on `benchmarks` (ALGORITHMS.md §8; the paper: k=8, temperature 1.0, top-p 1.0, 2048 tokens).

    sampler: a vppo_rollout GroupSampler (TransformersSampler, VLLMSampler).
    benchmarks: "all", "a,b", a list of registry names (loaded with `load_benchmarks`, whose dropped rows are
        counted in BenchmarkResult.load_skipped), or a mapping name -> list[Record] (already loaded).
    processor: the model's processor, used to build the chat prompts (vppo_rollout.build_prompt).
    limit: evaluate only the first `limit` items of each benchmark.
    out_dir: where items.jsonl (resume state), eval_config.json and results.json go; None keeps nothing (no resume).
    data_dir: with registry names, the local folder (or a list of folders, searched in order) holding them
        (`benchmark_source`: for protocol "vppo" the authors' releases as they ship); None loads from the hub.
    batch_size: items per sampler call (k responses each); also the resume granularity.
    seed: base seed; each sampler call gets a seed derived from it and the call's first item.
    multiple_choice: also accept option-letter answers (`vppo_eval.reward.grade`); False grades exactly like the
        training reward of the paper (mathruler's `grade_answer` on the last `\\boxed{}`).
    meta: extra facts stored in the config (e.g. the engine); not checked on resume.
    load_skipped: with a mapping of records, the loader's dropped-row counts to report (see `load_benchmarks`).
    protocol: the evaluation protocol the numbers follow (`vppo_eval.benchmarks.PROTOCOLS`; None: unnamed); with
        registry names it also decides which data form is read. "default": with registry names the CLI's default
        (`DEFAULT_PROTOCOL`, "vppo": the authors' sharegpt files in `data_dir`); records passed in follow no protocol
        unless you name one, so for them it means None.
    data_info: with a mapping of records, what `LoadReport.summary()` said of each benchmark's data; recorded in
        the config (and so in results.json) with the protocol. Without it the source is "records passed in".
    model: the evaluated checkpoint's folder (its `model_identity` is stored) or an identity mapping you made; a
        resume into out_dir must name the same model, else it is refused. None: no model named (only None matches).
    allow_empty: report a benchmark that keeps no item (at load, or every item skipped at evaluation) as an empty
        row; by default that raises `EmptyBenchmarkError` naming the skip reasons (results.json is written first
        when items were evaluated).
    Resuming reuses a stored item only when its content hash (`item_sha256`) equals the item's now; any differing
    stored item is refused (ValueError naming it), never reused.
    Items whose prompt cannot be built (ValueError from build_prompt) or whose answer is empty are written as
    skipped with their reason and counted in BenchmarkResult.skipped, never scored as 0.
    """
    from vppo_eval.reward import compute_rewards
    from vppo_rollout.prompts import build_prompt
    from vppo_rollout.sampling import SamplingConfig

    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be an integer >= 1 (the paper uses k=8)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be None or an integer >= 1")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (the paper samples at 1.0; 0 is greedy)")
    if temperature == 0 and k != 1:
        raise ValueError(
            f"temperature=0 (greedy) with k={k}: every sample would be the same response; use k=1 for greedy avg@1"
        )
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not 0.0 <= format_weight <= 1.0:
        raise ValueError(f"format_weight={format_weight!r} must be in [0, 1] (the paper uses 0.1)")

    from vppo_eval.benchmarks import DEFAULT_PROTOCOL, PROTOCOLS, items_sha256

    if protocol == "default":
        protocol = None if isinstance(benchmarks, Mapping) else DEFAULT_PROTOCOL
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} must be one of {sorted(PROTOCOLS)} or None")
    if isinstance(benchmarks, Mapping):
        data = {str(name): list(recs)[:limit] if limit is not None else list(recs) for name, recs in benchmarks.items()}
        load_skipped = {name: dict((load_skipped or {}).get(name, {})) for name in data}
        data_info = {
            name: dict((data_info or {}).get(name) or {"source": "records passed in", "data_form": None})
            for name in data
        }
    else:
        reports = load_benchmark_reports(benchmarks, data_dir=data_dir, limit=limit, protocol=protocol)
        data = {n: list(r.records) for n, r in reports.items()}
        load_skipped = {n: dict(r.skipped) for n, r in reports.items()}
        data_info = {n: r.summary() for n, r in reports.items()}
    for name, records in data.items():  # what was scored (after limit): the id hash two runs must share
        data_info[name]["items"] = len(records)
        data_info[name]["items_sha256"] = items_sha256(records)
    if not allow_empty:
        check_kept_items(data, load_skipped, data_info)
    if isinstance(model, Mapping):
        identity = dict(model)
    else:
        identity = model_identity(model) if model is not None else None
    config = {
        "model": identity,
        "k": k,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "format_weight": format_weight,
        "multiple_choice": multiple_choice,
        "system_prompt": system_prompt,
        "batch_size": batch_size,
        "limit": limit,
        "benchmarks": list(data),
        "protocol": protocol,
        "data": data_info,
        "allow_empty": allow_empty,
        **({"meta": dict(meta)} if meta else {}),
    }
    for name, records in data.items():
        ids = [str(r.id) for r in records]
        dup = [i for i, c in Counter(ids).items() if c > 1]
        if dup:
            raise ValueError(f"benchmark {name!r} has duplicate item ids {dup[:5]}; ids must be unique to resume")

    from vppo_eval.benchmarks import item_sha256

    # Only a resumable run needs them (each hash decodes the item's images once): training's validation passes none.
    hashes: dict[tuple[str, str], str] = {}
    if out_dir is not None:
        hashes = {(name, str(r.id)): item_sha256(r) for name, records in data.items() for r in records}
    done: dict[tuple[str, str], dict[str, Any]] = {}
    f = None
    if out_dir is not None:
        out = Path(out_dir).expanduser().resolve()  # resolved once: the folder named in messages is where it is
        out_dir = out
        out.mkdir(parents=True, exist_ok=True)
        _check_config(out, config)
        for row in read_items(out / ITEMS_FILE):
            done[(row["benchmark"], str(row["id"]))] = row
        _check_stored_items(out, done, hashes)
        _write_config(out, config)
        f = (out / ITEMS_FILE).open("a", encoding="utf-8")

    wanted = {(name, str(r.id)) for name, records in data.items() for r in records}
    todo = len(wanted - done.keys())
    bar = tqdm(total=todo, desc=f"avg@{k}", unit="item", disable=not progress)
    try:
        for name, records in data.items():
            for start in range(0, len(records), batch_size):
                chunk = records[start : start + batch_size]
                pending = [r for r in chunk if (name, str(r.id)) not in done]
                if not pending:
                    continue
                bar.set_postfix_str(name)
                sampling = SamplingConfig(
                    temperature=temperature,
                    top_p=top_p,
                    max_new_tokens=max_new_tokens,
                    seed=_item_seed(seed, name, str(chunk[0].id)),
                )
                rows = _evaluate_chunk(
                    sampler, processor, name, pending, k=k, sampling=sampling, format_weight=format_weight,
                    system_prompt=system_prompt, build_prompt=build_prompt,
                    compute_rewards=functools.partial(compute_rewards, multiple_choice=multiple_choice),
                )  # fmt: skip
                if hashes:  # what a resume compares: the stored result is of this item's content
                    for row in rows:
                        row["item_sha256"] = hashes[(name, row["id"])]
                if f is not None:
                    _append(f, rows)
                for row in rows:
                    done[(name, row["id"])] = row
                bar.update(len(rows))
    finally:
        bar.close()
        if f is not None:
            f.close()

    items = [done[(name, str(r.id))] for name, records in data.items() for r in records]
    per_benchmark = summarize(items, order=list(data), load_skipped=load_skipped)
    results = EvalResults(k=k, benchmarks=per_benchmark, average=_average(per_benchmark), items=items, config=config)
    if out_dir is not None:
        path = Path(out_dir) / RESULTS_FILE
        path.write_text(json.dumps(results.to_dict(), indent=2, allow_nan=False))
    emptied = [name for name, b in per_benchmark.items() if b.n_items == 0]
    if emptied and not allow_empty:
        raise EmptyBenchmarkError(
            "\n".join(
                _empty_message(n, data_info[n], load_skipped.get(n, {}), per_benchmark[n].skipped) for n in emptied
            ),
            results,
        )
    return results


def _prompt_skip_reason(err: ValueError) -> str:
    """The skip reason of an item whose prompt could not be built (`vppo_rollout.prompts.prompt_skip_reason`, the
    one classification training uses too)."""
    from vppo_rollout.prompts import prompt_skip_reason

    return prompt_skip_reason(err)


def _evaluate_chunk(
    sampler, processor, name, records, *, k, sampling, format_weight, system_prompt, compute_rewards, build_prompt
) -> list[dict[str, Any]]:
    """Sample k responses for each record, grade them, and return one items.jsonl row per record (input order)."""
    rows: dict[str, dict[str, Any]] = {}
    prompts, kept = [], []
    for record in records:
        rid = str(record.id)
        answer = "" if record.answer is None else str(record.answer)
        if not answer.strip():
            rows[rid] = {"benchmark": name, "id": rid, "status": "skipped", "reason": "empty_answer"}
            continue
        if not str(record.question or "").strip():
            rows[rid] = {"benchmark": name, "id": rid, "status": "skipped", "reason": "empty_question"}
            continue
        try:
            prompt = build_prompt(processor, record.question, list(record.images), system_prompt=system_prompt)
        except ValueError as err:
            # Counted under the reasons training uses (vppo_rollout.images.SKIP_REASONS); the message is kept.
            rows[rid] = {
                "benchmark": name,
                "id": rid,
                "status": "skipped",
                "reason": _prompt_skip_reason(err),
                "detail": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
            }
            continue
        prompts.append(prompt)
        kept.append(record)

    if prompts:
        rollouts = sampler.sample(prompts, k, sampling)
        per_prompt: list[list[int]] = [[] for _ in prompts]
        for r, g in enumerate(rollouts.group_index):
            per_prompt[g].append(r)
        for g, record in enumerate(kept):
            idx = per_prompt[g]
            if len(idx) != k:
                raise RuntimeError(f"sampler returned {len(idx)} responses for item {record.id!r}, expected k={k}")
            texts = [rollouts.texts[r] for r in idx]
            answer = str(record.answer)
            scores = compute_rewards(texts, [answer] * k, format_weight=format_weight)
            acc = [float(a) for a in scores["accuracy"]]
            rows[str(record.id)] = {
                "benchmark": name,
                "id": str(record.id),
                "status": "scored",
                "question": record.question,
                "answer": answer,
                "responses": texts,
                "finish_reasons": [rollouts.finish_reasons[r] for r in idx],
                "accuracy": acc,
                "format": [float(x) for x in scores["format"]],
                "item_accuracy": sum(acc) / k,
            }
    return [rows[str(r.id)] for r in records]
