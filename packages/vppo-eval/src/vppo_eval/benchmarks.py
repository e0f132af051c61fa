"""The eight benchmarks of the VPPO paper: registry, loading, normalisation into ``Record``, filtering.

Each benchmark is one ``Benchmark`` entry: its Hugging Face id, config and split, the raw columns it needs, and a
function turning one raw row into a ``Record``. Every benchmark is loaded by the same code path
(``load_benchmark``) from

- its hub id (``source=None``, needs network or a populated HF cache),
- a local folder: a hub snapshot (``huggingface-cli download <id> --repo-type dataset --local-dir DIR``), a folder
  of parquet/jsonl data files, or a ``save_to_disk`` folder,
- a single local ``.parquet`` / ``.jsonl`` / ``.json`` / ``.csv`` / ``.arrow`` file in the raw schema.

Rows that cannot be used are skipped and counted by reason (``load_benchmark_report``), in the vocabulary training
uses too (``vppo_rollout.images.SKIP_REASONS``): ``empty_answer``, ``missing_image``, ``undecodable_image``,
``image_too_large``, ``empty_question``, ``bad_options`` and, for MathVerse, MathVision and DynaMath (filtered by
the paper to exact-match-checkable items, ALGORITHMS.md §8), ``not_exact_match``. Images are decoded by
``vppo_rollout.images.decode_image``, the decoder training uses.
A missing *column* is an error, not a skip: the source is then not the benchmark's schema at all.

Two data forms, each tied to an evaluation protocol (``PROTOCOLS``):

- ``raw`` — the benchmark's own release (hub schema, or the GitHub release form of LogicVista and DynaMath: one JSON
  object keyed by item id); vppo-eval's exact-match filter picks the items of MathVerse, MathVision and DynaMath.
- ``vppo`` — the authors' evaluation data: LLaMA-Factory "sharegpt" rows (``messages``: a user turn with one
  ``<image>`` placeholder per image, then an assistant turn holding the answer; ``images``: image paths, in the
  releases ``./data/images/...`` relative to the release root), one file per benchmark
  (``Benchmark.sharegpt_names``), in the layouts the releases ship (`vppo_eval.releases`: VPPO-Eval's JSON files,
  PAPO_eval's parquet shards and image zips, PAPO-Eval's prepared folder). The items are the authors' (already
  filtered); nothing is filtered here.
  LLaMA-Factory's other spelling (``conversations`` / ``messages`` of ``from``/``value`` turns, human / gpt) and
  content given as a list of parts are read too; any other shape refuses the file, naming it and the row.

Which schema facts were confirmed against dataset cards and which are assumed: packages/vppo-eval/README.md,
section "Benchmark schemas".
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vppo_eval.datafiles import iter_rows, load_data_file, load_data_folder
from vppo_eval.records import Record
from vppo_eval.row_readers import (
    _DYNAMATH_EXACT_TYPES,
    SHAREGPT_MESSAGE_COLUMNS,
    UnreadableRow,
    _dynamath,
    _geo3k,
    _logicvista,
    _mathverse,
    _mathvision,
    _mmk12,
    _mmmu_pro,
    _sharegpt,
    _wemath,
    is_exact_match_answer,
)
from vppo_rollout.images import SkipRow, decode_image  # decode_image: named in __all__ (the decoder items use)

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_NAMES",
    "PROTOCOLS",
    "Benchmark",
    "BenchmarkUnavailableError",
    "LoadReport",
    "SkipRow",
    "decode_image",
    "fixture_path",
    "get_benchmark",
    "is_exact_match_answer",
    "item_sha256",
    "items_sha256",
    "load_benchmark",
    "load_benchmark_report",
    "resolve_benchmark_names",
]

_FIXTURES = Path(__file__).parent / "fixtures"

# protocol -> what it means; the data form each reads is checked by `load_benchmark_report`.
PROTOCOLS: dict[str, str] = {
    "vppo": "the authors' item sets (sharegpt files of PAPO-Eval / VPPO-Eval), avg@8, temperature 1.0, top-p 1.0, "
    "2048 new tokens",
    "raw": "the benchmarks' own releases with vppo-eval's exact-match filter, same decoding",
}
# The protocol of `vppo-eval` and of `evaluate` given registry names, when none is named: the paper's item sets.
DEFAULT_PROTOCOL = "vppo"


class BenchmarkUnavailableError(RuntimeError):
    """The benchmark's data could not be loaded (offline, missing files); the message says what to place where."""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of the suite.

    name: registry key (``"mathverse"``); title: the paper's column header (``"MathVerse"``).
    hf_id / config / split: where ``datasets`` finds it on the hub.
    columns: required raw columns; each entry is a group of alternative names of which one must exist
        (``("decoded_image", "image")``).
    normalize: ``(row, index, base_dir) -> Record``; raises ``SkipRow(reason)`` for unusable rows.
    exact_match_only: keep only items whose answer passes ``is_exact_match_answer`` (the paper's filter; DynaMath's
        own ``answer_type`` decides where a row has one).
    sharegpt_names: split names / file stems of this benchmark in the authors' release, the release's own first
        (``PAPO_MMK12``: PAPO-Eval's split, its ``data/PAPO_MMK12-00000-of-00001.parquet`` and prepared
        ``papo/PAPO_MMK12.json``); later ones are other spellings still read (LLaMA-Factory's dataset names in
        PAPO-Eval's ``dataset_info.json``, vppo-eval's earlier guesses).
    release: the hub dataset of the authors' release holding it (``PAPO-Galaxy/PAPO_eval`` or
        ``chamber111/VPPO-Eval``); release_rows: its row count there (protocol ``vppo``: what a complete copy keeps;
        the report warns when a run kept another number).
    subset: raw form only: a row predicate selecting a subset (rows outside it are skipped as ``not_in_subset``).
    in_table1: one of the eight columns of the paper's Table 1 (what ``"all"`` selects).
    """

    name: str
    title: str
    hf_id: str
    config: str | None
    split: str
    columns: tuple[tuple[str, ...], ...]
    normalize: Callable[[Mapping[str, Any], int, Path | None], Record]
    exact_match_only: bool = False
    sharegpt_names: tuple[str, ...] = ()
    release: str | None = None
    release_rows: int | None = None
    subset: Callable[[Mapping[str, Any]], bool] | None = None
    in_table1: bool = True

    @property
    def fixture(self) -> Path:
        """The small local file in this benchmark's raw schema shipped for offline tests."""
        return _FIXTURES / f"{self.name}.parquet"


