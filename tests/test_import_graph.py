"""The library's imports point one way: no cycle (imports inside functions count), no library module
importing the doors in `captioner/apps/`, and no private name (`_foo`) taken from another module.

The graph is read from the source with `ast`, so every import counts wherever it sits: inside a function,
under `if TYPE_CHECKING:`, in a `try`. An edge A -> B means "A needs B's body to have run":
- `import p.a.b` and `from p.a.b import name` give an edge to `p.a.b` (the parent packages' `__init__`
  run too, but those are not counted, or every submodule would depend on its package);
- `from p.a import b` gives an edge to `p.a.b` when `b` is a submodule, and to `p.a` when `b` is a name
  defined in `p/a/__init__.py`, even when `p.a` is the importer's own package: a module taking a name out
  of its package's `__init__`, which imports that module in turn, is a cycle that works only by the order
  of lines (`python ../shared/tools/import_cycles.py` skips that case; this test does not);
- relative imports (`from . import x`, `from ..y import z`) are resolved against the importer.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import REPO_ROOT

APPS = "apps"  # captioner/apps/: the doors (cli, batch, demo); the library below never imports them
DOORS_OUTSIDE_APPS = {"__main__"}  # `python -m captioner`: a door too, allowed to import apps


@dataclass
class ImportGraph:
    modules: dict[str, Path]  # dotted name -> file
    edges: dict[str, set[str]] = field(default_factory=dict)  # importer -> imported modules of the package
    private: list[str] = field(default_factory=list)  # "importer:line takes _name from module"

    def cycles(self) -> list[list[str]]:
        """Strongly connected groups of more than one module (Tarjan), each sorted; self-imports ignored."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []

        def visit(module: str) -> None:  # recursion depth is bounded by the number of modules
            index[module] = low[module] = len(index)
            stack.append(module)
            on_stack.add(module)
            for target in sorted(self.edges[module]):
                if target not in index:
                    visit(target)
                    low[module] = min(low[module], low[target])
                elif target in on_stack:
                    low[module] = min(low[module], index[target])
            if low[module] == index[module]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == module:
                        break
                if len(group) > 1:
                    found.append(sorted(group))

        for module in sorted(self.modules):
            if module not in index:
                visit(module)
        return sorted(found)

    def cycle_edges(self, group: list[str]) -> list[str]:
        return [f"{a} -> {b}" for a in group for b in sorted(self.edges[a]) if b in group]

    def imports_of_apps(self, package: str) -> list[str]:
        """"library module -> apps module" for every library module (outside apps/) importing apps/."""
        apps = f"{package}.{APPS}"
        doors = {apps, *(f"{package}.{name}" for name in DOORS_OUTSIDE_APPS)}
        in_apps = [m for m in self.modules if any(m == d or m.startswith(d + ".") for d in doors)]
        return [f"{module} -> {target}" for module in sorted(self.modules) if module not in in_apps
                for target in sorted(self.edges[module]) if target == apps or target.startswith(apps + ".")]


def module_names(package_dir: Path) -> dict[str, Path]:
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def build_import_graph(package_dir: Path) -> ImportGraph:
    """The import graph among the modules of the package in `package_dir` (a folder with __init__.py)."""
    package = package_dir.name
    graph = ImportGraph(module_names(package_dir))
    for importer, path in graph.modules.items():
        is_package = path.name == "__init__.py"
        own_package = importer if is_package else importer.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        targets: set[str] = set()
        module_aliases: dict[str, str] = {}  # local name bound to one of our modules -> that module
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == package or alias.name.startswith(package + "."):
                        target = _deepest_module(alias.name, graph.modules)
                        targets.add(target)
                        if alias.asname:
                            module_aliases[alias.asname] = target
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(node.module, node.level, own_package)
                if source != package and not source.startswith(package + "."):
                    continue
                source_module = _deepest_module(source, graph.modules)
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in graph.modules:
                        targets.add(submodule)
                        module_aliases[alias.asname or alias.name] = submodule
                        continue
                    targets.add(source_module)  # a name defined in (or re-exported by) that module
                    if _is_private(alias.name) and source_module != importer:
                        graph.private.append(f"{importer}:{alias.lineno} takes {alias.name} from {source_module}")
        # `from p import x` then `x._helper`: a private name reached through a module object.
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and _is_private(node.attr)
                    and module_aliases[node.value.id] != importer):
                graph.private.append(f"{importer}:{node.lineno} takes {node.attr} from "
                                     f"{module_aliases[node.value.id]}")
        targets.discard(importer)
        graph.edges[importer] = targets
    return graph


def _absolute(module: str | None, level: int, own_package: str) -> str:
    """The absolute dotted name of `from <level dots><module> import ...` written in `own_package`."""
    if level == 0:
        return module or ""
    base = own_package.split(".")
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([module] if module else [])])


def _deepest_module(name: str, modules: dict[str, Path]) -> str:
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# ------------------------------------------------------------------------------------------ the library
@pytest.fixture(scope="module")
def library() -> ImportGraph:
    return build_import_graph(REPO_ROOT / "captioner")


def test_library_has_no_import_cycle(library):
    cycles = library.cycles()
    assert not cycles, "\n".join(f"cycle of {len(group)} modules: {', '.join(group)}\n  edges: "
                                 + "; ".join(library.cycle_edges(group)) for group in cycles)


