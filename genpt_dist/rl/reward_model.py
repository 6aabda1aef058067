"""`model:` rewards: a frozen Hugging Face sequence classifier scores each prompt + completion.

Scored as TRL's GRPOTrainer scores a reward model: the texts `prompt + completion` are tokenised by
the folder's own tokenizer (right padding, no special tokens added), and the reward is the first
logit of the classifier's output, `model(**inputs).logits[:, 0]`, computed in float32 without
gradients. The folder (local or s3://, copied to a temporary folder first) must hold an
`AutoModelForSequenceClassification` (`config.json` whose `architectures` end in
`ForSequenceClassification`) and its tokenizer; `transformers` is needed only for this reward.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from genpt_dist import storage
from genpt_dist.errors import UserError


def check_reward_model(url: str) -> None:
    """A one-line UserError unless `url` is a Hugging Face sequence-classifier folder and transformers loads."""
    config_url = storage.join(storage.normalize(url), "config.json")
    try:
        config = storage.read_json(config_url)
    except FileNotFoundError:
        raise UserError(f"--reward model:{url}: no config.json there (not a Hugging Face model folder)") from None
    except ValueError:
        raise UserError(f"--reward model:{url}: config.json is not valid JSON") from None
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise UserError(
            f"--reward model:{url}: not a sequence classifier (architectures: "
            f"{', '.join(map(str, architectures)) or 'none'})"
        )
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("--reward model:...: needs the transformers package (pip install transformers)") from None


class RewardModel:
    """The classifier and its tokenizer, loaded once (in a rollout actor)."""

    def __init__(self, url: str, batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self._tmp = tempfile.TemporaryDirectory(prefix="genpt-reward-model-")
        local = Path(self._tmp.name)
        storage.download_dir(storage.normalize(url), local)
        self.tokenizer = AutoTokenizer.from_pretrained(str(local))
        if self.tokenizer.pad_token is None:  # GPT-2 tokenizers have none: pad with eos, as TRL does
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(str(local)).float().eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """(B,) rewards: the first logit for each `prompt + completion`."""
        texts = [p + c for p, c in zip(prompts, completions)]
        out: list[float] = []
        for lo in range(0, len(texts), self.batch_size):
            inputs: Any = self.tokenizer(
                texts[lo : lo + self.batch_size],
                return_tensors="pt",
                padding=True,
                padding_side="right",
                add_special_tokens=False,
            )
            out.extend(self.model(**inputs).logits[:, 0].float().tolist())
        return out
