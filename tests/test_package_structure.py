"""The package's import structure: no import circles, no private names across modules, components
that never reach up into the layers built on them.

Imports are read with `ast` from every module of src/eve_vlm (function-level and TYPE_CHECKING
imports included: they are circles all the same, only deferred), and from bench/ for the
private-name rule.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

import eve_vlm

PACKAGE = "eve_vlm"
SRC = Path(eve_vlm.__file__).resolve().parent
BENCH = SRC.parents[1] / "bench"


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name (or a bench file's path)
    target: str  # dotted module the names come from
    names: tuple[str, ...]  # imported names (empty for `import x.y`)
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def read_imports(path: Path, importer: str, is_package: bool) -> list[Import]:
    """Every import statement of a file, relative ones resolved to absolute module names."""
    out: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [Import(importer, alias.name, (), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = importer.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append(Import(importer, target, tuple(a.name for a in node.names), node.lineno))
    return out


def package_imports() -> list[Import]:
    return [
        imp
        for name, path in modules().items()
        for imp in read_imports(path, name, path.name == "__init__.py")
        if imp.target.split(".")[0] == PACKAGE
    ]


def import_graph() -> nx.DiGraph:
    """Module -> module edges. `from pkg import sub` is an edge to the submodule only: it needs no
    name from the package's __init__, so it closes no circle through it."""
    known = modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for imp in package_imports():
        submodules = [f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in known]
        for sub in submodules:
            graph.add_edge(imp.importer, sub, line=imp.line)
        if imp.target in known and (not imp.names or len(submodules) < len(imp.names)):
            graph.add_edge(imp.importer, imp.target, line=imp.line)
    return graph


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_the_import_reader_sees_relative_and_function_level_imports():
    imports = package_imports()
    model_eve = {(i.target, i.names) for i in imports if i.importer == "eve_vlm.model.eve"}
    assert ("eve_vlm.model.config", ("EveConfig",)) in model_eve
    assert ("eve_vlm.constants", ("IGNORE_INDEX", "IMAGE_TOKEN_INDEX")) in model_eve
    graph = import_graph()
    assert graph.has_edge("eve_vlm.conversion.llm", "eve_vlm.model.eve")
    assert graph.has_edge("eve_vlm.conversion", "eve_vlm.conversion.llm")


def test_no_import_circles():
    graph = import_graph()
    circles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    circles += [[a] for a, b in nx.selfloop_edges(graph)]
    described = []
    for circle in circles:
        members = set(circle)
        edges = [
            f"{a} -> {b} (line {d['line']})" for a, b, d in graph.subgraph(members).edges(data=True)
        ]
        described.append("; ".join(edges))
    assert not circles, "import circles:\n" + "\n".join(described)


def private_imports(imports: list[Import]) -> list[str]:
    found = []
    for imp in imports:
        parts = imp.target.split(".")
        if imp.target == imp.importer:
            continue
        names = [n for n in imp.names if is_private(n)]
        names += [p for p in parts if is_private(p)]
        if names:
            found.append(f"{imp.importer}:{imp.line} imports {', '.join(names)} from {imp.target}")
    return found


def test_no_module_imports_another_modules_private_names():
    found = private_imports(package_imports())
    assert not found, "\n".join(found)


def test_bench_scripts_use_public_names_only():
    imports = []
    for path in sorted(BENCH.glob("*.py")):
        imports += [i for i in read_imports(path, str(path.relative_to(BENCH.parent)), False)
                    if i.target.split(".")[0] == PACKAGE]
    if not imports:
        pytest.skip("no bench scripts next to the package (installed from a wheel)")
    found = private_imports(imports)
    assert not found, "\n".join(found)


STUDIES = ("quickstart", "compare")  # on top of the library; compare reuses the quickstart's data and weights


@pytest.mark.parametrize("study", STUDIES)
def test_only_the_studies_import_a_study(study):
    """The studies sit on top of the library; the CLI registers their subcommands by name (a
    string, not an import), so no library module imports them."""
    found = [
        f"{i.importer}:{i.line}"
        for i in package_imports()
        if (i.target == f"{PACKAGE}.{study}" or i.target.startswith(f"{PACKAGE}.{study}."))
        and not i.importer.startswith(tuple(f"{PACKAGE}.{s}" for s in STUDIES))
    ]
    assert not found, f"library modules importing {study}/: " + ", ".join(found)


@pytest.mark.parametrize(
    "layer, above",
    [
        ("model", ("processing", "conversion", "data", "train", "generate", "serve", "eval", "quickstart")),
        ("processing", ("model", "conversion", "data", "train", "generate", "serve", "eval", "quickstart")),
    ],
)
def test_a_core_layer_never_imports_the_layers_built_on_it(layer, above):
    prefix = f"{PACKAGE}.{layer}"
    found = [
        f"{i.importer}:{i.line} imports {i.target}"
        for i in package_imports()
        if (i.importer == prefix or i.importer.startswith(prefix + "."))
        and i.target.split(".")[1:2] and i.target.split(".")[1] in above
    ]
    assert not found, "\n".join(found)