def test_doors_live_in_apps_and_the_library_never_imports_them(library):
    assert {"captioner.apps.cli", "captioner.apps.batch", "captioner.apps.demo"} <= set(library.modules), (
        "the doors (cli, batch, demo) belong in captioner/apps/")
    assert not library.imports_of_apps("captioner"), library.imports_of_apps("captioner")


def test_no_private_name_is_imported_across_modules(library):
    assert not library.private, "\n".join(library.private)


def test_the_graph_sees_every_library_module(library):
    graph = library
    assert "captioner" in graph.modules and "captioner.model" in graph.modules
    assert all(module == "captioner" or module.startswith("captioner.") for module in graph.modules)
    # model.py needs config (a plain top-level import): the graph is not empty by accident
    assert "captioner.config" in graph.edges["captioner.model"]


# ------------------------------------------------------------------------------------------ the checker itself
def write_package(root: Path, files: dict[str, str]) -> Path:
    """A package `pkg` under `root` with the given files (paths relative to pkg/, sources)."""
    package = root / "pkg"
    for name, source in {"__init__.py": "", **files}.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return package


def test_a_cycle_through_a_function_local_import_is_found(tmp_path):
    package = write_package(tmp_path, {
        "a.py": "from pkg.b import helper\n",
        "b.py": "def helper():\n    from pkg import c\n    return c\n",
        "c.py": "import pkg.a\n",
        "d.py": "import pkg.a\n",  # depends on the cycle, is not in it
    })
    graph = build_import_graph(package)
    assert graph.cycles() == [["pkg.a", "pkg.b", "pkg.c"]]
    assert graph.cycle_edges(["pkg.a", "pkg.b", "pkg.c"]) == ["pkg.a -> pkg.b", "pkg.b -> pkg.c", "pkg.c -> pkg.a"]


def test_relative_imports_are_resolved(tmp_path):
    package = write_package(tmp_path, {
        "top.py": "X = 1\n",
        "sub/__init__.py": "from .inner import Y\n",
        "sub/inner.py": "from .. import top\nfrom ..top import X\nfrom . import leaf\nY = 2\n",
        "sub/leaf.py": "from .inner import Y\n",  # leaf <-> inner: a cycle through relative imports
    })
    graph = build_import_graph(package)
    assert graph.edges["pkg.sub"] == {"pkg.sub.inner"}
    assert graph.edges["pkg.sub.inner"] == {"pkg.top", "pkg.sub.leaf"}  # `from . import leaf`: no edge to pkg.sub
    assert graph.cycles() == [["pkg.sub.inner", "pkg.sub.leaf"]]


def test_taking_a_name_from_the_own_package_init_is_a_cycle(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "from pkg.api import Thing\n",
        "api.py": "from pkg.model import Model\nclass Thing: pass\n",
        "model.py": "def build():\n    from pkg import Thing\n    return Thing\n",
    })
    assert build_import_graph(package).cycles() == [["pkg", "pkg.api", "pkg.model"]]


def test_no_cycle_in_a_layered_package(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "from pkg.api import Thing\n",
        "api.py": "import os\nfrom pkg import model\nfrom pkg.model import Model as Thing\n",
        "model.py": "from . import text\nimport pkg.text as words\n",
        "text.py": "import json\n",
        "apps/__init__.py": "",
        "apps/cli.py": "from pkg.api import Thing\nfrom pkg.model import _internal_default\n",
    })
    graph = build_import_graph(package)
    assert graph.cycles() == []
    assert graph.edges["pkg.model"] == {"pkg.text"}
    assert graph.imports_of_apps("pkg") == []
    assert graph.private == ["pkg.apps.cli:2 takes _internal_default from pkg.model"]


def test_a_library_module_importing_apps_is_found(tmp_path):
    package = write_package(tmp_path, {
        "api.py": "def default():\n    from pkg.apps.cli import DEFAULT\n    return DEFAULT\n",
        "model.py": "from .apps import cli\n",
        "apps/__init__.py": "",
        "apps/cli.py": "from pkg.api import default\nDEFAULT = 1\n",
        "__main__.py": "from pkg.apps.cli import main\n",  # `python -m pkg` is a door: allowed
    })
    graph = build_import_graph(package)
    assert graph.imports_of_apps("pkg") == ["pkg.api -> pkg.apps.cli", "pkg.model -> pkg.apps.cli"]
    assert graph.cycles() == [["pkg.api", "pkg.apps.cli"]]


def test_private_names_across_modules_are_found(tmp_path):
    package = write_package(tmp_path, {
        "training.py": "def _helper(): pass\ndef _other(): pass\n__all__ = ['train']\n",
        "scst.py": ("from pkg.training import (\n    __all__,\n    _helper,\n)\n"
                    "def f():\n    from pkg import training\n    return training._other()\n"),
        "finetune.py": "import pkg.training as loop\nloop._helper()\n",
        "_registry.py": "REGISTRY = {}\n",
        "models.py": "from pkg._registry import REGISTRY\nfrom . import _registry\n",  # a private module: fine
    })
    assert sorted(build_import_graph(package).private) == [
        "pkg.finetune:2 takes _helper from pkg.training",
        "pkg.scst:3 takes _helper from pkg.training",
        "pkg.scst:7 takes _other from pkg.training",
    ]
