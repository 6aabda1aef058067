"""From a YAML recipe and `--set` overrides to a validated `Config`, and the recipes shipped with the package.

`--set a.b=c` overrides are applied to the raw mapping before validation, so unknown keys and bad values
fail once, here, with the dotted path of the offending key.

The shipped recipes are found by name (`--config tiny`, `load_recipe("oracle")`) through `genpt_dist.recipes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from genpt_dist.config.recipe import Config
from genpt_dist.errors import UserError
from genpt_dist.recipes import SUFFIX, recipe_path


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"config error at {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=c` -> ("a.b", yaml-parsed c)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"bad --set {text!r}: expected key=value, e.g. train.steps=100")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise UserError(f"bad --set {text!r}: value is not valid YAML ({exc.__class__.__name__})") from None


def _format_validation_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    path = ".".join(str(p) for p in err["loc"]) or "<root>"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"config error at {path}: {msg}{more}"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe (a file, a shipped recipe's name, or the defaults), apply `--set` overrides,
    validate once."""
    raw: dict[str, Any] = {}
    if path is not None and not Path(path).exists() and "/" not in str(path) and not str(path).endswith(SUFFIX):
        path = recipe_path(str(path))  # a shipped recipe by name: `--config tiny`
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise UserError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"config {path} is not valid YAML{where}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_format_validation_error(exc)) from None


def load_recipe(name: str, overrides: Sequence[str] = ()) -> Config:
    """The shipped recipe `name`, with `--set` style overrides applied, validated."""
    return load_config(recipe_path(name), list(overrides))
