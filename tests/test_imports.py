"""No import cycle inside ddim_fast (docs/DESIGN.md, Import rules), image file I/O below sampling, and no test
module importing another test module or conftest.py, found by reading the source, not by importing it.

Every `import` and `from ... import` statement of every module under ddim_fast/ (kernels/ included,
through its package name ddim_fast.kernels) is an edge, wherever it stands: at the top of a file,
inside a function (a lazy import), or under `if TYPE_CHECKING`. Lazy imports count because a cycle
of lazy imports is still a tangle a reader must hold in mind, and one careless move to module level
turns it into a circular-import crash. Relative imports are resolved against the importing module's
package; `from pkg import name` is an edge to the sub-module pkg.name when that is a module, else
to pkg. Strings handed to importlib (the lazy public names in ddim_fast/__init__.py, the CLI's
command table) are not statements and are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"ddim_fast": ROOT / "ddim_fast", "ddim_fast.kernels": ROOT / "kernels"}


def module_files() -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package (a package is its __init__)."""
    out = {}
    for prefix, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            if "kernels" in rel.parts and prefix == "ddim_fast":
                continue  # the symlink ddim_fast/kernels -> ../kernels: walked once, as ddim_fast.kernels
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    return out


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of a relative import `from {'.' * level}{target} import ...` in `module`."""
    base = module.split(".")
    if not is_package:
        base = base[:-1]  # a module's relative imports start from its package
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """{module: the ddim_fast modules it imports}, from every import statement in the file."""
    files = module_files()
    graph = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = _resolve(name, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in files else base)
            for target in targets:
                while target and target not in files:  # `import ddim_fast.models.unet as u` -> the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_walk_sees_the_package():
    graph = import_graph()
    # a few edges that must be there, one of each kind: top level, lazy, relative from a sub-package,
    # and a kernel module's relative import inside kernels/
    assert "ddim_fast.plan" in graph["ddim_fast.sampling"]
    assert "ddim_fast.schedule" in graph["ddim_fast.plan"]
    assert "ddim_fast.kernels.ddim_step" in graph["ddim_fast.kernels.aot"]
    assert "ddim_fast.checks" in graph["ddim_fast.models.unet"]
    assert len(graph) > 25


def test_cycle_detection_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], "import cycles inside ddim_fast (each a group of modules importing each other): " + \
        "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("module", ["kernels/ddim_step.py", "kernels/group_norm.py", "kernels/attention.py",
                                    "kernels/aot.py", "kernels/checks.py", "kernels/__init__.py"])
def test_kernel_files_import_nothing_from_the_rest_of_ddim_fast(module):
    name = next(n for n, p in module_files().items() if p == ROOT / module)
    outside = sorted(t for t in import_graph()[name] if not t.startswith("ddim_fast.kernels"))
    assert outside == []


def reachable(graph: dict[str, set[str]], module: str) -> set[str]:
    """Every module `module` imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_image_files_sit_below_sampling():
    """images.py is file I/O: nothing it reaches samples a model (a model's sample grids are sample_grid.py,
    above both)."""
    graph = import_graph()
    above = ("ddim_fast.sampling", "ddim_fast.plan", "ddim_fast.rng", "ddim_fast.engine", "ddim_fast.backends",
             "ddim_fast.models", "ddim_fast.sample_grid")  # and their sub-modules
    assert sorted(m for m in reachable(graph, "ddim_fast.images") if m.startswith(above)) == []
    assert {"ddim_fast.images", "ddim_fast.sampling"} <= graph["ddim_fast.sample_grid"]


# -- the tests themselves: shared code is tests/helpers.py -----------------------------------------------------
def imports_of_test_modules(source: str) -> list[str]:
    """'line: statement' for each import in `source` that names a test module (test_*) or conftest, in any
    form: `from conftest import x`, `import tests.plan.test_plan`, `from tests.plan import test_plan`,
    `from .test_x import y`. What test modules share belongs in tests/helpers.py (fixtures in conftest.py,
    which pytest provides without an import)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [alias.name for alias in node.names]
        else:
            continue
        parts = [part for name in names for part in name.split(".")]
        if any(part == "conftest" or part.startswith("test_") for part in parts):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_test_import_check_catches_what_it_should():
    bad = ["from conftest import assert_close_to_reference", "from test_samplers import ToyNet",
           "import tests.plan.test_plan", "from tests.plan import test_plan", "from .test_x import y",
           "from . import conftest", "from tests.conftest import onnx_tiny", "from tests.helpers import test_x"]
    good = ["from tests.helpers import ToyNet, assert_close_to_reference", "import pytest",
            "from torch.testing import assert_close", "from benchmarks import gpu_suite", "import unittest"]
    assert [len(imports_of_test_modules(line)) for line in bad] == [1] * len(bad)
    assert imports_of_test_modules("\n".join(good)) == []
    assert imports_of_test_modules("def f():\n    from test_rng import KERNEL_SCRIPT\n") == [
        "2: from test_rng import KERNEL_SCRIPT"]  # lazy imports count


def test_no_test_module_imports_another_or_conftest():
    files = sorted((ROOT / "tests").rglob("*.py"))
    assert ROOT / "tests" / "helpers.py" in files and len(files) > 40
    found = [f"{path.relative_to(ROOT)}:{hit}" for path in files for hit in imports_of_test_modules(path.read_text())]
    assert found == [], "test modules importing a test module or conftest (move what they share to " \
        "tests/helpers.py):\n  " + "\n  ".join(found)
