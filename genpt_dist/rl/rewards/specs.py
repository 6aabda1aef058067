"""User-chosen rewards for the REINFORCE stage, compatible with TRL's reward functions.

A run names its rewards with ``--reward SPEC`` (repeatable)::

    SPEC := python:FILE.py:FUNC | python:package.module:FUNC | model:CKPT_OR_FOLDER | discriminator
            followed by an optional @WEIGHT (a finite float, may be negative; default 1.0)

``FILE.py`` is relative to the current directory or absolute; a python target is split on its *last*
``:``, so ``FUNC`` never holds one. The weight is whatever follows the *last* ``@``: a model URL that
itself contains ``@`` must therefore be given with an explicit weight (``model:a@b@1.0``). Each
component gets a metric name: the function's name, ``model`` or ``discriminator``, with ``_2``,
``_3``... appended to repeats so names are unique within a run.

The python contract is TRL's (``GRPOTrainer``): the function is called once per batch as
``f(prompts=[...], completions=[...], **columns)``, every argument a list with one entry per row, where
``columns`` holds each dataset column by name (the union of the rows' keys; a row that lacks a key
passes None there; a column named ``prompts`` or ``completions`` cannot be passed and is dropped). It
returns a list (or tuple) of the same length of numbers (bool counts: True is 1.0) or None, meaning
"this row is not scored by me"; None becomes NaN here. A function that raises, returns something
else, or returns NaN / inf is a `RewardError` naming the function. TRL's
``def reward_len(completions, **kwargs)`` works unchanged.

Combination: the reward of a row is ``sum_k weight_k * value_k`` over the components that scored it
(NaN components are skipped per row); a row that no component scored stays NaN, i.e. not scored, and
it is the caller's to drop or mask. The ``model`` and ``discriminator`` components are scored
elsewhere, by the rollout worker's models (`reward_model`, `discriminator`); this module only loads and
calls the python ones and combines whatever tensors it is given.
"""

from __future__ import annotations

import importlib
import itertools
import math
import numbers
import re
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from genpt_dist.errors import UserError

SPEC_FORMS = (
    "python:FILE.py:FUNC, python:package.module:FUNC, model:CKPT_OR_FOLDER or discriminator, with an optional @WEIGHT"
)
_FLOAT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_module_ids = itertools.count()  # unique module names for reward files imported by path


class RewardError(UserError):
    """A python reward function misbehaved (raised, or returned the wrong thing): one line naming it."""


@dataclass(frozen=True)
class RewardSpec:
    """One reward component, as parsed from ``--reward``."""

    kind: Literal["python", "model", "discriminator"]
    # python: "path/to/file.py:FUNC" or "package.module:FUNC"; model: a checkpoint/folder URL; discriminator: ""
    target: str
    weight: float  # from an optional "@WEIGHT" suffix, default 1.0
    name: str  # the component's metric name, unique within a spec list


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _bad(text: str) -> UserError:
    return UserError(f"bad --reward {text!r}: expected {SPEC_FORMS}")


def _parse_one(text: str) -> tuple[Literal["python", "model", "discriminator"], str, float, str]:
    """(kind, target, weight, base name) of one spec, or a UserError."""
    body, weight = text, 1.0
    if "@" in text:
        body, _, w = text.rpartition("@")
        if not _FLOAT.fullmatch(w) or not math.isfinite(float(w)):
            raise _bad(text)
        weight = float(w)
    if body == "discriminator":
        return "discriminator", "", weight, "discriminator"
    kind, sep, target = body.partition(":")
    if not sep:
        raise _bad(text)
    if kind == "model":
        if not target.strip():
            raise _bad(text)
        return "model", target, weight, "model"
    if kind == "python":
        where, sep, func = target.rpartition(":")
        if not sep or not func.isidentifier():
            raise _bad(text)
        is_file = where.endswith(".py") and len(Path(where).name) > len(".py")
        if not is_file and not _MODULE.fullmatch(where):
            raise _bad(text)
        return "python", target, weight, func
    raise _bad(text)


def parse_reward_specs(texts: list[str]) -> list[RewardSpec]:
    """Parse ``--reward`` values (see the module docstring); names are made unique with _2, _3..."""
    if not texts:
        raise UserError(f"no --reward given: name at least one of {SPEC_FORMS}")
    specs: list[RewardSpec] = []
    taken: set[str] = set()
    for text in texts:
        kind, target, weight, base = _parse_one(text)
        name = base
        for n in itertools.count(2):
            if name not in taken:
                break
            name = f"{base}_{n}"
        taken.add(name)
        specs.append(RewardSpec(kind=kind, target=target, weight=weight, name=name))
    return specs


def reward_file(spec: RewardSpec) -> str | None:
    """The FILE.py of a `python:FILE.py:FUNC` spec as given (None for a module or another kind of spec)."""
    where = spec.target.rpartition(":")[0]
    return where if spec.kind == "python" and where.endswith(".py") else None


def read_reward_file(file: str) -> bytes:
    """The bytes of a reward file, relative to the current folder or absolute (UserError if it is missing)."""
    path = Path(file) if Path(file).is_absolute() else Path.cwd() / file
    if not path.is_file():
        raise UserError(f"reward file {file!r} does not exist (looked for {str(path)!r})")
    return path.read_bytes()


