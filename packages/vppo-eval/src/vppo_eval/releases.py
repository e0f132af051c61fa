"""The authors' evaluation data as it ships: where a benchmark's file is in a downloaded release, and where its images are.

Two releases hold protocol ``vppo``'s items (read with the public code that prepares them: zsxm1998/
awesome-perception-aware-rlvr ``eval/prepare/{papo_eval,vppo_eval}.py`` and xhguo7/PAPO-Eval
``papo_eval/preprocess/prepare_data.py``); three layouts of them are read:

- ``chamber111/VPPO-Eval`` (DynaMath, MathVision), a LLaMA-Factory ``data/`` folder::

      ROOT/data/vppo/<name>.json                 a JSON list of {messages, images}
      ROOT/data/images/<name>/<file>.png

- ``PAPO-Galaxy/PAPO_eval``'s hub snapshot (the other six of Table 1, and MathVerse's vision-dependent subset)::

      ROOT/data/<split>-00000-of-00001.parquet   messages, images, id
      ROOT/<zip>.zip                             one image zip per split (hiyouga_geometry3k_images.zip, ...)

- the ``DATA`` folder PAPO-Eval's ``prepare_data.py`` writes from it (``--output_dir DATA``)::

      DATA/papo/<split>.json                     the split's rows without ``id``
      DATA/images/<folder>/<file>.png            the zip extracted (--auto_unzip), or DATA/<zip>.zip when not

Image paths inside every layout are LLaMA-Factory's, relative to the release's root: ``./data/images/<folder>/
<file>.png``. The data file sits one (parquet, ``papo/``) or two (``data/vppo/``) folders below that root, and a
``DATA`` folder that is not named ``data`` holds ``images/...`` itself, so `resolve_image` tries, in this order:
the data file's folder, its parent and its grandparent, each with the path as written and with its leading
``data/`` removed; then the zips (``*.zip``) in those same folders, nearest first and by name, read in place (no
extraction needed). The first existing file wins, so the order is the rule.
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = ["SEARCH_FOLDERS", "candidate_files", "folder_holdings", "resolve_image", "split_parquet"]

# Where a data dir may hold sharegpt JSON files, relative to it: a prepared DATA folder (papo/), the VPPO-Eval
# snapshot's data folder (vppo/) and the same two under data/ for a snapshot root given whole.
SEARCH_FOLDERS = (".", "papo", "vppo", "data", "data/papo", "data/vppo")
# Where a data dir may hold the hub's parquet shards: the snapshot root's data/, or the data/ folder itself.
PARQUET_FOLDERS = ("data", ".")


def split_parquet(split: str) -> str:
    """The hub's file name of a one-shard split: ``"We_Math"`` -> ``"We_Math-00000-of-00001.parquet"``."""
    return f"{split}-00000-of-00001.parquet"


def candidate_files(root: Path, stems: tuple[str, ...]) -> list[Path]:
    """Every file a benchmark with split names / file stems ``stems`` may be in under data dir ``root``, in the
    order they are tried: ``<folder>/<stem>.json`` for the `SEARCH_FOLDERS`, then ``<folder>/<stem>-00000-of-
    00001.parquet`` for the `PARQUET_FOLDERS`; each folder with every stem before the next folder."""
    paths = [root / folder / f"{stem}.json" for folder in SEARCH_FOLDERS for stem in stems]
    paths += [root / folder / split_parquet(stem) for folder in PARQUET_FOLDERS for stem in stems]
    return paths


def folder_holdings(root: Path, limit: int = 40) -> list[str]:
    """What data dir ``root`` holds that the reader could mean, as paths relative to it: the ``.json`` files of the
    `SEARCH_FOLDERS` (not ``dataset_info.json``), the ``.parquet`` files of the `PARQUET_FOLDERS` and the ``.zip``
    files beside them, sorted; at most ``limit`` (then a count of the rest). For an error naming what is there."""
    found: set[str] = set()
    for folder in {*SEARCH_FOLDERS, *PARQUET_FOLDERS}:
        where = root / folder
        if not where.is_dir():
            continue
        for path in where.iterdir():
            if (
                path.is_file()
                and path.suffix.lower() in (".json", ".parquet", ".zip")
                and path.name != ("dataset_info.json")
            ):
                found.add(path.relative_to(root).as_posix())
    shown = sorted(found)
    return shown[:limit] + ([f"... and {len(shown) - limit} more"] if len(shown) > limit else [])


