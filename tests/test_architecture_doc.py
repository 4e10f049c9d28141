"""The docs match the code: docs/architecture.md's diagram is the import graph, and links resolve.

The diagram is the first ``mermaid`` block of docs/architecture.md, a ``flowchart`` whose arrows
(``a --> b``) read "a imports b". Each node's label names the files it stands for: top-level
folders and modules of ``sglang_cacheblend/`` (``srt/``, ``config.py``, ``__init__.py``) or
``radix_ext/``; a node whose label names no file is a third-party package, named by its id
(``sglang``). The graph it is compared with comes from the syntax tree of every ``.py`` file
under ``sglang_cacheblend/`` and ``radix_ext/``, imports inside functions and ``TYPE_CHECKING``
blocks included, as ``tests/test_import_rules.py`` reads them; an import inside one node is no
arrow, and importing ``sglang_cacheblend.x`` is not counted as importing ``__init__.py``.

The diagram drifted from the code once (nodes missing, an arrow the code did not have), so all
three directions are pinned: every folder and module is in a node, every import between nodes
is an arrow, every arrow is an import.

Relative links of README.md and docs/*.md must name files (and headings) that exist, so pages can
move.
"""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sglang_cacheblend"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _top_level_entries() -> dict[str, Path]:
    """The name a diagram label uses for each top-level module or folder -> its path."""
    entries = {"radix_ext/": ROOT / "radix_ext"} if (ROOT / "radix_ext").is_dir() else {}
    for path in sorted(PACKAGE.iterdir()):
        if path.is_dir() and any(path.rglob("*.py")):
            entries[path.name + "/"] = path
        elif path.suffix == ".py":
            entries[path.name] = path
    return entries


ENTRIES = _top_level_entries()


def _dotted(entry: str) -> str:
    """``srt/`` -> ``sglang_cacheblend.srt``; ``__init__.py`` -> ``sglang_cacheblend``."""
    if entry == "radix_ext/":
        return "radix_ext"
    if entry == "__init__.py":
        return "sglang_cacheblend"
    return "sglang_cacheblend." + entry.removesuffix("/").removesuffix(".py")


_ENTRY_OF_MODULE = {_dotted(entry): entry for entry in ENTRIES}


# --- the diagram -------------------------------------------------------------------------------

_PATH_IN_LABEL = re.compile(r"(?<![\w/.])([A-Za-z_]\w*(?:/|\.py))(?![\w/])")
_NODE_REF = re.compile(r"^([A-Za-z_]\w*)(.*)$")


def _mermaid_block(text: str) -> list[str]:
    match = re.search(r"```mermaid\n(.*?)```", text, re.DOTALL)
    assert match, f"{ARCHITECTURE.relative_to(ROOT)} has no mermaid block"
    return match.group(1).splitlines()


def _label(shape: str) -> str:
    """``["srt/ (SGLang adapters)"]`` -> ``srt/ (SGLang adapters)``; ``[(SGLang)]`` -> ``SGLang``.

    A label with brackets or parentheses of its own must be quoted.
    """
    shape = shape.strip()
    opener = len(shape) - len(shape.lstrip("[({"))
    closer = len(shape) - len(shape.rstrip("])}"))
    return shape[opener:len(shape) - closer].strip().strip('"')


def parse_diagram(text: str) -> tuple[dict[str, str], set[tuple[str, str]]]:
    """Node id -> label, and the set of (from, to) arrows, of the doc's mermaid flowchart.

    Only ``-->`` arrows between single nodes are understood; any other edge syntax fails here
    rather than being read as something else.
    """
    lines = [line.strip() for line in _mermaid_block(text)]
    lines = [line for line in lines if line and not line.startswith("%%")]
    assert lines and lines[0].split()[0] in ("flowchart", "graph"), lines[:1]
    labels: dict[str, str] = {}
    arrows: set[tuple[str, str]] = set()
    for line in lines[1:]:
        for token in ("---", "-.-", "==>", "<--", "&", "|"):
            assert token not in line, f"unsupported mermaid syntax {token!r} in: {line}"
        ids = []
        for ref in line.split("-->"):
            match = _NODE_REF.match(ref.strip())
            assert match, f"cannot read a node in: {line}"
            node, shape = match.groups()
            if shape.strip():
                assert labels.get(node, _label(shape)) == _label(shape), f"{node} relabelled"
                labels[node] = _label(shape)
            ids.append(node)
        arrows.update(itertools.pairwise(ids))
    for node in {n for arrow in arrows for n in arrow}:
        assert node in labels, f"node {node} is used but never labelled"
    return labels, arrows


LABELS, ARROWS = parse_diagram(ARCHITECTURE.read_text())


def _paths_of(label: str) -> list[str]:
    return _PATH_IN_LABEL.findall(label)


NODE_OF_ENTRY: dict[str, str] = {}
for _node, _text in LABELS.items():
    for _name in _paths_of(_text):
        assert _name not in NODE_OF_ENTRY, f"{_name} is in nodes {NODE_OF_ENTRY[_name]} and {_node}"
        NODE_OF_ENTRY[_name] = _node
