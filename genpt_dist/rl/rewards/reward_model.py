"""`model:` rewards: a frozen sequence classifier scores each prompt + completion.

Two kinds of folder (local or s3://):
* a Hugging Face `AutoModelForSequenceClassification` folder (`config.json` whose `architectures`
  end in `ForSequenceClassification`) with its tokenizer, scored as TRL's GRPOTrainer scores a
  reward model: the texts `prompt + completion` are tokenised by the folder's own tokenizer (right
  padding, no special tokens added) and the reward is the first logit, `model(**inputs).logits[:, 0]`,
  in float32 without gradients (copied to a temporary folder first; needs `transformers`);
* a checkpoint of ours whose run trained a discriminator (`adversarial`, or `reinforce` with the
  `discriminator` reward): its D, frozen, with its run's tokenizer; the reward is D's logit of
  `<bos> prompt completion <eos>` (the prompt and completion encoded apart, as a rollout row holds
  them; the first `block_size` tokens), so a D trained online in one run can guide another.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch

from genpt_dist import storage
from genpt_dist.checkpoint import CheckpointRef, consolidate_local, load_tokenizer, resolve
from genpt_dist.errors import UserError
from genpt_dist.meta import CheckpointMeta
from genpt_dist.model.discriminator import Discriminator, DiscriminatorConfig


def _our_checkpoint(url: str) -> CheckpointRef | None:
    """`url` as a checkpoint (or run) of ours, or None when it holds none (a Hugging Face folder among them)."""
    if storage.exists(storage.join(storage.normalize(url), "config.json")):
        return None  # a transformers folder (or an export): scored as a Hugging Face model
    try:
        return resolve(url)
    except UserError:
        return None


def check_reward_model(url: str) -> None:
    """A one-line UserError unless `url` is a Hugging Face sequence-classifier folder (and transformers loads)
    or a checkpoint of ours with a trained discriminator."""
    ref = _our_checkpoint(url)
    if ref is not None:
        meta = ref.meta
        if not isinstance(meta, CheckpointMeta) or meta.rl is None or meta.rl.discriminator is None:
            raise UserError(
                f"--reward model:{url}: a checkpoint of stage {meta.stage!r} without a discriminator "
                "(model: takes a Hugging Face sequence classifier or an RL checkpoint that trained one)"
            )
        return
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


class RewardModel(Protocol):
    def score(self, prompts: list[str], completions: list[str]) -> list[float]: ...


def load_reward_model(url: str) -> RewardModel:
    """The scorer for `model:URL` (in a rollout actor): our discriminator or a Hugging Face classifier."""
    ref = _our_checkpoint(url)
    return DiscriminatorRewardModel(ref) if ref is not None else HFRewardModel(url)


class DiscriminatorRewardModel:
    """A discriminator trained by one of our RL runs, frozen, with that run's tokenizer."""

    def __init__(self, ref: CheckpointRef, batch_size: int = 16):
        from genpt_dist.rl.disc_learner import DISC_DIR

        meta = ref.meta
        assert isinstance(meta, CheckpointMeta) and meta.rl is not None and meta.rl.discriminator is not None
        self.tokenizer = load_tokenizer(ref)
        self.model = Discriminator(DiscriminatorConfig(**meta.rl.discriminator))
        with tempfile.TemporaryDirectory(prefix="genpt-reward-disc-") as tmp:
            storage.download_dir(storage.join(ref.url, DISC_DIR), Path(tmp) / DISC_DIR)
            state = consolidate_local(tmp, min(meta.zero_stage, 2), engine_dir=DISC_DIR)  # D is at most ZeRO-2
        self.model.load_state_dict(state)
        self.model.float().eval().requires_grad_(False)
        self.batch_size = batch_size

    def token_rows(self, prompts: list[str], completions: list[str]) -> list[list[int]]:
        tok, width = self.tokenizer, self.model.config.block_size
        return [[tok.bos_id, *tok.encode(p), *tok.encode(c), tok.eos_id][:width] for p, c in zip(prompts, completions)]

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """(B,) rewards: D's logit of each row (right-padded with <pad>, masked)."""
        rows, pad, out = self.token_rows(prompts, completions), self.tokenizer.pad_id, []
        for lo in range(0, len(rows), self.batch_size):
            chunk = rows[lo : lo + self.batch_size]
            width = max(len(r) for r in chunk)
            idx = torch.tensor([r + [pad] * (width - len(r)) for r in chunk])  # (b, T)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk])  # (b, T)
            out.extend(self.model(idx, attention_mask=mask).float().tolist())
        return out


class HFRewardModel:
    """A Hugging Face sequence classifier and its tokenizer, loaded once (in a rollout actor)."""

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