@dataclass
class LoadReport:
    """What ``load_benchmark_report`` read: the records kept, and how many rows were skipped, by reason."""

    benchmark: str
    source: str
    records: list[Record]
    n_rows: int
    skipped: dict[str, int] = field(default_factory=dict)
    data_form: str = "raw"
    # Rows of the authors' release (`Benchmark.release_rows`) when the data is in its sharegpt form, else None.
    expected_items: int | None = None
    # Other data dirs that also hold this benchmark and were not read (the first one given wins).
    also_in: tuple[str, ...] = ()

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def items_sha256(self) -> str:
        """`items_sha256` of the kept records: two runs scored the same items iff these agree."""
        return items_sha256(self.records)

    def summary(self) -> dict[str, Any]:
        """What a result file records about the data: source, form, rows read, items kept, skips, id hash, the
        release's row count (``expected_items``; None outside the sharegpt form) and, when other data dirs also hold
        the benchmark, those (``also_in``)."""
        return {
            "source": self.source,
            "data_form": self.data_form,
            "rows": self.n_rows,
            "items": len(self.records),
            "skipped": dict(self.skipped),
            "items_sha256": self.items_sha256(),
            "expected_items": self.expected_items,
            **({"also_in": list(self.also_in)} if self.also_in else {}),
        }


