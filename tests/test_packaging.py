"""The wheel's layout, checked from pyproject.toml without building: every folder that ships files is a declared
package (setuptools warns about undeclared ones today and will refuse them), and its files are in package-data."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = {"assets", "core", "evaluate", "locales", "nodes", "trainer", "workflows"}


def _config():
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _package(folder: Path) -> str:
    rel = folder.relative_to(REPO)
    return ".".join(("lambda_eclipse",) + rel.parts) if rel.parts else "lambda_eclipse"


def test_every_shipped_folder_is_a_declared_package_with_its_files():
    setuptools = _config()["tool"]["setuptools"]
    packages = set(setuptools["packages"])
    data = setuptools.get("package-data", {})
    for top in SHIPPED:
        for folder in [REPO / top, *(p for p in (REPO / top).rglob("*") if p.is_dir())]:
            if "__pycache__" in folder.parts:
                continue
            files = [p for p in folder.iterdir() if p.is_file() and p.suffix != ".pyc"]
            if not files:
                continue
            name = _package(folder)
            assert name in packages, f"{folder.relative_to(REPO)} ships files but {name} is not in [tool.setuptools] packages"
            for f in files:
                if f.suffix in (".py", ".md"):  # code ships as modules; notes for developers stay in the repository
                    continue
                patterns = data.get(name, [])
                assert any(fnmatch.fnmatch(f.name, pat) for pat in patterns), \
                    f"{f.relative_to(REPO)} is not covered by package-data[{name!r}] = {patterns}"


def test_requirements_match_the_dependencies():
    deps = _config()["project"]["dependencies"]
    lines = [l.strip() for l in (REPO / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines == deps


def test_license_is_an_spdx_expression():
    project = _config()["project"]
    assert isinstance(project["license"], str) and project["license-files"] == ["LICENSE"]
