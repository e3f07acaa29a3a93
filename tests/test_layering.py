"""The package's rooms import downward only.

Every ``import`` of every module under ``src/atprune`` (function-level imports included) is read from its source
with :mod:`ast` and checked against ``ALLOWED``: a room may import itself and what its line lists, nothing else.
Run ``python -m pytest tests/test_layering.py -q`` to check it; the failure message names the module, the line and the
import that runs back up.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "atprune"

BASE = {"errors", "atomic"}
# room -> rooms (or dotted modules) it may import; lower rooms first
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "torchvision_compat": set(),
    "atomic": {"errors"},
    "plotting": BASE,
    "registry": BASE,
    "sparse": BASE,  # inference must not need the pruning side
    "models": BASE,
    "data": BASE,
    "engine": BASE | {"models"},
    "pruners": BASE | {"registry", "engine.stats"},  # the statistics they read, never the passes
    "allocators": BASE | {"registry"},  # pure: no model, no engine
    "quant": BASE | {"engine.stats", "pruners"},  # tensor functions over one layer; never the passes
    "eval": BASE | {"data", "models"},
    "export": BASE | {"models", "eval"},
    "allocation": BASE | {"models", "engine", "allocators"},
    # vision-language models: layouts, image-text pairs, caption check; checksums of the dense parts
    "multimodal": BASE | {"models", "export.files", "torchvision_compat"},
    "api": BASE | {"data", "models", "engine", "pruners", "allocators", "allocation", "eval", "multimodal.pairs",
                   "quant"},
    "jobs": BASE | {"plotting", "data", "models", "engine", "pruners", "allocators", "allocation", "eval", "export",
                    "api", "multimodal", "quant"},
    # image classifiers: their adapter and data over the shared engine, pruners, allocators and search strategies
    "vision": BASE | {"torchvision_compat", "models.sources", "engine", "pruners", "allocators", "allocation", "api",
                      "export", "jobs.strategies"},
    # several processes: data-parallel calibration through the engine's ``collect`` hook and split layer solves
    # through the block pruner's ``share`` hook; prune, search and compare jobs under torchrun
    "distributed": BASE | {"engine", "models.sources", "jobs.prune", "jobs.search", "jobs.compare", "export.files"},
    "cli": BASE | {"models", "pruners", "allocators", "eval", "export", "jobs", "sparse", "cli_bench", "vision",
                   "distributed"},
    "__main__": {"cli"},
    "cli_bench": BASE | {"sparse", "models", "api"},
    "__init__": BASE | {"api", "models", "sparse", "torchvision_compat"},
}


def _room(module: str) -> str:
    """``atprune.engine.passes`` -> ``engine``; ``atprune.api`` -> ``api``; ``atprune`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted target)`` of every atprune import in the file: ``from atprune import data`` ->
    ``atprune.data``; ``import atprune`` and ``from atprune import prune`` -> ``atprune`` (the top-level package,
    whose public names load the API); ``importlib.import_module("atprune.x")`` / ``__import__("atprune.x")`` with a
    constant name -> ``atprune.x``. ``from atprune import __version__`` reads a constant and is no edge."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "atprune"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "atprune":
                for a in node.names:
                    if a.name.startswith("__"):
                        continue
                    is_room = (SRC / a.name).is_dir() or (SRC / f"{a.name}.py").is_file()
                    found.append((node.lineno, f"atprune.{a.name}" if is_room else "atprune"))
            elif node.module.startswith("atprune."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            target = node.args[0].value
            if name in ("import_module", "__import__") and isinstance(target, str) and target.split(".")[0] == "atprune":
                found.append((node.lineno, target))
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "<relative import>"))
    return found


def _violations(files) -> list[str]:
    bad = []
    for path in files:
        module = _module_name(path)
        room = _room(module)
        allowed = ALLOWED.get(room)
        if allowed is None:
            bad.append(f"{module}: room {room!r} has no line in ALLOWED (add one: what may it import?)")
            continue
        for line, target in _imports(path):
            if target == "<relative import>":
                bad.append(f"{module}:{line}: relative import (write the absolute atprune.* path)")
                continue
            rel = target.removeprefix("atprune.")
            if target == "atprune":
                if room != "__init__":
                    bad.append(f"{module}:{line}: imports the top-level atprune package (its public names load the "
                               f"whole API); import the module you need")
                continue
            if _room(target) == room:
                continue
            if not any(rel == a or rel.startswith(a + ".") for a in allowed):
                bad.append(f"{module}:{line}: imports {target}, not allowed for room {room!r} ({sorted(allowed)})")
    return bad


def test_every_import_runs_downward():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 40
    assert _violations(files) == []


def test_the_check_catches_an_import_back_up(tmp_path, monkeypatch):
    # an allocator that runs the engine, and a sparse kernel module that imports a pruner: both must be reported
    fake = tmp_path / "atprune"
    (fake / "allocators").mkdir(parents=True)
    (fake / "sparse").mkdir()
    (fake / "allocators" / "bad.py").write_text("def f():\n    from atprune.engine.passes import sequential\n")
    (fake / "allocators" / "sneaky.py").write_text("import importlib\nimport atprune\n"
                                                   "m = importlib.import_module('atprune.engine.passes')\n")
    (fake / "sparse" / "bad.py").write_text("import atprune.pruners.wanda\nfrom atprune import errors, __version__\n")
    (fake / "errors.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    found = _violations(sorted(fake.rglob("*.py")))
    assert found == [
        "atprune.allocators.bad:2: imports atprune.engine.passes, not allowed for room 'allocators' "
        "(['atomic', 'errors', 'registry'])",
        "atprune.allocators.sneaky:2: imports the top-level atprune package (its public names load the whole API); "
        "import the module you need",
        "atprune.allocators.sneaky:3: imports atprune.engine.passes, not allowed for room 'allocators' "
        "(['atomic', 'errors', 'registry'])",
        "atprune.sparse.bad:1: imports atprune.pruners.wanda, not allowed for room 'sparse' (['atomic', 'errors'])",
    ]


@pytest.mark.parametrize("module", ["atprune.sparse", "atprune.allocators", "atprune.pruners", "atprune.quant"])
def test_rooms_that_must_stay_light_import_without_the_engine(module):
    """Importing an allocator or the inference room must not pull in the block-by-block engine (checked in a fresh
    interpreter, so modules other tests imported do not hide it)."""
    import subprocess

    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "print(sorted(m for m in sys.modules if m.startswith('atprune.engine.passes') or m.startswith('atprune.jobs')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
