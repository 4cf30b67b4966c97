"""The project as a user installs it: a wheel, installed (not editable) into a fresh virtualenv,
runs the in-process bench from outside the checkout, so everything it needs (the SQuAD data
included) must ship inside the packages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from bench.squad import load_selection

REPO = Path(__file__).resolve().parent.parent


def run(*command: str | Path, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    # no PYTHONPATH: nothing may reach the checkout except through the installed wheel
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of the working tree, built from a copy of what pyproject.toml names, so the build
    leaves nothing in the checkout and sees nothing the packages do not declare."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    source = tmp_path / "source"
    for package in {name.split(".")[0] for name in config["tool"]["setuptools"]["packages"]}:
        shutil.copytree(REPO / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ["pyproject.toml", config["project"]["readme"],
                 *config["project"].get("license-files", [])]:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, source / name)
    # the project virtualenv's setuptools, so the test needs no network
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
        "--no-build-isolation", "--wheel-dir", tmp_path / "dist", source, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("groupwise-*.whl")
    return wheel


def fresh_virtualenv(tmp_path: Path, wheel: Path) -> Path:
    """A new virtualenv holding the wheel; the project's dependencies (torch and the rest, too
    slow to install per test) come from the project virtualenv's site-packages, added as a
    plain path: its .pth files, the editable install's among them, are not run."""
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site_packages = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                             cwd=tmp_path).stdout.strip())
    run(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
        "--target", site_packages, wheel, cwd=tmp_path)
    dependencies = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site_packages / "project-dependencies.pth").write_text("\n".join(sorted(dependencies)) + "\n")
    return python


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_virtualenv_runs_the_bench_on_the_shipped_data(tmp_path):
    python = fresh_virtualenv(tmp_path, build_wheel(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    where = run(python, "-c", "import bench.squad, model; "
                "print(bench.squad.SELECTION_FILE); print(model.__file__)", cwd=elsewhere)
    selection_file, model_init = map(Path, where.stdout.split())
    for path in (selection_file, model_init):
        assert path.is_relative_to(tmp_path / "venv") and not path.is_relative_to(REPO), path

    shipped = run(python, "-c", "from server.playground import ASSETS, STATIC; "
                  "print(STATIC / 'playground.html', *(STATIC / name for name in ASSETS))",
                  cwd=elsewhere)
    for path in map(Path, shipped.stdout.split()):  # the playground page's files
        assert path.is_file() and path.is_relative_to(tmp_path / "venv"), path

    report_path = elsewhere / "bench.json"
    bench = run(python, "-m", "bench.engine_bench", "--contexts", "1", "--group-sizes", "1",
                "--model", "tiny-random", "--json", report_path, cwd=elsewhere, timeout=300)
    assert "| G |" in bench.stdout
    (result,) = json.loads(report_path.read_text())["results"]
    first_context = load_selection(1)[0]
    assert result["num_questions"] == len(first_context["questions"]) == 5
    assert set(result["answers"]) == {q["id"] for q in first_context["questions"]}
    assert result["prompt_tokens_billed"] > 0 and result["completion_tokens"] > 0
