"""What a non-editable install ships: every package of the source tree is listed in pyproject.toml.

The other tests import gradmap from the source tree, so a package missing from the wheel only shows
when a user runs the installed copy (`.ci/run` also exports a model with the installed package, from
outside the source tree)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _source_packages() -> set[str]:
    return {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "gradmap").rglob("__init__.py")}


def test_every_source_package_is_installed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    missing = sorted(_source_packages() - listed)
    assert not missing, f"packages under gradmap/ that pyproject.toml's [tool.setuptools] packages leaves out: {missing}"


def test_listed_packages_exist():
    setuptools = _pyproject()["tool"]["setuptools"]
    dirs = setuptools.get("package-dir", {})
    for package in setuptools["packages"]:
        folder = ROOT / dirs[package] if package in dirs else ROOT.joinpath(*package.split("."))
        assert folder.is_dir(), f"pyproject.toml lists package {package}, but {folder} is not a folder"