def _import_file(file: str, source: bytes | None = None) -> Any:
    """Import a reward file as a module of its own: from `source` (its bytes, read elsewhere) or from disk.
    The module's `__file__` and its tracebacks name the file as given, wherever the bytes came from."""
    if source is None:
        source = read_reward_file(file)
    stem = re.sub(r"\W", "_", Path(file).stem)
    module_name = f"_genpt_reward_{next(_module_ids)}_{stem}"
    module = types.ModuleType(module_name)
    module.__file__ = file
    sys.modules[module_name] = module  # so dataclasses, pickling and relative lookups inside it work
    try:
        exec(compile(source, file, "exec"), module.__dict__)
    except Exception as e:
        del sys.modules[module_name]
        raise UserError(f"reward file {file!r} raised on import: {type(e).__name__}: {_one_line(str(e))}") from e
    return module


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"reward module {name!r} is not importable: {_one_line(str(e))}") from e
    except Exception as e:
        raise UserError(f"reward module {name!r} raised on import: {type(e).__name__}: {_one_line(str(e))}") from e


def load_reward_function(spec: RewardSpec, source: bytes | None = None) -> Callable[..., list]:
    """Import a python spec's module or file and return its function (UserError on any failure). `source`:
    the file's bytes, read elsewhere (a rollout actor gets the driver's), else the file is read here."""
    if spec.kind != "python":
        raise ValueError(f"only python reward specs are loaded here, got kind {spec.kind!r}")
    where, _, func = spec.target.rpartition(":")
    is_file = reward_file(spec) is not None
    module = _import_file(where, source) if is_file else _import_module(where)
    what = f"reward file {where!r}" if is_file else f"reward module {where!r}"
    if not hasattr(module, func):
        raise UserError(f"{what} has no function {func!r}")
    fn = getattr(module, func)
    if not callable(fn):
        raise UserError(f"{what}: {func!r} is not callable (it is a {type(fn).__name__})")
    return fn


def _as_float(value: Any, row: int, label: str) -> float:
    if value is None:
        return math.nan
    if not isinstance(value, numbers.Real):  # bool, int, float and numpy scalars are Real
        raise RewardError(f"{label} returned a non-number at row {row}: {_one_line(repr(value))[:200]}")
    out = float(value)
    if not math.isfinite(out):
        raise RewardError(f"{label} returned {out} at row {row} (return None for a row it does not score)")
    return out


class PythonRewards:
    """The spec list's python components, loaded once (in a rollout actor); `score` calls each batched."""

    def __init__(self, specs: list[RewardSpec], sources: Mapping[str, bytes] | None = None):
        """`sources`: reward files' bytes by FILE.py as the specs give it (those not in it are read here)."""
        self.specs = [s for s in specs if s.kind == "python"]
        self.functions = {
            s.name: load_reward_function(s, (sources or {}).get(reward_file(s) or "")) for s in self.specs
        }

    def score(
        self, prompts: list[str], completions: list[str], columns: list[dict[str, Any]]
    ) -> dict[str, list[float]]:
        """{spec.name: one float per row, NaN where the function returned None} for every python spec."""
        n = len(completions)
        if len(prompts) != n or len(columns) != n:
            raise ValueError(f"{len(prompts)} prompts, {n} completions and {len(columns)} column rows differ")
        keys = [k for k in dict.fromkeys(k for row in columns for k in row) if k not in ("prompts", "completions")]
        kwargs = {k: [row.get(k) for row in columns] for k in keys}
        out: dict[str, list[float]] = {}
        for spec in self.specs:
            label = f"reward function {spec.name!r} ({spec.target})"
            try:
                values = self.functions[spec.name](prompts=list(prompts), completions=list(completions), **kwargs)
            except Exception as e:
                raise RewardError(f"{label} raised {type(e).__name__}: {_one_line(str(e))}") from e
            if not isinstance(values, (list, tuple)):
                raise RewardError(f"{label} returned a {type(values).__name__}, expected a list of {n} numbers")
            if len(values) != n:
                raise RewardError(f"{label} returned {len(values)} values, expected {n} (one per completion)")
            out[spec.name] = [_as_float(v, i, label) for i, v in enumerate(values)]
        return out


def combine(components: dict[str, torch.Tensor], specs: list[RewardSpec]) -> torch.Tensor:
    """(B,) sum over components of weight * value, NaN components skipped per row.

    A row where every component is NaN stays NaN (not scored). ``components`` maps each spec's name to
    its (B,) values, one entry per spec, no others.
    """
    if not specs:
        raise ValueError("combine needs at least one reward spec")
    missing = [s.name for s in specs if s.name not in components]
    extra = sorted(set(components) - {s.name for s in specs})
    if missing or extra:
        raise ValueError(f"reward components do not match the specs: missing {missing}, unexpected {extra}")
    values = torch.stack([components[s.name].float() for s in specs])  # (K, B)
    weights = torch.tensor([s.weight for s in specs], dtype=values.dtype, device=values.device)[:, None]  # (K, 1)
    scored = ~torch.isnan(values)  # (K, B)
    total = torch.where(scored, weights * values, torch.zeros_like(values)).sum(dim=0)  # (B,)
    return torch.where(scored.any(dim=0), total, torch.full_like(total, math.nan))  # (B,)


def component_stats(components: dict[str, torch.Tensor]) -> dict[str, float]:
    """{f"reward/{name}/mean": ..., f"reward/{name}/std": ...} over the scored (non-NaN) rows.

    NaN-free: both are 0.0 when no row was scored. The std is the population std (0.0 for one row).
    """
    stats: dict[str, float] = {}
    for name, value in components.items():
        v = value.float().flatten()  # (B,)
        v = v[~torch.isnan(v)]  # (n_scored,)
        scored = v.numel() > 0
        stats[f"reward/{name}/mean"] = v.mean().item() if scored else 0.0
        stats[f"reward/{name}/std"] = v.std(correction=0).item() if scored else 0.0  # population std: 1 row -> 0
    return stats