def items_sha256(records: Iterable[Record]) -> str:
    """sha256 over the items' ids, questions and answers (one "id\tquestion\tanswer" JSON line per item, sorted).

    The ids alone would not tell two item sets apart when a file has none and rows are numbered (the authors'
    sharegpt files): the question and answer make the hash name the items themselves.
    """
    import hashlib
    import json

    lines = sorted(json.dumps([str(r.id), r.question, str(r.answer)], ensure_ascii=False) for r in records)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def _image_sha256(image: Image.Image) -> str:
    """sha256 over an image's mode, size and RGB pixels.

    A loaded benchmark holds RGB images lazily opened on their encoded bytes (`vppo_rollout.images.decode_image`):
    those are decoded into a throwaway copy, so hashing does not keep every picture's pixels in memory, and the
    hash is the same whether or not the image has been loaded since (loading drops the bytes it was opened on)."""
    import hashlib
    import io

    digest = hashlib.sha256()
    fp = getattr(image, "fp", None)
    if isinstance(fp, io.BytesIO):  # lazily opened, not yet loaded
        with Image.open(io.BytesIO(fp.getvalue())) as copy:
            digest.update(f"{copy.mode} {copy.size}".encode())
            digest.update(copy.tobytes())
    else:
        digest.update(f"{image.mode} {image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def item_sha256(record: Record) -> str:
    """sha256 of one item's content: its id, question, answer and the pixels of its images, in order.

    What a resumed evaluation compares item by item (`vppo_eval.evaluate`): a stored result is reused only for the
    item it was sampled for; a changed question, answer or picture under the same id is another item."""
    import hashlib
    import json

    text = json.dumps([str(record.id), record.question, str(record.answer)], ensure_ascii=False)
    images = [_image_sha256(image) for image in record.images]
    return hashlib.sha256("\n".join([text, *images]).encode("utf-8")).hexdigest()


# The authors' two releases (protocol "vppo"), as the public preparation code reads them (zsxm1998/
# awesome-perception-aware-rlvr eval/prepare/{papo_eval,vppo_eval}.py; xhguo7/PAPO-Eval papo_eval/preprocess/
# prepare_data.py): PAPO-Eval holds six of Table 1's columns and the vision-dependent MathVerse subset, VPPO-Eval the
# two the VPPO authors added (DynaMath, MathVision). Row counts are those the preparation code checks.
PAPO_EVAL = "PAPO-Galaxy/PAPO_eval"
VPPO_EVAL = "chamber111/VPPO-Eval"

_MATHVERSE_VISION_VERSIONS = {"Vision Intensive", "Vision Dominant", "Vision Only"}


# Order = the paper's Table 1 columns.
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark(
            name="mathverse",
            title="MathVerse",
            hf_id="AI4Math/MathVerse",
            config="testmini",
            split="testmini",
            columns=(("sample_index",), ("question",), ("image",), ("answer",)),
            normalize=_mathverse,
            exact_match_only=True,
            sharegpt_names=("AI4Math_MathVerse",),
            release=PAPO_EVAL,
            release_rows=2180,
        ),
        Benchmark(
            name="dynamath",
            title="DynaMath",
            hf_id="DynaMath/DynaMath_Sample",
            config=None,
            split="sample_variant1",
            columns=(("id",), ("question",), ("ground_truth", "answer"), ("decoded_image", "image")),
            normalize=_dynamath,
            exact_match_only=True,
            sharegpt_names=("DynaMath_DynaMath_Sample", "DynaMath_DynaMath"),
            release=VPPO_EVAL,
            release_rows=3666,
        ),
        Benchmark(
            name="mmk12",
            title="MMK12",
            hf_id="FanqingM/MMK12",
            config=None,
            split="test",
            columns=(("question",), ("answer",), ("image", "images")),
            normalize=_mmk12,
            sharegpt_names=("PAPO_MMK12", "FanqingM_MMK12"),
            release=PAPO_EVAL,
            release_rows=2000,
        ),
        Benchmark(
            name="geo3k",
            title="Geo3k",
            hf_id="hiyouga/geometry3k",
            config=None,
            split="test",
            columns=(("images",), ("problem",), ("answer",)),
            normalize=_geo3k,
            sharegpt_names=("hiyouga_geometry3k",),
            release=PAPO_EVAL,
            release_rows=601,
        ),
        Benchmark(
            name="mathvision",
            title="MathVision",
            hf_id="MathLLMs/MathVision",
            config=None,
            split="test",
            columns=(("id",), ("question",), ("options",), ("answer",), ("decoded_image", "image")),
            normalize=_mathvision,
            exact_match_only=True,
            sharegpt_names=("MathLLMs_MathVision",),
            release=VPPO_EVAL,
            release_rows=2907,
        ),
        Benchmark(
            name="wemath",
            title="We-Math",
            hf_id="We-Math/We-Math",
            config=None,
            split="testmini",
            columns=(("question",), ("option",), ("answer",), ("image_path", "image")),
            normalize=_wemath,
            sharegpt_names=("We_Math", "We-Math_We-Math"),
            release=PAPO_EVAL,
            release_rows=1740,
        ),
        Benchmark(
            name="logicvista",
            title="LogicVista",
            hf_id="lscpku/LogicVista",
            config=None,
            split="test",
            columns=(("question",), ("answer",), ("image", "images", "imagename")),
            normalize=_logicvista,
            sharegpt_names=("lscpku_LogicVista",),
            release=PAPO_EVAL,
            release_rows=447,
        ),
        Benchmark(
            name="mmmu_pro",
            title="MMMU-Pro",
            hf_id="MMMU/MMMU_Pro",
            config="standard (10 options)",
            split="test",
            columns=(("id",), ("question",), ("options",), ("answer",), ("image_1",)),
            normalize=_mmmu_pro,
            sharegpt_names=("MMMU_MMMU_Pro",),
            release=PAPO_EVAL,
            release_rows=1730,
        ),
        # Not a Table 1 column: MathVerse restricted to the problem versions whose information is (partly) only in
        # the image, PAPO-Eval's "vision-dependent" file. Our raw-form reading of that subset: the problem
        # versions "Vision Intensive", "Vision Dominant" and "Vision Only".
        Benchmark(
            name="mathverse_vision",
            title="MathVerse-V",
            hf_id="AI4Math/MathVerse",
            config="testmini",
            split="testmini",
            columns=(("sample_index",), ("question",), ("image",), ("answer",), ("problem_version",)),
            normalize=_mathverse,
            exact_match_only=True,
            sharegpt_names=("AI4Math_MathVerse_vision_dependent", "AI4Math_MathVerse-vision-dependent"),
            release=PAPO_EVAL,
            release_rows=1308,
            subset=lambda row: row.get("problem_version") in _MATHVERSE_VISION_VERSIONS,
            in_table1=False,
        ),
    ]
}
# The eight columns of the paper's Table 1, in its order: what "all" selects.
BENCHMARK_NAMES: tuple[str, ...] = tuple(name for name, b in BENCHMARKS.items() if b.in_table1)

