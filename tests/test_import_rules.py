"""The import rule of docs/architecture.md, read from every import statement of the packages.

- Only ``sglang_cacheblend/srt/`` imports SGLang: ``serving/`` (the scheduler side's decisions),
  ``store/``, ``ingest/``, ``options.py`` and ``dataset.py`` never do.
- No layer imports a layer above it: ``serving/`` never imports ``srt/``; ``store/`` neither;
  nothing of the product imports ``eval/`` (the last test).
- ``sglang_cacheblend/blend/`` (the algorithm) imports only itself and ``config``; ``radix_ext/``
  (the chunk index) imports nothing of this project.
- ``sglang_cacheblend/chunks/`` (chunk marking and the client helpers) and ``config.py`` import
  neither torch nor SGLang, so clients and the tokenizer process stay light.

Imports inside functions count too (the scan walks the whole syntax tree).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sglang_cacheblend"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


def _files(*places: Path) -> list[Path]:
    out: list[Path] = []
    for place in places:
        out += [place] if place.is_file() else sorted(place.rglob("*.py"))
    return out


ALL_FILES = _files(PACKAGE, ROOT / "radix_ext")


def _offenders(files: list[Path], allowed) -> list[str]:
    return [f"{path.relative_to(ROOT)} imports {name}"
            for path in files for name in sorted(_imports(path)) if not allowed(name)]


def test_only_the_srt_glue_imports_sglang():
    srt = PACKAGE / "srt"
    outside = [p for p in ALL_FILES if srt not in p.parents]
    assert outside and _offenders(outside, lambda name: _top(name) != "sglang") == []


@pytest.mark.parametrize("place", ["serving", "store", "ingest", "options.py", "dataset.py",
                                   "supported_setups.py"])
def test_the_sglang_free_core_imports_no_sglang(place):
    """Named one by one (the rule above covers them), so a move out of the core is seen."""
    files = _files(PACKAGE / place)
    assert files and _offenders(files, lambda name: _top(name) != "sglang") == []


LAYERS_ABOVE = {
    "serving": ("srt", "eval", "ingest", "launch", "cli", "demo"),
    "store": ("srt", "serving", "eval", "ingest", "launch", "cli", "demo"),
    "chunks": ("srt", "serving", "store", "eval", "ingest", "blend"),
    "config.py": ("srt", "serving", "store", "eval", "ingest", "chunks", "options"),
}


@pytest.mark.parametrize("place", sorted(LAYERS_ABOVE))
def test_no_layer_imports_a_layer_above_it(place):
    above = tuple(f"sglang_cacheblend.{name}" for name in LAYERS_ABOVE[place])

    def allowed(name: str) -> bool:
        return not any(name == a or name.startswith(a + ".") for a in above)

    assert _offenders(_files(PACKAGE / place), allowed) == []


def test_the_algorithm_imports_only_itself_and_the_config():
    def allowed(name: str) -> bool:
        if _top(name) != "sglang_cacheblend":
            return _top(name) != "sglang"
        return name.startswith("sglang_cacheblend.blend") or name == "sglang_cacheblend.config"

    assert _offenders(_files(PACKAGE / "blend"), allowed) == []


def test_the_chunk_index_imports_nothing_of_this_project():
    allowed = lambda name: _top(name) not in ("sglang", "sglang_cacheblend")  # noqa: E731
    assert _offenders(_files(ROOT / "radix_ext"), allowed) == []


def test_chunk_marking_and_config_import_neither_torch_nor_sglang():
    light = _files(PACKAGE / "chunks", PACKAGE / "config.py", PACKAGE / "__init__.py")

    def allowed(name: str) -> bool:
        if _top(name) == "sglang_cacheblend":
            return name.startswith("sglang_cacheblend.chunks") or name in (
                "sglang_cacheblend.config", "sglang_cacheblend.options")  # the settings table
        return _top(name) not in ("torch", "sglang", "numpy")

    assert _offenders(light, allowed) == []


@pytest.mark.parametrize("module", [
    "sglang_cacheblend", "sglang_cacheblend.config", "sglang_cacheblend.chunks",
    "sglang_cacheblend.chunks.client", "sglang_cacheblend.chunks.hints",
    "sglang_cacheblend.options", "sglang_cacheblend.dataset", "sglang_cacheblend.supported_setups",
    "sglang_cacheblend.context_text",
])
def test_light_modules_load_without_torch_at_runtime(module):
    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('torch', 'sglang') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_only_the_cli_imports_eval_and_only_inside_the_function_that_runs_it():
    """``eval/`` is kept at arm's length: no product module imports it (the data format and the
    prompt they share live in ``dataset.py``), and ``cli.py`` imports a harness only inside
    the function that runs its subcommand, so ``serve`` loads none of it. Relative imports and
    ``from sglang_cacheblend import eval`` count too."""
    def names(node: ast.AST, path: Path) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        if not isinstance(node, ast.ImportFrom):
            return []
        package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
        base = package[:len(package) - node.level + 1] if node.level else []
        module = ".".join([*base, *([node.module] if node.module else [])])
        return [module, *(f"{module}.{alias.name}" for alias in node.names)]

    eval_package = PACKAGE / "eval"
    offenders = []
    for path in ALL_FILES:
        if eval_package in path.parents:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        in_functions = {id(inner) for node in ast.walk(tree)
                        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for inner in ast.walk(node)}
        for node in ast.walk(tree):
            bad = [n for n in names(node, path)
                   if n == "sglang_cacheblend.eval" or n.startswith("sglang_cacheblend.eval.")]
            if bad and not (path == PACKAGE / "cli.py" and id(node) in in_functions):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {bad[0]}")
    assert offenders == []
