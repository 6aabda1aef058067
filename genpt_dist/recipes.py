"""The YAML recipes shipped with the package, found by name: `recipe_path("tiny")`, `recipe_names()`.

The recipes' source is the top-level `configs/` folder. pyproject.toml maps the data-only package
`genpt_dist._recipes` onto that folder, so a wheel carries them as `genpt_dist/_recipes/*.yaml`, read with
importlib.resources. A source tree, installed editable or not at all, reads the `configs/` beside the
package instead: setuptools' editable finder does not resolve a namespace package nested in a regular one.

A leaf: it imports nothing of the package but its errors (and no third-party library), so the recipes
resolve wherever the package is unpacked; `genpt_dist.config.load_recipe` reads and validates one.
"""

from __future__ import annotations

import importlib.resources
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from genpt_dist.errors import UserError

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

PACKAGE = "genpt_dist._recipes"
SUFFIX = ".yaml"
_SOURCE_TREE = Path(__file__).resolve().parent.parent / "configs"


def _folder() -> Traversable:
    """Where the recipes are: the package data of an installed wheel, else the source tree's configs/."""
    try:
        return importlib.resources.files(PACKAGE)
    except ModuleNotFoundError:
        return _SOURCE_TREE


def recipe_names() -> list[str]:
    """The names of the shipped recipes (file names without `.yaml`), sorted."""
    return sorted(p.name.removesuffix(SUFFIX) for p in _folder().iterdir() if p.name.endswith(SUFFIX))


def recipe_path(name: str) -> Path:
    """The file of the shipped recipe `name` (`tiny`, `demo`, `oracle`, ...)."""
    known = recipe_names()
    if name not in known:
        raise UserError(f"unknown recipe {name!r}: known recipes are {', '.join(known)}")
    return Path(str(_folder().joinpath(name + SUFFIX)))  # a file on disk: wheels are installed unpacked
