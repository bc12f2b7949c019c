"""The shape of the code: every exported name imports, no module grows past 400 lines, and
imports sit at the top of their module (the import layers themselves are checked by
``lint-imports`` against pyproject.toml)."""

import ast
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


#: the only packages imported inside functions, each imported where it is used because importing
#: it costs more than ``import kn_plugin`` itself (measured: kn_plugin 2.8 s; transformer_lens
#: +7.4 s, scipy.stats +1.5 s, matplotlib.pyplot +1.0 s, captum.attr +0.6 s, transformers' model
#: classes +3.2 s, loaded lazily by transformers itself), or is optional (ray)
DEFERRED = {"ray", "transformer_lens", "scipy", "matplotlib", "captum", "transformers", "tokenizers"}


def _function_imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    yield inner, inner.names[0].name
                elif isinstance(inner, ast.ImportFrom):
                    yield inner, "kn_plugin" if inner.level else inner.module


def test_imports_inside_functions_only_for_heavy_or_optional_packages():
    root = Path(kn_plugin.__file__).parent
    found = {}
    for path in root.rglob("*.py"):
        for node, module in _function_imports(ast.parse(path.read_text())):
            if module.split(".")[0] not in DEFERRED:
                found[f"{path.relative_to(root)}:{node.lineno}"] = module
    assert found == {}


def test_readme_tree_names_every_package_and_top_level_module():
    """README's "How the code is organised" lists every package and top-level module there is,
    and nothing that is not there."""
    root = Path(kn_plugin.__file__).parent
    text = (root.parent / "README.md").read_text()
    block = text.split("## How the code is organised", 1)[1].split("```", 2)[1]
    actual = {p.name for p in root.iterdir() if p.suffix == ".py" and p.name != "__init__.py"}
    actual |= {f"{p.name}/" for p in root.iterdir() if (p / "__init__.py").exists()}
    named = set()
    for line in block.splitlines():
        if not line.startswith("  ") or line.startswith("   "):
            continue  # the root line, and continuation lines of a description
        for word in line.split():  # the names lead each line, up to its description
            word = word.rstrip(",")
            if not (word.endswith(".py") or word.endswith("/")):
                break
            named.add(word.split("/", 1)[0] + "/" if "/" in word else word)
    assert actual - named == set() and named - actual == set()
