"""Typed configs: every recipe under configs/ validates, overrides apply, bad input names its path."""

from __future__ import annotations

from pathlib import Path

import pytest

from genpt_dist.config import Config, load_config
from genpt_dist.errors import UserError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "demo.yaml", "seed-300d.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_recipe_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.model.d_model % cfg.model.n_head == 0
    assert cfg.block_size >= cfg.data.seq_len >= 2
    # the recipe sets nothing the schema would silently drop: a round trip is identical
    assert Config.model_validate(cfg.model_dump()) == cfg


def test_seed_recipe_is_the_articles_model():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "seed-300d.yaml")
    assert (cfg.model.d_model, cfg.data.seq_len) == (300, 256)


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == Config()


def test_set_overrides_apply_with_yaml_types():
    cfg = load_config(
        CONFIGS[0],
        ["train.steps=7", "optim.lr=1e-3", "data.split=hash", "scaling.num_workers=[1, 3]", "model.dropout=0.25"],
    )
    assert cfg.train.steps == 7
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.data.split == "hash"
    assert cfg.scaling.worker_range == (1, 3)
    assert cfg.model.dropout == 0.25


def test_later_override_wins():
    assert load_config(None, ["train.steps=5", "train.steps=9"]).train.steps == 9


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stepz=5"], r"config error at train\.stepz: unknown key"),
        (["data.tokenizer_kind=bpe"], r"config error at data\.tokenizer_kind: unknown key"),
        (["nosuchsection.x=1"], r"config error at nosuchsection: unknown key"),
        (["train.steps=many"], r"config error at train\.steps: .*integer"),
        (["train.steps=0"], r"config error at train\.steps: .*greater than or equal to 1"),
        (["data.split=random"], r"config error at data\.split: .*'hash' or 'tail'"),
        (["model.n_head=3", "model.d_model=128"], r"config error at model: n_head=3 does not divide d_model=128"),
        (["data.seq_len=1"], r"config error at data\.seq_len: .*greater than or equal to 2"),
        (["data.tokenizer=bpe", "data.vocab_size=200"], r"config error at data: vocab_size=200 is smaller than .*259"),
        (["model.block_size=32", "data.seq_len=64"], r"block_size=32 is shorter than data\.seq_len=64"),
        (["deepspeed.offload_params=true", "deepspeed.zero_stage=2"], r"offload_params needs zero_stage 3"),
        (["train=5"], r"config error at train: "),
        (["train.steps=5", "train.steps.deeper=1"], r"train\.steps\.deeper: steps is not a section"),
        (["train.steps.deeper=1"], r"config error at train\.steps: .*integer"),
        (["no_equals_sign"], r"bad --set 'no_equals_sign': expected key=value"),
        (
            ["reinforce.mc_rollouts=2", "reinforce.baseline=reinforce++"],
            r"config error at reinforce: mc_rollouts needs a baseline in reward units .* not reinforce\+\+",
        ),
    ],
)
def test_bad_values_name_the_dotted_path(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_byte_tokenizer_ignores_vocab_size():
    cfg = load_config(None, ["data.tokenizer=byte", "data.vocab_size=10"])
    assert cfg.data.tokenizer == "byte"


def test_unknown_key_in_a_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: 2\n  n_heads: 2\n")
    with pytest.raises(UserError, match=r"config error at model\.n_heads: unknown key"):
        load_config(bad)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(listy)


def _fields(model: type, path: str = ""):
    """(dotted path, field name) of every leaf and section of a pydantic config class."""
    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        yield f"{path}{name}", name
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from _fields(kind, f"{path}{name}.")


def test_every_config_field_is_read_somewhere():
    """An option nothing reads is a lie in the docs: each field name is read as an attribute (`.name`)
    somewhere in the package outside config.py."""
    import re

    from genpt_dist.config import Config

    package = Path(__file__).resolve().parents[1] / "genpt_dist"
    source = "\n".join(p.read_text() for p in package.rglob("*.py") if p.name != "config.py")
    unread = sorted(path for path, name in _fields(Config) if not re.search(rf"\.{name}\b", source))
    assert not unread, f"config fields read nowhere in genpt_dist/: {unread}"
