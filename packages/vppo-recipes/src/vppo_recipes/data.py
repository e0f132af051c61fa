"""Training data for the recipes: any `datasets` source, a column mapping, counted skips, a resumable order.

- `load_source(source, split)`: a Hugging Face hub id, a folder written by `save_to_disk`, a folder of
  parquet / jsonl / json / csv files, or one such file.
- `VisualQADataset`: the rows of that source seen through a column mapping (ViRL39K's `problem`, `answer`,
  `images` by default). A missing column is an error naming the columns present and the config key to set.
  A bad row (no image, an image that does not decode or is too large, text that is not UTF-8, an empty question or
  answer) raises `SkipRow` with its reason, in the vocabulary evaluation uses too
  (`vppo_rollout.images.SKIP_REASONS`); `ExampleStream` counts those skips and never drops a row silently. Images
  are decoded by `vppo_rollout.images.decode_image`, the decoder evaluation uses: the same picture in both.
  `extra_columns`: further columns read as they are into `Example.extra` (those a method declares with
  `Method.data_columns`, e.g. VAPO's claims); a missing one is an error naming the columns present.
- `PromptIterator`: the order rows are drawn in: a seeded permutation per epoch, position `(epoch, index)`,
  `state_dict()` / `load_state_dict()`. It depends only on `(seed, epoch, num_rows)`, so every rank that builds
  it with the same seed sees the same order and a resumed run continues exactly where it stopped.
- `ExampleStream`: `take(n)` draws the next `n` usable examples from the iterator, counting skips by reason and
  logging each skipped row with its index and source (up to `LOGGED_SKIPS_PER_REASON` per reason); its state
  (iterator position + skip counts) goes into the training checkpoint.
- `prompt_or_skip`: the recipes' chat prompt of an example; a row whose prompt cannot be built (two `<image>`
  placeholders for one image, a 10000x10 image, a prompt over max_prompt_length) is a `SkipRow` with the reason
  evaluation gives the same item (`vppo_rollout.prompts.prompt_skip_reason`), never the end of the run.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from PIL import Image

from vppo_eval.datafiles import load_data_file, load_data_folder, row_decoder
from vppo_recipes.config_schema import is_local_source
from vppo_rollout.images import SKIP_REASONS, SkipRow, decode_image
from vppo_rollout.prompts import Prompt, build_prompt, prompt_skip_reason

T = TypeVar("T")

__all__ = [
    "DEFAULT_COLUMNS",
    "Example",
    "ExampleStream",
    "PromptIterator",
    "SkipRow",
    "VisualQADataset",
    "build_response",
    "load_source",
    "prompt_or_skip",
    "rank_slice",
]

# Skipped rows logged one by one per reason (a dataset with thousands of too-long prompts would flood the log);
# every skip is counted in the metrics (total/skipped_rows/<reason>) whatever this is.
LOGGED_SKIPS_PER_REASON = 20

# Role -> column name. ViRL39K (chamber111/VPPO_ViRL39K_train) uses these names.
DEFAULT_COLUMNS: dict[str, str] = {"question": "problem", "answer": "answer", "images": "images"}


@dataclass
class Example:
    """One usable training row. `images`: decoded RGB PIL images, at least one. `row`: index in the source."""

    row: int
    question: str
    answer: str
    images: list[Image.Image]
    response: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the `extra_columns`' cells, by column name


def load_source(source: str | os.PathLike, split: str):
    """Load split `split` of a `datasets` source -> `datasets.Dataset`.

    `source` is tried as, in order: a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`; a
    data file (.parquet, .jsonl, .json, .csv, .arrow), loaded as split `split`; a folder of data files (split names
    taken from the file names, as `datasets.load_dataset(folder)` does); otherwise a hub id. Raises ValueError naming
    `data.source` / `data.split` when the source or split does not exist.
    """
    import datasets

    path = Path(source).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        return _pick_split(loaded, split, source)
    if path.is_file():
        return load_data_file(path, split, label="data.source")
    if path.is_dir():
        return _pick_split(load_data_folder(path, label="data.source"), split, source)
    if is_local_source(source):
        # Spelled like a path (not the hub's "owner/name" form), and not on disk: a local path that does not exist.
        raise ValueError(f"data.source={str(source)!r} does not exist (looked for a local folder or file)")
    try:
        return datasets.load_dataset(str(source), split=split)
    except (FileNotFoundError, ConnectionError) as e:  # not on the hub, or the hub is offline / unreachable
        raise ValueError(
            f"data.source={str(source)!r} is neither a local folder/file (looked at {path.resolve()}) nor a "
            f"reachable hub dataset: {type(e).__name__}: {e}"
        ) from e


def _pick_split(loaded, split: str, source) -> Any:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(
                f"data.split={split!r} not found in data.source={str(source)!r}; available splits: {list(loaded)}"
            )
        return loaded[split]
    return loaded


def build_response(answer: str, template: str) -> str:
    """Target text for SFT: `template` with the literal `{answer}` replaced by `answer` (other braces kept).

    e.g. template "<think>…</think> \\boxed{{answer}}" and answer "3" -> "<think>…</think> \\boxed{3}".
    """
    if "{answer}" not in template:
        raise ValueError(f"data.response_template must contain the literal '{{answer}}', got {template!r}")
    return template.replace("{answer}", answer)


class VisualQADataset:
    """Rows of a `datasets.Dataset` read through a column mapping.

    Args:
        dataset: a `datasets.Dataset` (one split).
        columns: role -> column name for "question", "answer", "images" and optionally "response" (None: unused).
        config_key: the config key of the mapping, named in errors ("data.columns").
        base_dir: folder that relative image paths are resolved against (a local source's folder).
        source: what the rows came from, named in errors about the whole dataset (`from_source` sets it).
        extra_columns: columns kept as they are in `Example.extra` (a method's `data_columns`);
        needed_by: who needs them, named in the error when one is missing (e.g. "algorithm vapo").
    Raises:
        ValueError: a mapped or extra column is missing; the message names the columns present and the fix.
    """

    def __init__(
        self,
        dataset,
        columns: Mapping[str, str | None] | None = None,
        *,
        config_key: str = "data.columns",
        base_dir: str | os.PathLike | None = None,
        source: str | None = None,
        extra_columns: tuple[str, ...] = (),
        needed_by: str = "",
    ) -> None:
        self.columns = {**DEFAULT_COLUMNS, **dict(columns or {})}
        present = list(dataset.column_names)
        missing = [name for name in extra_columns if name not in present]
        if missing:
            more = f" (and {len(missing) - 1} more of the {len(extra_columns)} it reads)" if len(missing) > 1 else ""
            raise ValueError(
                f"{needed_by or 'the method'} needs the dataset column {missing[0]!r}{more}, which "
                f"{source or 'the dataset'} lacks; columns present: {present}. Use a dataset with those columns, "
                "or choose another algorithm"
            )
        self.extra_columns = tuple(extra_columns)
        for role, name in self.columns.items():
            if name is None:
                continue
            if name not in present:
                raise ValueError(
                    f"column {name!r} (the {role} column) is not in the dataset; columns present: {present}. "
                    f"Set {config_key}.{role}=<one of those columns>"
                )
        self.dataset = dataset
        self._rows = dataset.with_format("arrow")
        self._decode = row_decoder(dataset.features)  # rows read as written: Json (mixed-type) cells decoded
        self.base_dir = Path(base_dir).expanduser().resolve() if base_dir is not None else None
        self.source = source  # named in errors about the whole dataset

    @classmethod
    def from_source(
        cls, source: str | os.PathLike, split: str, columns: Mapping[str, str | None] | None = None, **kw: Any
    ) -> VisualQADataset:
        """`load_source(source, split)` viewed through `columns`."""
        base_dir = Path(source) if Path(source).is_dir() else Path(source).parent if Path(source).is_file() else None
        return cls(load_source(source, split), columns, base_dir=base_dir, source=f"{source} (split {split})", **kw)

    def __len__(self) -> int:
        return len(self.dataset)

    def example(self, row: int) -> Example:
        """Row `row` as an `Example`; raises `SkipRow` when the row cannot be used (reasons: missing_image,
        undecodable_image, image_too_large, undecodable_text, empty_question, empty_answer, empty_response)."""
        try:
            # Through the Arrow format: image cells stay {"bytes", "path"} (datasets would decode them with PIL
            # and raise on a decompression bomb before we could count it), texts come back as str; a field that
            # mixes numbers and text is a `Json` column there, decoded back to what the file holds.
            record = self._decode(self._rows[int(row)].to_pylist()[0])
        except UnicodeDecodeError as e:
            raise SkipRow("undecodable_text", f"row {row}: {e}") from e
        cols = self.columns
        question = _text(record[cols["question"]], row, "question")
        answer = _text(record[cols["answer"]], row, "answer")
        if not question.strip():
            raise SkipRow("empty_question", f"row {row}")
        if not answer.strip():
            raise SkipRow("empty_answer", f"row {row}")
        raw_images = record[cols["images"]]
        if raw_images is None:
            raw_images = []
        elif not isinstance(raw_images, (list, tuple)):
            raw_images = [raw_images]
        if not raw_images or any(v is None for v in raw_images):
            raise SkipRow("missing_image", f"row {row}")
        images = [
            decode_image(v, base_dir=self.base_dir, label=f"row {row} image {i}") for i, v in enumerate(raw_images)
        ]
        response = None
        if cols.get("response") is not None:
            response = _text(record[cols["response"]], row, "response")
            if not response.strip():
                raise SkipRow("empty_response", f"row {row}")
        extra = {name: record[name] for name in self.extra_columns}
        return Example(
            row=int(row), question=question, answer=answer.strip(), images=images, response=response, extra=extra
        )


def _text(value: Any, row: int, role: str) -> str:
    """A text cell as str: None is empty, bytes must be UTF-8, a number is its text; a list or an object (a JSON
    field that holds one in this row, decoded by `row_decoder`) has no text: the row is skipped as undecodable_text,
    never read as its Python repr (an answer `['3', '4']` would score 0 on every response)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, Mapping)):
        raise SkipRow(
            "undecodable_text", f"row {row} {role}: holds a {type(value).__name__}, not text: {str(value)[:80]}"
        )
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise SkipRow("undecodable_text", f"row {row} {role}: {e}") from e
    return str(value)


def prompt_or_skip(processor, example: Example, *, max_prompt_length: int) -> Prompt:
    """The chat prompt of `example` (`build_prompt`, the recipes' system prompt and instruction), or raise
    `SkipRow(reason, detail)` when it cannot be built: the reason is what evaluation counts for the same item
    (`prompt_skip_reason`: bad_prompt, prompt_too_long, an image's own reason), the detail names the row and why."""
    try:
        return build_prompt(processor, example.question, example.images, max_prompt_length=max_prompt_length)
    except ValueError as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SkipRow(prompt_skip_reason(err), f"row {example.row}: {first_line}") from err


class PromptIterator:
    """Deterministic, resumable order over `num_rows` rows: a seeded permutation per epoch.

    Position `(epoch, index)`: the next row is `order(epoch)[index]`. `order(epoch)` is
    `numpy.random.default_rng([seed, epoch]).permutation(num_rows)` when `shuffle`, else `arange(num_rows)`, so
    it depends only on `(seed, epoch, num_rows, shuffle)`: every rank built with the same arguments yields the same
    rows, and `load_state_dict(state_dict())` continues exactly where the saved iterator was.
    """

    def __init__(self, num_rows: int, *, seed: int, shuffle: bool = True) -> None:
        if num_rows <= 0:
            raise ValueError(f"num_rows must be > 0 (the dataset is empty), got {num_rows}")
        self.num_rows = int(num_rows)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.index = 0
        self._order_epoch = -1
        self._order = np.arange(0)

    def order(self, epoch: int) -> np.ndarray:
        """Row order of epoch `epoch`: [num_rows] int64."""
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def __iter__(self) -> PromptIterator:
        return self

    def __next__(self) -> int:
        if self.index >= self.num_rows:
            self.epoch += 1
            self.index = 0
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.order(self.epoch), self.epoch
        row = int(self._order[self.index])
        self.index += 1
        return row

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "num_rows": self.num_rows,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "index": self.index,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a position saved by `state_dict()`; the dataset size, seed and shuffle flag must match."""
        for key in ("num_rows", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data order: the checkpoint has {key}={state[key]!r}, this run has "
                    f"{key}={getattr(self, key)!r} (did data.source, data.split, seed or data.shuffle change?)"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class ExampleStream(Generic[T]):
    """Draw usable examples in `PromptIterator` order, counting skipped rows by reason.

    `prepare(example) -> T` turns each usable example into what the recipe consumes (e.g. the RL recipe's chat
    prompt); it raises `SkipRow(reason)` to skip the row, counted under that reason like the dataset's own skips.
    `take` returns the prepared values, so nothing is kept on the side between drawing and using. If a whole pass
    over the dataset yields no usable row, raises ValueError rather than loop.
    """

    def __init__(
        self,
        dataset: VisualQADataset,
        *,
        seed: int,
        shuffle: bool = True,
        prepare: Callable[[Example], T] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.dataset = dataset
        self.iterator = PromptIterator(len(dataset), seed=seed, shuffle=shuffle)
        self.prepare = prepare
        self.log = log
        self.skipped: Counter[str] = Counter()
        self.drawn = 0
        self._logged: Counter[str] = Counter()  # skips logged so far per reason (this process; not checkpointed)

    @property
    def epoch(self) -> int:
        """Epochs completed so far (the epoch of the next row to draw)."""
        it = self.iterator
        return it.epoch + (1 if it.index >= it.num_rows else 0)

    def take(self, n: int) -> list[T]:
        """The next `n` usable examples, prepared (the same on every rank)."""
        out: list[T] = []
        misses = 0
        while len(out) < n:
            row = next(self.iterator)
            self.drawn += 1
            try:
                example = self.dataset.example(row)
                prepared = self.prepare(example) if self.prepare is not None else example
            except SkipRow as skip:
                self.skipped[skip.reason] += 1
                self._log_skip(row, skip)
                misses += 1
                if misses >= len(self.dataset):
                    raise ValueError(
                        f"no usable row in a full pass over {self.dataset.source or 'the dataset'} "
                        f"({len(self.dataset)} rows); "
                        f"skips so far: {dict(self.skipped)}"
                    ) from None
                continue
            misses = 0
            out.append(prepared)
        return out

    def _log_skip(self, row: int, skip: SkipRow) -> None:
        """One line naming the row, the source and why, for the first `LOGGED_SKIPS_PER_REASON` skips per reason."""
        if self.log is None or self._logged[skip.reason] >= LOGGED_SKIPS_PER_REASON:
            return
        self._logged[skip.reason] += 1
        source = self.dataset.source or "the dataset"
        more = (
            f" (further {skip.reason} skips are only counted: total/skipped_rows/{skip.reason})"
            if self._logged[skip.reason] == LOGGED_SKIPS_PER_REASON
            else ""
        )
        self.log(f"skipped row {row} of {source}: {skip.reason}: {skip.detail or SKIP_REASONS[skip.reason]}{more}")

    def state_dict(self) -> dict[str, Any]:
        return {"iterator": self.iterator.state_dict(), "skipped": dict(self.skipped), "drawn": self.drawn}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.iterator.load_state_dict(state["iterator"])
        self.skipped = Counter({str(k): int(v) for k, v in state["skipped"].items()})
        self.drawn = int(state["drawn"])


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """Contiguous slice of `n` items owned by `rank`; `n` must divide evenly (every rank does equal work)."""
    if n % world_size != 0:
        raise ValueError(f"{n} items cannot be split evenly over {world_size} ranks; use a multiple of {world_size}")
    per = n // world_size
    return slice(rank * per, (rank + 1) * per)
