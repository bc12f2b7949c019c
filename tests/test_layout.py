"""The shape of the code: every exported name imports, and no module grows past 400 lines
(the import layers themselves are checked by ``lint-imports`` against pyproject.toml)."""

import importlib
import pkgutil
from pathlib import Path

import pytest

import kn_plugin

PACKAGES = ["kn_plugin"] + sorted(
    f"kn_plugin.{m.name}" for m in pkgutil.iter_modules(kn_plugin.__path__) if m.ispkg)


@pytest.mark.parametrize("name", PACKAGES)
def test_every_exported_name_imports(name):
    pkg = importlib.import_module(name)
    exported = getattr(pkg, "__all__", [])
    assert len(exported) == len(set(exported)), f"{name}.__all__ lists a name twice"
    namespace: dict = {}
    exec(f"from {name} import *", namespace)  # noqa: S102 - what `import *` users get
    assert [n for n in exported if n not in namespace] == []


def test_no_module_over_400_lines():
    root = Path(kn_plugin.__file__).parent
    sizes = {str(p.relative_to(root)): len(p.read_text().splitlines()) for p in root.rglob("*.py")}
    assert sizes and {p: n for p, n in sizes.items() if n > 400} == {}
