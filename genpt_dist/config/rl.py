"""The RL stage's sections: `reinforce`, and `adversarial` (the same stage with the discriminator as reward)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from genpt_dist.config.base import Section
from genpt_dist.config.model import SamplingConfig, TransformerShape
from genpt_dist.config.train import OptimConfig, TrainConfig


class RolloutSampling(SamplingConfig):
    """`rollout.sampling`: rollouts are shorter than `generate`'s default."""

    max_new_tokens: int = Field(64, ge=1, description="tokens per rollout")


class RolloutConfig(Section):
    """The pool of Ray rollout actors of the RL stage."""

    num_actors: int = Field(2, ge=1, description="rollout actors (R)")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs Ray reserves per actor")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs Ray reserves per actor")
    threads: int = Field(1, ge=1, description="torch threads per actor")
    max_restarts: int = Field(3, ge=-1, description="restarts of a dead actor (-1 = forever)")
    prompt_len: int = Field(0, ge=0, description="real-text prefix tokens per prompt after <bos> (0 = from <bos>)")
    samples_per_prompt: int = Field(4, ge=1, description="rollouts per prompt (the group of group/RLOO baselines)")
    max_staleness: int = Field(
        0,
        ge=0,
        le=4,
        description="policy updates a rollout may lag: k >= 1 samples the rollouts of steps s+1..s+k while step s "
        "trains (one-step-off at 1) and corrects with the clipped importance ratio; 0 = strictly on-policy",
    )
    sampling: RolloutSampling = Field(default_factory=RolloutSampling, description="how each rollout is sampled")


class DiscriminatorShape(TransformerShape):
    """`discriminator.model`: a small encoder with dropout, its own shape whatever the GPT's defaults are."""

    n_layer: int = Field(2, ge=1, description="transformer blocks")
    n_head: int = Field(4, ge=1, description="attention heads per block")
    d_model: int = Field(128, ge=1, description="embedding width")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on embeddings, attention and MLP")


class DiscriminatorTrainConfig(Section):
    """The Transformer-encoder discriminator (real vs generated) and its training schedule."""

    model: DiscriminatorShape = Field(default_factory=DiscriminatorShape, description="the encoder's shape")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate")
    pretrain_steps: int = Field(20, ge=0, description="D updates on real vs initial-policy samples before RL")
    d_steps: int = Field(1, ge=0, description="D updates per generator update (0 = D fixed after pre-training)")


class PromptsConfig(Section):
    """The prompt file of `reinforce --prompts` (JSONL or parquet; its other fields reach the rewards)."""

    prompt_field: str = Field("prompt", description="field (column) holding the prompt text")
    held_out_fraction: float = Field(
        0.0, ge=0, lt=1, description="share of prompts (by a hash of the text) held out, evaluated every eval_every"
    )
    eval_prompts: int = Field(64, ge=1, description="held-out prompts evaluated (greedy, one completion each)")
    pass_reward: float = Field(
        1.0, description="held-out accuracy: share of greedy completions whose reward reaches this (a checker's 1)"
    )


class ReinforceTrain(TrainConfig):
    """The RL stage's `train`: fewer, larger steps than pretraining's, evaluated and saved more often."""

    steps: int = Field(50, ge=1, description="policy updates")
    micro_batch_size: int = Field(
        16,
        ge=1,
        description="rollout rows per forward/backward of a policy update (a step's rows are accumulated; it must "
        "divide the rows per worker), and the val batch size",
    )
    eval_every: int = Field(25, ge=1, description="steps between val evaluations")
    eval_batches: int = Field(2, ge=1, description="val batches per rank per evaluation")
    checkpoint_every: int = Field(25, ge=1, description="steps between checkpoints (and one at the end)")
    log_every: int = Field(5, ge=1, description="steps between progress lines")


