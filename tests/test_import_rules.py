"""The import rule of docs/architecture.md, read from every import statement of the packages.

- Only ``sglang_cacheblend/srt/`` imports SGLang.
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
            return name.startswith("sglang_cacheblend.chunks") or name == "sglang_cacheblend.config"
        return _top(name) not in ("torch", "sglang", "numpy")

    assert _offenders(light, allowed) == []


@pytest.mark.parametrize("module", [
    "sglang_cacheblend", "sglang_cacheblend.config", "sglang_cacheblend.chunks",
    "sglang_cacheblend.chunks.client", "sglang_cacheblend.chunks.hints",
])
def test_light_modules_load_without_torch_at_runtime(module):
    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('torch', 'sglang') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "[]"
