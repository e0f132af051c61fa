"""Prove that vppo-core needs nothing but torch at run time.

Run by ``nox -s tests_core`` (``python packages/vppo-core/tests/check_runtime_deps.py``) in a venv where only
vppo-core (with its test extra) and torch are installed. Three checks, each printing what it saw:

1. the installed distribution ``vppo-core`` declares exactly one runtime requirement (no ``extra ==`` marker),
   torch — and so does the checkout's ``pyproject.toml`` when it can be read;
2. no module of the ``vppo_core`` source imports anything but the standard library, torch and vppo_core itself —
   read from the syntax tree, so imports inside functions count too;
3. ``import vppo_core`` works, and after ``import torch`` it loads no top-level module outside the standard library
   and the distributions its runtime requirements pull in (torch and torch's own requirements).

Exit status 0 when all hold, 1 otherwise (with the offending names).
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

DIST = "vppo-core"
PACKAGE = "vppo_core"
ALLOWED_REQUIREMENTS = {"torch"}
ALLOWED_IMPORTS = {"torch", PACKAGE}
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def requirement_name(requirement: str) -> str:
    """``"torch>=2.6; python_version>'3'"`` -> ``"torch"`` (PEP 503-normalised)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def runtime_requirements(requires: list[str] | None) -> set[str]:
    """Names of the requirements that are not behind an ``extra == ...`` marker."""
    names = set()
    for req in requires or []:
        marker = req.split(";", 1)[1] if ";" in req else ""
        if re.search(r"\bextra\s*==", marker):
            continue
        names.add(requirement_name(req))
    return names


def imported_top_level(source: str) -> set[str]:
    """Top-level module names imported anywhere in ``source`` (relative imports excluded)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def foreign_imports(src_dir: Path) -> dict[str, list[str]]:
    """``{module: [files]}`` for imports that are neither stdlib nor in ``ALLOWED_IMPORTS``."""
    found: dict[str, list[str]] = {}
    for path in sorted(src_dir.rglob("*.py")):
        for name in imported_top_level(path.read_text(encoding="utf-8")):
            if name not in sys.stdlib_module_names and name not in ALLOWED_IMPORTS and name != "__future__":
                found.setdefault(name, []).append(path.name)
    return found


def requirement_closure(roots: set[str]) -> set[str]:
    """The installed distributions reachable from ``roots`` through runtime requirements (what pip pulls in)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo.extend(runtime_requirements(importlib.metadata.requires(name)))
        except importlib.metadata.PackageNotFoundError:
            pass  # a requirement whose environment marker excluded it here
    return seen


def modules_added_by_import(package: str, allowed_distributions: set[str]) -> set[str]:
    """Import torch, then ``package``; return the new top-level modules that are neither stdlib, nor ``package``,
    nor provided by one of ``allowed_distributions``."""
    import torch  # noqa: F401  (what torch itself loads is torch's business; only what comes after counts)

    before = {name.split(".")[0] for name in sys.modules}
    importlib.import_module(package)
    after = {name.split(".")[0] for name in sys.modules}
    owners = importlib.metadata.packages_distributions()
    foreign = set()
    for name in after - before:
        if name in sys.stdlib_module_names or name == package or name.startswith("_"):
            continue
        if not {requirement_name(d) for d in owners.get(name, [])} & allowed_distributions:
            foreign.add(name)
    return foreign


def pyproject_requirements(path: Path) -> set[str] | None:
    """Runtime requirement names of the checkout's pyproject.toml, or None without tomllib (Python < 3.11)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        return None
    if not path.is_file():
        return None
    project = tomllib.loads(path.read_text(encoding="utf-8"))["project"]
    return {requirement_name(r) for r in project.get("dependencies", [])}


def main() -> int:
    problems = []

    declared = runtime_requirements(importlib.metadata.requires(DIST))
    print(f"[1] {DIST} declares runtime requirements: {sorted(declared)}")
    if declared != ALLOWED_REQUIREMENTS:
        problems.append(f"runtime requirements are {sorted(declared)}, expected exactly {sorted(ALLOWED_REQUIREMENTS)}")
    in_checkout = pyproject_requirements(PYPROJECT)
    if in_checkout is not None:
        print(f"[1] {PYPROJECT} lists: {sorted(in_checkout)}")
        if in_checkout != ALLOWED_REQUIREMENTS:
            problems.append(
                f"{PYPROJECT} dependencies are {sorted(in_checkout)}, expected {sorted(ALLOWED_REQUIREMENTS)}"
            )

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        problems.append(f"{PACKAGE} is not importable")
    else:
        src_dir = Path(spec.origin).parent
        foreign = foreign_imports(src_dir)
        print(f"[2] imports in {src_dir} beyond stdlib/torch/{PACKAGE}: {foreign or 'none'}")
        if foreign:
            problems.append(f"{PACKAGE} source imports {foreign}")
        closure = requirement_closure(declared)
        print(f"[3] distributions a plain install pulls in (runtime closure): {sorted(closure)}")
        try:
            added = modules_added_by_import(PACKAGE, closure)
        except Exception as exc:  # report any import failure as a finding, not a traceback
            problems.append(f"import {PACKAGE} failed: {type(exc).__name__}: {exc}")
        else:
            print(f"[3] import {PACKAGE} works; modules it loads from outside that closure: {sorted(added) or 'none'}")
            if added:
                problems.append(f"import {PACKAGE} loads {sorted(added)}, which no runtime requirement provides")

    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if not problems:
        print(f"OK: {DIST} needs only torch at run time")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
