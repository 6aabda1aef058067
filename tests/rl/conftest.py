"""What the RL tests share: tiny tinyshakespeare data and a barely trained generator, made once."""

from __future__ import annotations

from pathlib import Path

import pytest

from genpt_dist.config import load_config
from genpt_dist.data.prepare import prepare

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def data_and_base(ray_session, shakespeare, tmp_path_factory) -> tuple[str, str]:
    """(data, base): the tiny recipe's dataset and a 3-step generator (its samples are easy to tell from
    real text), shared by the adversarial and reinforce command tests; trained in this process."""
    from helpers import local_pretrain

    root = tmp_path_factory.mktemp("rl-base")
    data = str(root / "data")
    prepare([str(shakespeare)], data, load_config(TINY).data)
    base = str(root / "base")
    local_pretrain(data, base, load_config(TINY, ["train.steps=3", "train.checkpoint_every=3", "train.eval_every=3"]))
    return data, base
