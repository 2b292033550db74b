"""The package layout rules that import-linter does not check.

- Imports between tlkit modules sit at the top of a module, where a reader
  (and `lint-imports`) sees them. The only exception is an optional heavy
  extra loaded on purpose inside a function, on a line marked `# lazy: why`.
- Private Keras attributes are read only in `tlkit/_keras_compat.py`, whose
  functions `tests/test_keras_compat.py` checks against the installed Keras.
"""

from __future__ import annotations

import ast
from pathlib import Path

import keras
import numpy as np
import pytest

from tlkit._keras_compat import inbound_nodes

PACKAGE = Path(__file__).resolve().parents[1] / "tlkit"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _relative(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def _function_level_tlkit_imports(source: str) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    lines = source.splitlines()
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else ["tlkit (relative)"]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(name == "tlkit" or name.startswith("tlkit.") for name in names):
                line = lines[node.lineno - 1]
                if "# lazy:" not in line:
                    found.append((node.lineno, line.strip()))
    return found


def test_the_import_check_can_fail():
    source = "def f():\n    from tlkit.models import find_base\n    import numpy\n"
    assert _function_level_tlkit_imports(source) == [(2, "from tlkit.models import find_base")]
    marked = "def f():\n    from tlkit import export  # lazy: needs the ONNX extra\n"
    assert _function_level_tlkit_imports(marked) == []


@pytest.mark.parametrize("path", MODULES, ids=_relative)
def test_no_function_level_imports_between_tlkit_modules(path):
    found = _function_level_tlkit_imports(path.read_text())
    assert not found, (
        f"{_relative(path)} imports tlkit inside functions: {found}. Move the import to the "
        "top of the module (if that makes a cycle, the code is in the wrong module), or mark "
        "an optional heavy extra with `# lazy: <why>`."
    )


def _keras_private_names() -> set[str]:
    """Private attribute names of Keras models, layers, optimizers and nodes, as installed."""
    inputs = keras.Input((3,))
    inner = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    outer_inputs = keras.Input((3,))
    x = keras.layers.Dropout(0.1)(inner(outer_inputs, training=False))
    model = keras.Model(outer_inputs, keras.layers.BatchNormalization()(x))
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.zeros((2, 3), "float32"), np.zeros((2, 2), "float32"), epochs=1, verbose=0)
    objects = [model, inner, *model.layers, model.optimizer, *inbound_nodes(inner)]
    names = set()
    for item in objects:
        names |= set(dir(item)) | set(vars(item))
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


KERAS_PRIVATE = _keras_private_names()


def _private_keras_reads(source: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        name = None
        if isinstance(node, ast.Attribute) and node.attr in KERAS_PRIVATE:
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                name = node.attr
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in KERAS_PRIVATE
        ):
            name = node.args[1].value
        if name is not None:
            found.append((node.lineno, name))
    return found


def test_the_keras_internals_check_can_fail():
    assert {"_flatten_layers", "_inbound_nodes", "_seed_generators"} <= KERAS_PRIVATE
    source = "def f(model):\n    return model._flatten_layers(), getattr(model, '_inbound_nodes')\n"
    assert sorted(_private_keras_reads(source)) == [(2, "_flatten_layers"), (2, "_inbound_nodes")]


@pytest.mark.parametrize(
    "path", [path for path in MODULES if path.name != "_keras_compat.py"], ids=_relative
)
def test_keras_internals_only_in_keras_compat(path):
    found = _private_keras_reads(path.read_text())
    assert not found, (
        f"{_relative(path)} reads private Keras attributes {found}; add a function to "
        "tlkit/_keras_compat.py (with a test in tests/test_keras_compat.py) and call it."
    )