class ReinforceOptim(OptimConfig):
    """The RL stage's `optim`: a small learning rate, constant (no warmup, no decay) unless set."""

    lr: float = Field(2e-5, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="final LR as a fraction of the peak")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")


class ReinforceConfig(Section):
    """REINFORCE from rollout actors' samples, scored by the configured rewards, with a KL guard to the
    `--init` model. `reinforce` is this with the rewards a user names; `adversarial` is `AdversarialConfig`."""

    train: ReinforceTrain = Field(
        default_factory=ReinforceTrain, description="policy updates (steps), rows per forward/backward, cadence"
    )
    optim: ReinforceOptim = Field(
        default_factory=ReinforceOptim, description="the policy's optimizer (constant LR after warmup by default)"
    )
    rewards: list[str] = Field(
        default_factory=list,
        description="reward specs, summed with their weights: python:FILE.py:FUNC, python:package.module:FUNC, "
        "model:FOLDER, discriminator, each with an optional @WEIGHT (--reward replaces them)",
    )
    prompts_per_step: int = Field(8, ge=1, description="prompts per update, over all workers")
    reward: Literal["prob", "log"] = Field(
        "prob", description="the discriminator's reward transform: D(x) (prob) or log D(x) (log)"
    )
    baseline: Literal["ema", "group", "dr_grpo", "grpo", "rloo", "reinforce++", "none"] = Field(
        "rloo", description="advantage estimator (rl/reinforce.py states each)"
    )
    ema_decay: float = Field(0.9, ge=0, lt=1, description="moving-average baseline decay")
    normalize_advantages: bool = Field(True, description="divide advantages by their batch std")
    kl_coef: float = Field(0.05, ge=0, description="weight of KL(policy || pretrained)")
    kl_mode: Literal["reward", "loss"] = Field("loss", description="KL as a per-token reward penalty or a loss term")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus")
    clip_ratio: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="stale rollouts (rollout.max_staleness >= 1): the importance ratio is clipped "
        "to [1 - clip_ratio, 1 + clip_ratio] as PPO clips it",
    )
    clip_against_previous: bool = Field(
        True,
        description="on-policy rollouts (rollout.max_staleness 0): a token gets no gradient where the previous "
        "update already moved its probability past 1 +- clip_ratio in its advantage's direction (a trust region "
        "against the previous policy, whose weights each rollout actor keeps for one more forward per batch; "
        "stale rollouts clip against the policy that sampled them instead)",
    )
    mc_rollouts: int = Field(0, ge=0, description="SeqGAN Monte Carlo completions per prefix (0 = sequence reward)")
    mc_stride: int = Field(8, ge=1, description="token positions between Monte Carlo prefixes")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    discriminator: DiscriminatorTrainConfig = Field(default_factory=DiscriminatorTrainConfig)

    @model_validator(mode="after")
    def _mc_needs_a_baseline_in_reward_units(self) -> ReinforceConfig:
        # A Monte Carlo token reward Q_t takes the row's baseline b = r - A; grpo and reinforce++ divide A by a
        # std, so r - A is no baseline in reward units and Q_t - b would mix scales.
        if self.mc_rollouts > 0 and self.baseline in ("grpo", "reinforce++"):
            raise ValueError(
                f"mc_rollouts needs a baseline in reward units (rloo, dr_grpo, group, ema, none), not {self.baseline}"
            )
        return self

    @property
    def clips_against_previous(self) -> bool:
        """Whether the update clips fresh rows against the previous policy (stale rows clip against theirs)."""
        return self.clip_against_previous and self.rollout.max_staleness == 0


class AdversarialConfig(ReinforceConfig):
    """`adversarial`, the seed's recipe: the RL stage rewarded by the online discriminator, on real-text
    prompts from `--data`."""

    rewards: list[str] = Field(
        default_factory=lambda: ["discriminator"],
        description="reward specs, summed with their weights (default: the online discriminator); the same "
        "kinds as reinforce.rewards",
    )
