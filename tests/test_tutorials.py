"""Every tutorial runs end to end in smoke mode (tiny model)."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.py"))


def test_there_are_tutorials():
    assert len(TUTORIALS) >= 3


@pytest.mark.parametrize("script", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs_in_smoke_mode(script, tmp_path):
    proc = subprocess.run([sys.executable, str(script), "--smoke"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()


def _imports_from_kn(tree) -> list[tuple[str, str]]:
    return [(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and (node.module or "").split(".")[0] == "kn_plugin" for alias in node.names]


def test_readme_and_tutorials_use_only_the_public_api():
    import kn_plugin

    readme = (TUTORIALS[0].parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    lines = [line for block in blocks for line in block.splitlines()
             if re.match(r"\s*(from kn_plugin[\w.]* import|import kn_plugin)", line)]
    used = _imports_from_kn(ast.parse("\n".join(line.strip() for line in lines)))
    for script in TUTORIALS:
        used += _imports_from_kn(ast.parse(script.read_text()))
    assert len(used) > 20 and not [line for line in lines if line.strip().startswith("import kn_plugin.")]
    assert {module for module, _ in used} == {"kn_plugin"}, sorted({m for m, _ in used} - {"kn_plugin"})
    missing = sorted({name for _, name in used} - set(kn_plugin.__all__))
    assert not missing, missing
    assert all(hasattr(kn_plugin, name) for name in kn_plugin.__all__)
