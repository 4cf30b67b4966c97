"""The layers and their doors, read from the sources' imports: server/ reaches model/ through the
engine's interface, the loading entry points and the group head's files only; model/ never
imports what sits above it; the engine's interface and policy load without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVER_DOORS = {"model.engine.interface", "model.weights.loading", "model.head.files"}


def imported_modules(package: str) -> dict[str, set[str]]:
    """module imported -> the files of `package` that import it (anywhere in the file: at the
    top, in a function, under TYPE_CHECKING)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    return found


def test_server_reaches_model_through_three_modules():
    reached = {name: files for name, files in imported_modules("server").items()
               if name == "model" or name.startswith("model.")}
    assert set(reached) <= SERVER_DOORS, {n: f for n, f in reached.items()
                                          if n not in SERVER_DOORS}


def test_model_never_imports_the_layers_above_it():
    above = ("server", "bench", "train", "tests")
    wrong = {name: files for name, files in imported_modules("model").items()
             if name.split(".")[0] in above}
    assert wrong == {}


def test_the_settings_the_interface_and_the_policy_load_without_torch():
    code = ("import sys, server.config, model.engine.interface, model.engine.scheduler; "
            "assert not {'torch', 'transformers'} & set(sys.modules), 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
