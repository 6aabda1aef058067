"""The maximum-likelihood stages' sections: optimizer, DeepSpeed, workers, schedule, and fine-tuning's own."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from genpt_dist.config.base import Section


class OptimConfig(Section):
    """AdamW with linear warmup and cosine decay."""

    lr: float = Field(6e-4, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final LR as a fraction of the peak")
    warmup_steps: int = Field(50, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay on matrices")
    beta1: float = Field(0.9, gt=0, lt=1, description="Adam beta1")
    beta2: float = Field(0.95, gt=0, lt=1, description="Adam beta2")
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clip (0 = off)")


class DeepSpeedConfig(Section):
    """What each worker's DeepSpeed engine does."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage")
    offload_optimizer: bool = Field(False, description="keep optimizer state on the CPU (ZeRO 1-3)")
    offload_params: bool = Field(False, description="keep parameters on the CPU (ZeRO 3)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="auto = GPU: bf16 where supported, else fp16; CPU: bf16 where a short matmul measures it "
        "faster than fp32, else fp32",
    )
    grad_accum: int = Field(1, ge=1, description="micro batches per optimizer step (pretrain, finetune)")

    @model_validator(mode="after")
    def _check_offload(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class ScalingConfig(Section):
    """How many Ray Train workers and what each gets."""

    num_workers: int | tuple[int, int] = Field(2, description="workers, or [min, max] for elastic training")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (also its torch threads)")
    use_gpu: bool = Field(False, description="one GPU per worker, nccl backend")
    timeout_s: int = Field(1800, ge=10, description="collective timeout")
    max_failures: int = Field(3, ge=-1, description="worker-group restarts before the run fails (-1 = forever)")

    @field_validator("num_workers")
    @classmethod
    def _check_workers(cls, n: int | tuple[int, int]) -> int | tuple[int, int]:
        lo, hi = (n, n) if isinstance(n, int) else n
        if lo < 1:
            raise ValueError(f"must be >= 1, got {lo}")
        if lo > hi:
            raise ValueError(f"min {lo} > max {hi}")
        return n

    @property
    def worker_range(self) -> tuple[int, int]:
        n = self.num_workers
        return (n, n) if isinstance(n, int) else (n[0], n[1])


class TrainConfig(Section):
    """A stage's schedule: steps, batch, and the cadence of logs, evaluations and checkpoints.

    `train` is pretraining's. Every later stage's `train` is a subclass that changes only defaults
    (`FinetuneTrain`, `rl.ReinforceTrain`): a key its recipe leaves out takes that stage's value, not
    pretraining's."""

    steps: int = Field(200, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(8, ge=1, description="samples per rank per micro step")
    eval_every: int = Field(50, ge=1, description="steps between val evaluations")
    eval_batches: int = Field(4, ge=1, description="val batches per rank per evaluation")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints (and one at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept in the run's storage")
    log_every: int = Field(10, ge=1, description="steps between progress lines")
    seed: int = Field(1337, description="model init and dropout seed")


class FinetuneTrain(TrainConfig):
    """`finetune.train`: frequent evaluations, each of which saves a checkpoint, so that the best one by val
    loss is kept and early stopping can act on it."""

    eval_every: int = Field(25, ge=1, description="steps between val evaluations (each one can stop the run early)")
    eval_batches: int = Field(8, ge=1, description="val batches per rank per evaluation")
    checkpoint_every: int = Field(
        25, ge=1, description="steps between checkpoints, a multiple of eval_every (default: eval_every)"
    )

    @model_validator(mode="before")
    @classmethod
    def _checkpoint_at_evals(cls, raw: Any) -> Any:
        """Unless set, checkpoint_every follows eval_every: every evaluation saves a checkpoint."""
        if isinstance(raw, dict) and "eval_every" in raw and "checkpoint_every" not in raw:
            raw = {**raw, "checkpoint_every": raw["eval_every"]}
        return raw

    @model_validator(mode="after")
    def _check_cadence(self) -> FinetuneTrain:
        if self.checkpoint_every % self.eval_every:
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every} must be a multiple of eval_every={self.eval_every}: "
                "the best checkpoint is chosen by val loss"
            )
        return self


class FinetuneOptim(OptimConfig):
    """`finetune.optim`: a lower peak and a short warmup, for weights that are trained already."""

    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps")


class FinetuneConfig(Section):
    """Supervised fine-tuning on a downstream task, with parts of the model held fixed."""

    train: FinetuneTrain = Field(
        default_factory=FinetuneTrain,
        description="steps at most (early stopping may end sooner), examples per rank, cadence",
    )
    optim: FinetuneOptim = Field(default_factory=FinetuneOptim, description="AdamW, warmup + cosine")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of examples held out (by hash) for val")
    patience: int = Field(4, ge=0, description="evaluations without improvement before stopping (0 = never)")
    prompt_field: str = Field("prompt", description="JSONL field of the prompt")
    completion_field: str = Field("completion", description="JSONL field of the completion (the loss is on it)")
    text_field: str = Field("text", description="JSONL field of plain text examples (loss everywhere)")
    too_long: Literal["truncate", "refuse"] = Field("truncate", description="examples longer than the context")
    freeze_embeddings: bool = Field(False, description="hold token/position embeddings (and the tied head) fixed")
    freeze_first_blocks: int = Field(0, ge=0, description="hold the first N transformer blocks fixed")
    train_last_blocks: int | None = Field(None, ge=0, description="train only the last N blocks and ln_f")
