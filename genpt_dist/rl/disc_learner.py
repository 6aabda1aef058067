"""The online discriminator's learner: D's DeepSpeed engine, its update, its part of a checkpoint.

D (`model.discriminator`, a Transformer encoder with one logit per row) is trained with binary
cross-entropy on real windows (label 1) against the policy's samples (label 0), padded to one width
with <pad>; generated tokens after a row's stop are replaced by <pad> so that D sees exactly what
the rollout produced. It has its own AdamW (betas 0.9/0.99, weight decay 0.01, constant LR) inside a
DeepSpeed engine of ZeRO stage <= 2 (it is small; parameters are never offloaded), so it checkpoints
and re-partitions like the policy. Its weights are published to the rollout actors beside the
policy's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from genpt_dist.config import Config, ReinforceConfig
from genpt_dist.model.discriminator import Discriminator, DiscriminatorConfig

DISC_DIR = "ds_disc"


def disc_model_config(
    section: ReinforceConfig, vocab_size: int, pad_id: int, context: int | None = None
) -> DiscriminatorConfig:
    """D's shape from the stage's section; it reads <bos> + prompt_len + max_new_tokens tokens of real-text
    prompts, or up to `context` tokens (the policy's) when prompts of any length come from a file."""
    d, r = section.discriminator.model, section.rollout
    return DiscriminatorConfig(
        vocab_size=vocab_size,
        block_size=context or 1 + r.prompt_len + r.sampling.max_new_tokens,
        n_layer=d.n_layer,
        n_head=d.n_head,
        d_model=d.d_model,
        dropout=d.dropout,
        pad_id=pad_id,
    )


def disc_context(policy_block_size: int, prompts_from_file: bool) -> int | None:
    """D's context for `disc_model_config`: the policy's when the prompts come from a file (any length),
    else None (the real-text windows')."""
    return policy_block_size if prompts_from_file else None


class DiscriminatorLearner:
    """D's engine and its BCE update (built inside a worker, after the policy's engine)."""

    def __init__(self, cfg: Config, section: ReinforceConfig, model_cfg: DiscriminatorConfig, *, precision: str):
        from genpt_dist.train.deepspeed import build_ds_config, build_engine

        self.config, self.pad_id = model_cfg, model_cfg.pad_id
        torch.manual_seed(section.train.seed + 1)
        disc = Discriminator(model_cfg)
        ds_cfg = cfg.deepspeed.model_copy(
            update={"zero_stage": min(cfg.deepspeed.zero_stage, 2), "offload_params": False}
        )
        ds = build_ds_config(
            ds_cfg,
            micro_batch_size=section.train.micro_batch_size,
            grad_accum=1,
            grad_clip=section.optim.grad_clip,
            precision=precision,
            use_gpu=cfg.scaling.use_gpu,
        )
        opt = torch.optim.AdamW(disc.parameters(), lr=section.discriminator.lr, betas=(0.9, 0.99), weight_decay=0.01)
        self.engine = build_engine(disc, ds, opt, None)

    def update(
        self, real: torch.Tensor, fake: torch.Tensor, fake_mask: torch.Tensor, step: bool = True
    ) -> dict[str, float]:
        """One BCE step on real (n, W) vs generated (m, W') rows, `fake_mask` 1 on the rollout's own tokens;
        with step=False only the loss and accuracies are measured."""
        pad, device = self.pad_id, self.engine.device
        width = max(real.shape[1], fake.shape[1])
        real = F.pad(real, (0, width - real.shape[1]), value=pad)  # (n, W)
        fake = F.pad(fake * fake_mask + pad * (1 - fake_mask), (0, width - fake.shape[1]), value=pad)  # (m, W)
        x = torch.cat([real, fake]).to(device)  # (n + m, W)
        y = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).to(device)  # (n + m,)
        with torch.set_grad_enabled(step):
            logits = self.engine(x, (x != pad).long()).float()  # (n + m,)
            loss = F.binary_cross_entropy_with_logits(logits, y)
        if step:
            self.engine.backward(loss)
            self.engine.step()
        pred = (logits.detach() > 0).float()
        return {
            "d_loss": loss.item(),
            "d_acc_real": (pred[: len(real)] == 1).float().mean().item(),
            "d_acc_fake": (pred[len(real) :] == 0).float().mean().item(),
        }

    def train_on(self, real: torch.Tensor, fake: torch.Tensor, fake_mask: torch.Tensor, steps: int) -> dict[str, float]:
        """`steps` updates on the same real vs generated rows (0: only measured); the first update's figures."""
        stats = self.update(real, fake, fake_mask, step=steps > 0)
        for _ in range(steps - 1):
            self.update(real, fake, fake_mask)
        return stats

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """D's full fp32 weights (a collective under ZeRO-3; D is at most ZeRO-2)."""
        from genpt_dist.train.deepspeed import gather_full_state_dict

        return gather_full_state_dict(self.engine)

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder / DISC_DIR), tag="state")

    def load(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder / DISC_DIR), tag="state")

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)