_ALIASES = {"geometry3k": "geo3k", "mathv": "mathvision", "mmmupro": "mmmu_pro", "wemath": "wemath"}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def get_benchmark(name: str) -> Benchmark:
    """The registry entry for ``name``; case, ``-`` and ``_`` are ignored (``"We-Math"``, ``"MMMU_Pro"``)."""
    if not isinstance(name, str):
        raise ValueError(f"benchmark name must be a string, got {type(name).__name__}")
    keys = {_key(b.name): b.name for b in BENCHMARKS.values()} | {_key(b.title): b.name for b in BENCHMARKS.values()}
    keys |= {_key(alias): target for alias, target in _ALIASES.items()}
    found = keys.get(_key(name))
    if found is None:
        close = difflib.get_close_matches(name.lower(), list(BENCHMARKS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}.{hint}")
    return BENCHMARKS[found]


def resolve_benchmark_names(names: str | Sequence[str]) -> list[str]:
    """``"all"`` -> the eight names in Table 1 order; ``"geo3k,We-Math"`` or a list -> registry names, validated."""
    if isinstance(names, str):
        names = [n for n in (p.strip() for p in names.split(",")) if n]
    if not names:
        raise ValueError("benchmarks must name at least one benchmark, or 'all'")
    if any(_key(n) == "all" for n in names):
        return list(BENCHMARK_NAMES)
    resolved: list[str] = []
    for n in names:
        key = get_benchmark(n).name
        if key not in resolved:
            resolved.append(key)
    return resolved


def fixture_path(name: str) -> Path:
    """The shipped fixture file of benchmark ``name`` (a few rows in its raw schema, real PNG images)."""
    return get_benchmark(name).fixture


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _unavailable(spec: Benchmark, source: str, config: str | None, split: str, err: Exception) -> Exception:
    columns = ", ".join(" | ".join(group) for group in spec.columns)
    return BenchmarkUnavailableError(
        f"could not load {spec.title} from {source!r} (config={config!r}, split={split!r}): "
        f"{type(err).__name__}: {err}\n"
        f"Offline? On a machine with network run\n"
        f"    huggingface-cli download {spec.hf_id} --repo-type dataset --local-dir DIR\n"
        f"then copy DIR here and pass it as the source (load_benchmark({spec.name!r}, source=DIR)); or pass "
        f"source=FILE, one .parquet/.jsonl file of the {split!r} split with the raw columns [{columns}]."
    )


def _open(spec: Benchmark, source: str | Path | None, split: str, config: str | None) -> tuple[Any, Path | None, str]:
    """Open the raw split as a ``datasets.Dataset``; returns (dataset, base_dir for relative image paths, label)."""
    import datasets

    if source is None:
        source = spec.hf_id
    # Resolved once, here: the folder relative image paths are joined to is absolute, so no later join (ours or
    # the image decoder's) can apply a relative folder twice, and the label names the file wherever it is read.
    path = Path(source).expanduser().resolve()
    label = str(path) if path.exists() else str(source)
    if path.is_file():
        return load_data_file(path, "train", label="source"), path.parent, label
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return _pick_split(loaded, split, label), path, label
        return _pick_split(load_data_folder(path, label="source", config=config), split, label), path, label
    if str(source).startswith((".", "/", "~")) or "\\" in str(source):
        raise ValueError(f"source {label!r} does not exist; pass an existing file or folder, or a hub id")
    try:
        return datasets.load_dataset(str(source), name=config, split=split), None, label
    except Exception as err:  # offline, unknown id, missing split: one clear message
        raise _unavailable(spec, label, config, split, err) from err


def _pick_split(loaded: Any, split: str, label: str) -> Any:
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split in loaded:
        return loaded[split]
    if len(loaded) == 1:  # a single data file: its split name says nothing about the benchmark split
        return next(iter(loaded.values()))
    raise ValueError(f"source {label!r} has splits {sorted(loaded)}, not {split!r}; pass split= one of them")


def _check_columns(spec: Benchmark, column_names: Sequence[str], label: str) -> None:
    missing = [group for group in spec.columns if not any(name in column_names for name in group)]
    if missing:
        wanted = ", ".join(" or ".join(repr(n) for n in group) for group in missing)
        raise ValueError(
            f"{spec.title} source {label!r} lacks column(s) {wanted}; it has {sorted(column_names)}. "
            f"Pass the raw {spec.hf_id} data (split {spec.split!r}) or rename the columns."
        )


def _unique_ids(records: list[Record]) -> list[Record]:
    seen: Counter[str] = Counter()
    out = []
    for rec in records:
        seen[rec.id] += 1
        if seen[rec.id] > 1:
            rec = Record(rec.id + f"#{seen[rec.id]}", rec.question, rec.images, rec.answer, rec.choices, rec.meta)
        out.append(rec)
    return out


SHAREGPT_COLUMNS = ("messages", "images")


def data_form(column_names: Sequence[str]) -> str:
    """ "sharegpt" for conversation files (a ``messages`` or ``conversations`` column), else "raw"."""
    return "sharegpt" if any(c in column_names for c in SHAREGPT_MESSAGE_COLUMNS) else "raw"


def load_benchmark_report(
    name: str,
    source: str | Path | None = None,
    limit: int | None = None,
    *,
    split: str | None = None,
    config: str | None = None,
    protocol: str | None = None,
) -> LoadReport:
    """Load benchmark ``name`` and normalise it into ``Record`` s, reporting skipped rows by reason.

    source: None (the hub id), a hub id, a local folder or a local data file (see the module docstring).
    limit: keep at most this many records (counted after skips and filtering; rows are read in order).
    split / config: override the registry's (ignored for a single local file, which holds one split).
    protocol: None reads either data form; "vppo" requires the authors' sharegpt files and "raw" a benchmark's own
        release (``PROTOCOLS``), so a number is never labelled with a protocol its items do not follow.
    Raises ValueError for an unknown benchmark, a bad argument, a missing column or data of the wrong form;
    ``BenchmarkUnavailableError`` when the data cannot be read (e.g. offline without a local copy).
    """
    spec = get_benchmark(name)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    split = split or spec.split
    config = spec.config if config is None else config
    dataset, base_dir, label = _open(spec, source, split, config)
    form = data_form(dataset.column_names)
    if protocol == "vppo" and form != "sharegpt":
        raise ValueError(
            f"{spec.title} source {label!r} is in the benchmark's own schema, but protocol 'vppo' scores the authors' "
            f"item sets: pass their sharegpt file ({' or '.join(n + '.json' for n in spec.sharegpt_names)}; see the "
            "vppo-eval README, 'Protocols'), or use protocol 'raw' for this data"
        )
    if protocol == "raw" and form != "raw":
        raise ValueError(
            f"{spec.title} source {label!r} is a sharegpt conversation file (the authors' item sets): evaluate it "
            "with protocol 'vppo', or pass the benchmark's own release for protocol 'raw'"
        )
    if form == "sharegpt":
        if "images" not in dataset.column_names:
            raise ValueError(
                f"{spec.title} source {label!r} has a conversation column but lacks 'images'; the sharegpt form this "
                f"reader follows has columns {list(SHAREGPT_COLUMNS)} (PAPO-Eval's data/dataset_info.json; "
                "'conversations' in place of 'messages' is read too)"
            )
        normalize, exact_filter, subset = _sharegpt, False, None  # the authors' items, as they are
    else:
        _check_columns(spec, dataset.column_names, label)
        normalize, exact_filter, subset = spec.normalize, spec.exact_match_only, spec.subset

    records: list[Record] = []
    skipped: Counter[str] = Counter()
    n_rows = 0
    for index, row in enumerate(iter_rows(dataset)):
        if limit is not None and len(records) >= limit:
            break
        n_rows += 1
        if subset is not None and not subset(row):
            skipped["not_in_subset"] += 1
            continue
        try:
            record = normalize(row, index, base_dir)
        except SkipRow as skip:
            skipped[skip.reason] += 1
            continue
        except UnreadableRow as err:
            schema = "the sharegpt form" if form == "sharegpt" else f"{spec.title}'s raw schema ('Benchmark schemas')"
            raise ValueError(
                f"{spec.title} source {label!r}, row {index} (counting from 0): {err}. Convert the file to {schema} "
                "as the vppo-eval README describes"
            ) from err
        if exact_filter and not _exact_match_item(record, row):
            skipped["not_exact_match"] += 1
            continue
        records.append(record)
    expected = spec.release_rows if form == "sharegpt" else None
    return LoadReport(
        spec.name, label, _unique_ids(records), n_rows, dict(skipped), data_form=form, expected_items=expected
    )


def _exact_match_item(record: Record, row: Mapping[str, Any]) -> bool:
    """The paper's exact-match filter: DynaMath's own ``answer_type`` where the row has one, else the answer's
    form (``is_exact_match_answer``)."""
    answer_type = row.get("answer_type")
    if isinstance(answer_type, str) and answer_type.strip():
        return answer_type.strip().lower() in _DYNAMATH_EXACT_TYPES
    return is_exact_match_answer(record.answer)


def load_benchmark(
    name: str,
    source: str | Path | None = None,
    limit: int | None = None,
    *,
    split: str | None = None,
    config: str | None = None,
    protocol: str | None = None,
) -> list[Record]:
    """``load_benchmark_report(...).records``: the usable items of benchmark ``name`` as ``Record`` s."""
    return load_benchmark_report(name, source, limit, split=split, config=config, protocol=protocol).records