EXTERNAL = {node for node, text in LABELS.items() if not _paths_of(text)}


# --- the code ----------------------------------------------------------------------------------

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module a file imports, absolute and dotted; ``from m import x`` gives ``m.x``.

    ``module`` is the file's own dotted name (for relative imports). ``m.x`` may name a function
    rather than a module; :func:`_entry_of` only needs its prefix.
    """
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[:len(parts) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _file_imports(path: Path) -> set[str]:
    return _imported_modules(path.read_text(), _module_name(path), path.name == "__init__.py")


def _entry_of(module: str) -> str | None:
    """The top-level entry (``srt/``, ``config.py``, ``__init__.py``...) a module lies in."""
    parts = module.split(".")
    for length in range(len(parts), 0, -1):
        entry = _ENTRY_OF_MODULE.get(".".join(parts[:length]))
        if entry is not None:
            return entry
    return None


def _node_of_import(module: str) -> str | None:
    top = module.split(".")[0]
    if top in ("sglang_cacheblend", "radix_ext"):
        return NODE_OF_ENTRY.get(_entry_of(module))
    return top if top in EXTERNAL else None


def actual_arrows() -> set[tuple[str, str]]:
    """(from node, to node) for every import between two nodes of the diagram."""
    arrows: set[tuple[str, str]] = set()
    for entry, place in ENTRIES.items():
        source = NODE_OF_ENTRY.get(entry)
        if source is None:
            continue
        for path in [place] if place.is_file() else sorted(place.rglob("*.py")):
            for module in _file_imports(path):
                target = _node_of_import(module)
                if target is not None and target != source:
                    arrows.add((source, target))
    return arrows


def _show(arrows) -> list[str]:
    return sorted(f"{a} --> {b}" for a, b in arrows)


# --- the tests ---------------------------------------------------------------------------------

def test_every_top_level_folder_and_module_is_in_a_node():
    missing = sorted(set(ENTRIES) - set(NODE_OF_ENTRY))
    assert not missing, f"not in any node of the diagram: {missing}"


def test_every_node_names_files_that_exist():
    unknown = sorted(set(NODE_OF_ENTRY) - set(ENTRIES))
    assert not unknown, f"named in the diagram but not in the code: {unknown}"


def test_every_import_between_nodes_is_an_arrow():
    undrawn = _show(actual_arrows() - ARROWS)
    assert not undrawn, "imports the diagram does not draw:\n" + "\n".join(undrawn)


def test_every_arrow_is_an_import():
    unfounded = _show(ARROWS - actual_arrows())
    assert not unfounded, "arrows no import stands behind:\n" + "\n".join(unfounded)


def test_the_import_reader_resolves_what_it_must():
    assert _entry_of("sglang_cacheblend") == "__init__.py"
    assert _entry_of("sglang_cacheblend.chunk") == "__init__.py"  # a name, not a module
    assert _entry_of("sglang_cacheblend.config.BlendConfig") == "config.py"
    assert _entry_of("sglang_cacheblend.blend.forward.blend_layers") == "blend/"
    assert _entry_of("radix_ext.chunk_index") == "radix_ext/"
    assert _entry_of("sglang.srt.server_args") is None
    relative = "from . import a\nfrom ..b import c\nimport d.e\n\ndef f():\n    import g\n"
    assert _imported_modules(relative, "p.q.r") == {"p.q.a", "p.b.c", "d.e", "g"}
    assert _imported_modules("from .x import y\n", "p.q", is_package=True) == {"p.q.x.y"}
    labels, arrows = parse_diagram('```mermaid\nflowchart TD\n  a["x/ (y)"] --> b[(SGLang)]\n'
                                   '  a --> c["z.py"] --> b\n```\n')
    assert labels == {"a": "x/ (y)", "b": "SGLang", "c": "z.py"}
    assert arrows == {("a", "b"), ("a", "c"), ("c", "b")}


# --- relative links ----------------------------------------------------------------------------

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def relative_links(page: Path) -> list[str]:
    """The relative targets of a page's markdown links and images (``file#anchor`` kept, a bare
    ``#anchor`` is ``page.md#anchor``), fenced code left out."""
    text = _FENCE.sub("", page.read_text())
    targets = [page.name + t if t.startswith("#") else t for t in _LINK.findall(text)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to ``-``."""
    headings = re.findall(r"^#+\s+(.*?)\s*$", _FENCE.sub("", page.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _broken(page: Path, target: str) -> bool:
    path, _, anchor = target.partition("#")
    linked = page.parent / path
    if not linked.exists():
        return True
    return bool(anchor) and linked.suffix == ".md" and anchor not in heading_anchors(linked)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_name_existing_files_and_headings(page):
    broken = [t for t in relative_links(page) if _broken(page, t)]
    assert not broken, f"{page.name} links to files or headings that do not exist: {broken}"


def test_heading_anchors_are_githubs():
    assert heading_anchors(ARCHITECTURE) >= {"the-import-graph", "the-chunk-index-radix_ext"}
