"""Packaging: the recipes under configs/ ship in the wheel, and `recipe_path` finds each of them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from genpt_dist.errors import UserError
from genpt_dist.recipes import recipe_names, recipe_path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PACKAGES = sorted(".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "genpt_dist").rglob("__init__.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_path_resolves_every_config(path: Path) -> None:
    assert recipe_path(path.stem).read_bytes() == path.read_bytes()


def test_recipe_names_and_unknown_name() -> None:
    assert recipe_names() == [p.stem for p in CONFIGS]
    with pytest.raises(UserError, match=r"unknown recipe 'nope': known recipes are .*tiny"):
        recipe_path("nope")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the source (setuptools writes build/ beside what it builds)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("configs", "genpt_dist"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=out,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (found,) = out.glob("genpt_dist-*.whl")
    return found


@pytest.mark.slow  # builds a wheel: ~10 s
def test_wheel_carries_recipes_and_every_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for path in CONFIGS:
            assert zf.read(f"genpt_dist/_recipes/{path.name}") == path.read_bytes()
    assert not any(n.startswith("configs/") for n in names)
    missing = [p for p in PACKAGES if p.replace(".", "/") + "/__init__.py" not in names]
    assert not missing, f"packages not in the wheel (add them to [tool.setuptools] packages): {missing}"


@pytest.mark.slow  # builds a wheel: ~10 s
def test_recipes_resolve_from_the_unpacked_wheel(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    # -S: no site-packages, so neither this checkout nor its editable install can answer instead.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from genpt_dist.recipes import recipe_names, recipe_path; "
        "print(recipe_names()); print(recipe_path('tiny'))"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code, str(site)], capture_output=True, text=True, timeout=60, cwd=tmp_path, env={}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    names, tiny = proc.stdout.splitlines()
    assert names == repr([p.stem for p in CONFIGS])
    assert Path(tiny) == site / "genpt_dist" / "_recipes" / "tiny.yaml"
