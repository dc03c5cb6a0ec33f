"""The package's layers, read from its import statements: inference sits below training and
below predict.

The import graph is read with `ast` from every module's source, imports inside functions
included (most heavy imports are made there), so an import made only when a command runs
counts the same as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import vctmae

PACKAGE = Path(vctmae.__file__).parent


def module_name(path: Path, root: Path) -> str:
    """`root/infer/views.py` → `vctmae.infer.views`; a package's `__init__.py` → the package."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement anywhere in `path` may load.

    `from a.b import c` counts as `a.b` and `a.b.c` (c may be a submodule); a relative import is
    resolved against `module`.
    """
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module → the package's own modules it may import."""
    prefix = root.name
    graph = {}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        names = imported_names(path, module)
        graph[module] = {n for n in names if n == prefix or n.startswith(prefix + ".")}
    return graph


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def crossings(graph: dict[str, set[str]], lower: str, upper: str) -> list[str]:
    """`module → import` for each import from `upper` made by a module of `lower`."""
    return sorted(
        f"{module} → {name}"
        for module, names in graph.items()
        if within(module, lower)
        for name in names
        if within(name, upper)
    )


def test_inference_and_predict_import_nothing_from_training():
    graph = import_graph()
    assert crossings(graph, "vctmae.infer", "vctmae.train") == []
    assert crossings(graph, "vctmae.predict", "vctmae.train") == []


def test_inference_imports_nothing_from_predict():
    assert crossings(import_graph(), "vctmae.infer", "vctmae.predict") == []


def test_tests_share_helpers_and_never_import_each_other():
    """A test module imports its helpers from tests/helpers.py and its neighbours (not from
    another test module), and nothing in the package or the tests reaches into `vctmae.bench`
    except the tests of the benchmarks themselves."""
    tests = Path(__file__).parent
    reaching = {}
    for path in sorted(tests.glob("*.py")):
        names = imported_names(path, path.stem)
        others = sorted(n for n in names if n.startswith("test_"))
        if path.name.startswith("test_bench") or path.name == "test_kernels.py":
            names = {n for n in names if not within(n, "vctmae.bench")}
        bench = sorted(n for n in names if within(n, "vctmae.bench"))
        if others or bench:
            reaching[path.name] = others + bench
    assert reaching == {}
    assert imported_names(tests / "test_predict.py", "test_predict") & {"helpers"}


def test_the_graph_holds_the_layers_it_checks():
    """The checks above look at the real modules: training uses inference, predict too."""
    graph = import_graph()
    assert {"vctmae.infer.views", "vctmae.infer.evaluate", "vctmae.predict.run"} <= set(graph)
    assert crossings(graph, "vctmae.train", "vctmae.infer")
    assert crossings(graph, "vctmae.predict", "vctmae.infer")


def test_an_import_inside_a_function_or_relative_is_found(tmp_path):
    root = tmp_path / "vctmae"
    (root / "infer").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "infer" / "__init__.py").write_text("from . import views\n")
    (root / "infer" / "views.py").write_text(
        "import numpy\n\n\ndef run():\n    from vctmae import train\n    return train\n"
    )
    (root / "infer" / "metrics.py").write_text("from ..predict.report import SUMMARY\n")
    graph = import_graph(root)
    assert graph["vctmae.infer"] == {"vctmae.infer", "vctmae.infer.views"}
    assert crossings(graph, "vctmae.infer", "vctmae.train") == ["vctmae.infer.views → vctmae.train"]
    assert crossings(graph, "vctmae.infer", "vctmae.predict") == [
        "vctmae.infer.metrics → vctmae.predict.report",
        "vctmae.infer.metrics → vctmae.predict.report.SUMMARY",
    ]


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (the strongly
    connected components of more than one module), each sorted."""
    edges = {module: sorted(names & graph.keys() - {module}) for module, names in graph.items()}
    order: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        order[module] = lowest[module] = len(order)
        stack.append(module)
        for name in edges[module]:
            if name not in order:
                visit(name)
                lowest[module] = min(lowest[module], lowest[name])
            elif name in stack:
                lowest[module] = min(lowest[module], order[name])
        if lowest[module] == order[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in sorted(edges):
        if module not in order:
            visit(module)
    return cycles


def test_no_module_imports_itself_through_others():
    assert import_cycles(import_graph()) == []


def test_a_circle_of_imports_is_found(tmp_path):
    root = tmp_path / "vctmae"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("def f():\n    from vctmae import b\n")
    (root / "b.py").write_text("from vctmae.c import g\n")
    (root / "c.py").write_text("import vctmae.a\n")
    (root / "d.py").write_text("from vctmae import a\n")
    assert import_cycles(import_graph(root)) == [["vctmae.a", "vctmae.b", "vctmae.c"]]
