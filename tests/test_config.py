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
    somewhere in the package outside genpt_dist/config/."""
    import re

    from genpt_dist.config import Config

    package = Path(__file__).resolve().parents[1] / "genpt_dist"
    source = "\n".join(p.read_text() for p in package.rglob("*.py") if p.relative_to(package).parts[0] != "config")
    unread = sorted(path for path, name in _fields(Config) if not re.search(rf"\.{name}\b", source))
    assert not unread, f"config fields read nowhere in genpt_dist/: {unread}"


def test_each_stage_section_has_its_stage_defaults():
    cfg = Config()
    assert (cfg.train.steps, cfg.reinforce.train.steps, cfg.adversarial.train.steps, cfg.finetune.train.steps) == (
        200,
        50,
        50,
        200,
    )
    assert cfg.adversarial.rewards == ["discriminator"] and cfg.reinforce.rewards == []
    assert (cfg.optim.lr, cfg.adversarial.optim.lr, cfg.finetune.optim.lr) == (6e-4, 2e-5, 3e-4)
    assert cfg.adversarial.optim.min_lr_ratio == 1.0 and cfg.finetune.optim.warmup_steps == 10
    assert (cfg.sampling.max_new_tokens, cfg.reinforce.rollout.sampling.max_new_tokens) == (128, 64)
    assert (cfg.model.n_layer, cfg.adversarial.discriminator.model.n_layer) == (4, 2)
    assert cfg.adversarial.discriminator.model.dropout == 0.1


def test_a_stage_key_a_recipe_leaves_out_keeps_the_stage_default():
    cfg = load_config(
        None,
        [
            "adversarial.train.steps=3",
            "reinforce.rollout.sampling.top_k=7",
            "finetune.optim.lr=1e-4",
            "adversarial.discriminator.model.d_model=64",
        ],
    )
    assert (cfg.adversarial.train.steps, cfg.adversarial.train.micro_batch_size) == (3, 16)
    assert (cfg.reinforce.rollout.sampling.top_k, cfg.reinforce.rollout.sampling.max_new_tokens) == (7, 64)
    assert (cfg.finetune.optim.lr, cfg.finetune.optim.warmup_steps) == (1e-4, 10)
    assert (cfg.adversarial.discriminator.model.d_model, cfg.adversarial.discriminator.model.n_layer) == (64, 2)
    assert cfg.adversarial.rewards == ["discriminator"]
    assert load_config(None, ["adversarial.rewards=[]"]).adversarial.rewards == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["adversarial.train.stepz=1"], r"config error at adversarial\.train\.stepz: unknown key"),
        (["reinforce.optim.learning_rate=1"], r"config error at reinforce\.optim\.learning_rate: unknown key"),
        (["reinforce.rollout.sampling.top_q=0.5"], r"config error at reinforce\.rollout\.sampling\.top_q: unknown key"),
        (
            ["adversarial.discriminator.model.n_heads=2"],
            r"config error at adversarial\.discriminator\.model\.n_heads: unknown key",
        ),
        (["finetune.train.steps=0"], r"config error at finetune\.train\.steps: .*greater than or equal to 1"),
        (
            ["finetune.train.checkpoint_every=7"],
            r"config error at finetune\.train: checkpoint_every=7 must be a multiple of eval_every=25",
        ),
    ],
)
def test_bad_stage_section_keys_name_the_dotted_path(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_finetune_checkpoints_follow_its_evaluations_unless_set():
    assert load_config(None, ["finetune.train.eval_every=10"]).finetune.train.checkpoint_every == 10
    cfg = load_config(None, ["finetune.train.eval_every=10", "finetune.train.checkpoint_every=30"])
    assert cfg.finetune.train.checkpoint_every == 30


def test_assignments_are_validated():
    from pydantic import ValidationError

    cfg = Config()
    cfg.reinforce.train.steps = 7
    assert cfg.reinforce.train.steps == 7
    with pytest.raises(ValidationError):
        cfg.adversarial.train.steps = 0
    with pytest.raises(ValidationError):
        cfg.finetune.optim.lr = -1.0


def test_validating_a_config_has_no_side_effect(monkeypatch):
    """Validation reads the config alone: a tracking URI validates where MLflow is missing (the stage's
    driver refuses it: tests/train/test_tracking.py), and the config package imports nothing of the package
    but itself, its errors and the recipe lookup (a leaf), so nothing it imports can import it back
    (tests/test_imports.py checks the whole graph)."""
    import ast
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)  # how Python marks a module that cannot be imported
    uri = load_config(None, ["tracking.mlflow_uri=file:///tmp/mlruns"]).tracking.mlflow_uri
    assert uri == "file:///tmp/mlruns"
    package = Path(__file__).resolve().parents[1] / "genpt_dist" / "config"
    imported = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
    assert {m for m in imported if m.startswith("genpt_dist.")} <= {
        m for m in imported if m.startswith(("genpt_dist.config", "genpt_dist.errors", "genpt_dist.recipes"))
    }
