"""The house rules of ARCHITECTURE.md, checked: imports point down the floors
``flows -> tasks -> infra -> pairx_core``, tasks modules do not import each other, and the core
imports no storage, orchestration or cluster library.

Every ``import`` statement counts, including those inside functions (lazy imports).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the floors, lowest first; a module may import its own floor and the ones below
FLOORS = ("pairx_core", "infra", "tasks", "flows")
#: libraries the pure-compute floor must not import
NOT_IN_CORE = ("fsspec", "s3fs", "gcsfs", "prefect", "prefect_dask", "dask", "distributed", "zarr")


@dataclass(frozen=True)
class Import:
    """One imported module, as written in ``source`` at ``line``."""

    source: str  # importing module, dotted
    target: str  # imported module, dotted (``from a import b`` gives ``a.b`` when that is a module)
    line: int


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the floors under ``root``."""
    found = {}
    for floor in FLOORS:
        for path in sorted((root / floor).rglob("*.py")):
            found[module_name(root, path)] = path
    return found


def imports_of(root: Path, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import in ``path`` (top level and inside functions), relative ones resolved."""
    source = module_name(root, path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(source, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            for alias in node.names:
                child = f"{parent}.{alias.name}"
                found.append(Import(source, child if child in modules else parent, node.lineno))
    return found


def floor_of(module: str) -> int | None:
    top = module.split(".")[0]
    return FLOORS.index(top) if top in FLOORS else None


def import_violations(root: Path) -> list[str]:
    """Readable violations of the import rules in the tree at ``root`` (empty when it keeps them)."""
    modules = project_modules(root)
    problems = []
    for name, path in modules.items():
        where = path.relative_to(root)
        for imported in imports_of(root, path, modules):
            here, there = floor_of(name), floor_of(imported.target)
            at = f"{where}:{imported.line} imports {imported.target}"
            if there is None:
                if here == 0 and imported.target.split(".")[0] in NOT_IN_CORE:
                    problems.append(f"{at}: pairx_core is pure compute")
                continue
            if not any(m == imported.target or m.startswith(imported.target + ".") for m in modules):
                problems.append(f"{at}: no such module")
            elif there > here:
                problems.append(f"{at}: {FLOORS[here]} may not import {FLOORS[there]} (imports point down)")
            elif here == there == FLOORS.index("tasks") and imported.target != "tasks" and \
                    imported.target.split(".")[:2] != name.split(".")[:2]:
                problems.append(f"{at}: tasks modules do not import each other (share through infra)")
    return problems


def test_the_code_keeps_the_import_rules():
    assert import_violations(ROOT) == []


def test_the_checker_reports_a_back_import_a_sideways_import_and_an_impure_core(tmp_path):
    files = {
        "pairx_core/__init__.py": "",
        "pairx_core/engine.py": "import torch\n\ndef run():\n    import fsspec\n",
        "infra/__init__.py": "",
        "infra/storage.py": "from pairx_core.engine import run\n",
        "infra/images.py": "def load():\n    from tasks.embed import embed  # a back import, hidden in a function\n",
        "tasks/__init__.py": "",
        "tasks/embed.py": "from infra.storage import run\n\ndef embed():\n    pass\n",
        "tasks/explain.py": "from .embed import embed\nfrom infra.gone import thing\n",
        "flows/__init__.py": "",
        "flows/nightly.py": "from tasks.embed import embed\nfrom tasks import explain\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert sorted(import_violations(tmp_path)) == [
        "infra/images.py:2 imports tasks.embed: infra may not import tasks (imports point down)",
        "pairx_core/engine.py:4 imports fsspec: pairx_core is pure compute",
        "tasks/explain.py:1 imports tasks.embed: tasks modules do not import each other (share through infra)",
        "tasks/explain.py:2 imports infra.gone: no such module",
    ]


def test_every_core_module_imports_without_storage_or_orchestration_libraries():
    """Imported for real (not only read): nothing the core pulls in at import time loads them."""
    code = (
        "import importlib, pkgutil, sys, pairx_core\n"
        "names = [m.name for m in pkgutil.walk_packages(pairx_core.__path__, 'pairx_core.')]\n"
        "for name in names: importlib.import_module(name)\n"
        f"bad = [m for m in {NOT_IN_CORE!r} if m in sys.modules]\n"
        "print(len(names), ','.join(bad))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    count, bad = (done.stdout.strip().splitlines()[-1].split(" ") + [""])[:2]
    assert bad == ""
    assert int(count) == len([m for m in project_modules(ROOT) if m.startswith("pairx_core.")])


# ---------------------------------------------------------------------- storage in one place
#: the one module that may use fsspec's private methods and spell the output folders
STORAGE_MODULE = "infra/storage.py"
#: folder names of an output root (``infra.storage.OutputLayout``); "cache" is left out (the word
#: names the activation cache itself in many messages), and a bare "report" too (a command and a
#: summary key): those two count only as path segments
OUTPUT_FOLDERS = ("tables", "viz", "report", "_pairx")
#: a folder name as a path segment: after or before a slash (``f"{out}/tables"``, ``"viz/a.png"``)
_FOLDER_SEGMENT = re.compile(r"/(?:%s)(?![\w.-])|(?<![\w.-])(?:%s)/" % (("|".join(OUTPUT_FOLDERS),) * 2))


def _private_fsspec_names() -> set[str]:
    import fsspec

    base = fsspec.AbstractFileSystem
    return {name for name in dir(base)
            if name.startswith("_") and not name.startswith("__") and callable(getattr(base, name))}


def _path_positions(tree: ast.AST) -> set[int]:
    """``id`` of string constants used as a location: a call's positional argument
    (``target.exists("tables")``) or an element of a tuple/list looped over or tested with ``in``.
    A bare word elsewhere (a dict key such as ``summary["tables"]``) is not a folder."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            found |= {id(arg) for arg in node.args}
        groups = [node.iter] if isinstance(node, ast.For) else node.comparators if isinstance(node, ast.Compare) else []
        for group in groups:
            if isinstance(group, (ast.Tuple, ast.List, ast.Set)):
                found |= {id(element) for element in group.elts}
    return found


def _docstrings(tree: ast.AST) -> set[int]:
    """``id`` of every docstring constant (module, class, function): prose, not code."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def storage_violations(root: Path, private_names: set[str]) -> list[str]:
    """Modules other than :data:`STORAGE_MODULE` that call fsspec's private methods (``_strip_protocol``,
    ...) or spell an output folder in a string (docstrings aside)."""
    problems = []
    for path in project_modules(root).values():
        where = path.relative_to(root).as_posix()
        if where == STORAGE_MODULE:
            continue
        tree = ast.parse(path.read_text(), str(path))
        prose, locations = _docstrings(tree), _path_positions(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in private_names:
                problems.append(f"{where}:{node.lineno} uses {node.attr}: fsspec internals (StorageTarget.raw_path)")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
                text = node.value
                bare = text in ("tables", "viz", "_pairx") and id(node) in locations
                if bare or _FOLDER_SEGMENT.search(text):
                    problems.append(f"{where}:{node.lineno} spells an output folder in {text!r} (OutputLayout)")
    return problems


def test_storage_internals_and_output_folders_live_in_the_storage_module():
    assert storage_violations(ROOT, _private_fsspec_names()) == []


def test_the_storage_checker_reports_private_fsspec_calls_and_folder_strings(tmp_path):
    files = {
        "infra/__init__.py": "",
        "infra/storage.py": "def raw(fs, url):\n    return fs._strip_protocol(url) + '/tables'\n",
        "infra/gc.py": ('"""Cleans OUT/tables/ and OUT/viz/ (prose is fine)."""\n'
                        "def clean(fs, target):\n    return fs.find(fs._strip_protocol(target.url('viz')))\n"),
        "flows/__init__.py": "",
        "flows/console.py": ("def line(out, summary):\n"
                             "    return f'tables: {out}/tables', summary['report'], 'report: done'\n"),
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert sorted(storage_violations(tmp_path, _private_fsspec_names())) == [
        "flows/console.py:2 spells an output folder in '/tables' (OutputLayout)",
        "infra/gc.py:3 spells an output folder in 'viz' (OutputLayout)",
        "infra/gc.py:3 uses _strip_protocol: fsspec internals (StorageTarget.raw_path)",
    ]
