"""Every public name imports from ``bpjax`` and is documented."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import types

import pytest

import bpjax as bp


def test_all_is_unique_and_importable():
    assert len(set(bp.__all__)) == len(bp.__all__)
    namespace: dict[str, object] = {}
    exec("from bpjax import *", namespace)
    for name in bp.__all__:
        assert name in namespace, name
        assert namespace[name] is getattr(bp, name)
    assert isinstance(bp.__version__, str) and bp.__version__


def test_every_public_attribute_is_in_all():
    public = {
        name
        for name, value in vars(bp).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public <= set(bp.__all__), sorted(public - set(bp.__all__))


def _attribute_docstrings(module: types.ModuleType) -> dict[str, str]:
    """Module-level ``NAME = ...`` (or ``NAME: T = ...``) followed by a string literal."""
    tree = ast.parse(inspect.getsource(module))
    docs = {}
    for node, after in zip(tree.body, tree.body[1:], strict=False):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if not (
            isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            continue
        for target in targets:
            if isinstance(target, ast.Name):
                docs[target.id] = after.value.value
    return docs


def _submodules() -> list[str]:
    """Every public bpjax module (not __main__, not the CLI, not private ones)."""
    return [
        info.name
        for info in pkgutil.walk_packages(bp.__path__, prefix="bpjax.")
        if not any(part.startswith("_") for part in info.name.split("."))
        and not info.name.startswith("bpjax.cli")
        and not info.name.startswith("bpjax.testing")  # imports pytest/hypothesis parts
    ]


def _defining_module(name: str) -> types.ModuleType:
    """The deepest public module that lists ``name`` (where it is defined, not re-exported)."""
    for module_name in sorted(_submodules(), key=lambda m: -m.count(".")):
        module = importlib.import_module(module_name)
        if name in getattr(module, "__all__", ()):
            return module
    raise AssertionError(f"{name} is in bpjax.__all__ but in no submodule's __all__")


@pytest.mark.parametrize("name", bp.__all__)
def test_public_name_is_documented(name):
    obj = getattr(bp, name)
    module = _defining_module(name)
    assert getattr(module, name) is obj
    if callable(obj):
        doc = inspect.getdoc(obj)
        assert doc and doc.strip(), f"{name} has no docstring"
        # a NamedTuple's generated docstring "Name(field, ...)" does not count
        assert not doc.startswith(f"{name}("), f"{name} has only the generated docstring"
    else:
        docs = _attribute_docstrings(module)
        assert docs.get(name, "").strip(), f"{name} has no docstring after its assignment"


@pytest.mark.parametrize("cls", [bp.MLP, bp.GradCheckReport])
def test_public_methods_are_documented(cls):
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") or not (callable(member) or isinstance(member, property)):
            continue
        if name in ("count", "index"):  # inherited from tuple
            continue
        assert inspect.getdoc(member), f"{cls.__name__}.{name} has no docstring"