def _relative_forms(value: str) -> list[str]:
    """A LLaMA-Factory image path in the forms tried against each root: ``./data/images/g/1.png`` ->
    ``["data/images/g/1.png", "images/g/1.png"]``; a path without ``data/`` -> itself alone."""
    text = value.strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return [text, text[len("data/") :]] if text.startswith("data/") else [text]


def _roots(base_dir: Path) -> list[Path]:
    """The data file's folder, its parent and its grandparent: where a release's root can be."""
    return [base_dir, *list(base_dir.parents)[:2]]


# zip path -> (its (mtime, size) when indexed, the open archive, member by "folder/file" tail, members by file name)
_ZIPS: dict[Path, tuple[tuple[int, int], zipfile.ZipFile, dict[str, str], dict[str, list[str]]]] = {}


def _zip_index(path: Path) -> tuple[zipfile.ZipFile, dict[str, str], dict[str, list[str]]]:
    """The open archive at ``path`` and two indexes of its files: by their last two path parts (``g/1.png``, the
    folder and file of an image path, whatever top folder the zip adds) and by file name. Opened once per file and
    version: a 1.5 GB zip's directory is read once, not once per image."""
    stat = path.stat()
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _ZIPS.get(path)
    if cached is None or cached[0] != key:
        archive = zipfile.ZipFile(path)
        tails: dict[str, str] = {}
        names: dict[str, list[str]] = {}
        for info in archive.infolist():
            if info.is_dir():
                continue
            parts = PurePosixPath(info.filename).parts
            tails.setdefault("/".join(parts[-2:]), info.filename)  # the first of equal tails, in the zip's order
            names.setdefault(parts[-1], []).append(info.filename)
        cached = (key, archive, tails, names)
        _ZIPS[path] = cached
    return cached[1], cached[2], cached[3]


def _from_zips(relative: str, roots: list[Path]) -> dict[str, Any] | None:
    """``{"bytes", "path"}`` of image ``relative`` (``data/images/<folder>/<file>``) read out of a zip in ``roots``,
    or None. A zip member matches by its last two parts (``<folder>/<file>``); a zip with no folders (every image
    at its top) matches by file name, only when the zip is this folder's (its name starts with ``<folder>``) and
    holds one such file."""
    parts = PurePosixPath(relative).parts
    tail, folder, name = "/".join(parts[-2:]), (parts[-2] if len(parts) > 1 else ""), parts[-1]
    for root in roots:
        for path in sorted(root.glob("*.zip")) if root.is_dir() else []:
            try:
                archive, tails, names = _zip_index(path)
            except (OSError, zipfile.BadZipFile):
                continue  # not an image zip we can read: the image stays missing and is counted
            member = tails.get(tail)
            if member is None and folder and path.name.startswith(folder) and len(names.get(name, [])) == 1:
                member = names[name][0]
            if member is not None:
                return {"bytes": archive.read(member), "path": f"{path}/{member}"}
    return None


def resolve_image(value: Any, base_dir: Path | None) -> Any:
    """A relative image path of a data file in ``base_dir`` -> an absolute path, or ``{"bytes", "path"}`` read out
    of a release's zip; anything else (a cell that is not a path, an absolute path, a path found nowhere) is
    returned as is, so the decoder counts it (``missing_image``). Tried in order (module docstring): next to the
    data file and in its ``images/`` folder (LogicVista's and DynaMath's GitHub releases), then the release root
    candidates, then their zips."""
    if not isinstance(value, str) or base_dir is None or not value.strip() or Path(value).is_absolute():
        return value
    roots = _roots(base_dir)
    forms = _relative_forms(value)
    candidates = [base_dir / value, base_dir / "images" / value]
    candidates += [root / form for root in roots for form in forms]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.resolve())
    return _from_zips(forms[0], roots) or value
