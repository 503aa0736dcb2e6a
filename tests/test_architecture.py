"""The house keeps its shape: no import circles, an image wing of its own, a short trainer on contracts.

These tests read the source (``ast``), so they fail the moment a change breaks a rule, with a
message naming the file and the import. ``docs/architecture.md`` describes the layout they guard.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sclatent"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, int]]:
    """Every ``sclatent`` module ``name`` imports, at module level or inside functions, with the line."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("sclatent")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("sclatent"):
                continue
            for alias in node.names:
                # "from . import data" imports the module sclatent.data; "from .x import y" imports x
                target = f"{source}.{alias.name}"
                found.append((target if target in MODULES else source, node.lineno))
    return [(target, line) for target, line in found if target in MODULES]


GRAPH = {name: sorted({target for target, _ in _imports(name)} - {name}) for name in MODULES}


def test_the_graph_sees_the_package():
    assert len(MODULES) > 60
    assert "sclatent.data.registry" in GRAPH["sclatent.data.loader"]


def test_no_import_circle_anywhere():
    # Tarjan's strongly connected components: any component of two or more modules is a circle
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert not circles, f"import circles: {circles}"


def _in_wing(name: str) -> bool:
    return name.startswith(("sclatent.images", "sclatent.cli.images"))


def _is_cell_model_code(name: str) -> bool:
    cell_cli = name.startswith("sclatent.cli.") and not name.startswith("sclatent.cli.images")
    return name.startswith(("sclatent.modules", "sclatent.model")) or cell_cli


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _in_wing(n)))
def test_the_image_wing_imports_no_cell_model_code(name):
    bad = [(t, line) for t, line in _imports(name) if _is_cell_model_code(t)]
    assert not bad, f"{MODULES[name]} imports cell model code: {bad}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not _in_wing(n)))
def test_cell_and_shared_code_imports_no_image_code(name):
    if name in ("sclatent", "sclatent.cli"):  # the package and the CLI register both sides
        return
    bad = [(t, line) for t, line in _imports(name) if _in_wing(t)]
    assert not bad, f"{MODULES[name]} imports the image wing: {bad}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _in_wing(n)))
def test_the_image_wing_uses_public_names_of_other_packages(name):
    private = [
        (t, line)
        for t, line in _imports(name)
        if not _in_wing(t) and any(part.startswith("_") for part in t.split(".")[1:]) and t != "sclatent._persistence"
    ]
    assert not private, f"{MODULES[name]} imports private modules outside the wing: {private}"


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    return [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_the_epoch_loop_stays_short():
    long = [
        (f.name, f.end_lineno - f.lineno + 1) for f in _functions(PACKAGE / "train.py") if f.end_lineno - f.lineno >= 80
    ]
    assert not long, f"functions of train.py over 80 lines: {long}"


@pytest.mark.parametrize("file", ["train.py", "steps.py"])
def test_the_trainer_calls_contracts_not_attribute_probes(file):
    tree = ast.parse((PACKAGE / file).read_text())
    probes = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
    ]
    assert not probes, f"{file} looks hooks up by hasattr/getattr at lines {probes}: declare them in sclatent.contracts"


def _model_classes():
    import sclatent
    from sclatent.base import Model

    seen, pending = [], list(Model.__subclasses__())
    while pending:
        cls = pending.pop()
        seen.append(cls)
        pending += cls.__subclasses__()
    assert sclatent.model.VAE in seen and sclatent.images.ImageVAE in seen
    return [cls for cls in seen if "hyperparameters_class" in cls.__dict__]


def test_every_model_class_stands_on_one_base_with_declared_contracts():
    import sclatent
    from sclatent.base import Model
    from sclatent.contracts import Module
    from sclatent.hyperparameters import Hyperparameters

    public = [getattr(sclatent.model, n) for n in sclatent.model.__all__]
    public += [getattr(sclatent.images, n) for n in sclatent.images.__all__]
    models = [
        c for c in public if inspect.isclass(c) and issubclass(c, Model) and "hyperparameters_class" in c.__dict__
    ]
    assert len(models) >= 14
    assert set(models) <= set(_model_classes())
    for cls in models:
        assert issubclass(cls.module_class, Module), cls
        assert issubclass(cls.hyperparameters_class, Hyperparameters), cls
        # the signature shows the hyperparameters, read from the one declaration
        names = set(inspect.signature(cls).parameters)
        fields = {f.name for f in dataclasses.fields(cls.hyperparameters_class)}
        assert fields <= names, (cls, fields - names)
        assert "{hyperparameters}" not in (cls.__doc__ or ""), cls
