"""Batches that cross the rollout boundary: what is asked of the actors, what comes back.

Dataclasses with a shape-and-meaning comment per field, so the stage and the actors agree on every tensor
without reading each other's code."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class RolloutRequest:
    """Rows to sample; a row is one prompt with its own seed (rows of a prompt repeat it)."""

    prompts: list[list[int]]  # B prompts of token ids, each starting with <bos>
    seeds: list[int]  # (B,) one seed per row, e.g. reinforce.rollout_seed(seed, step, row)
    max_new_tokens: int  # most tokens sampled per row, eos included
    top_k: int | None = None  # sample among the k most likely tokens (None = all)
    top_p: float | None = None  # nucleus mass (None = 1)
    temperature: float = 1.0  # softmax temperature of the sampling distribution
    mc_rollouts: int = 0  # SeqGAN completions per measured prefix (0 = sequence reward only)
    mc_stride: int = 8  # a prefix is measured every mc_stride generated tokens
    reward_kind: Literal["prob", "log"] = "prob"  # reward D(x) or log D(x)
    rows_per_call: int = 1  # consecutive rows sampled in one batched call; never split across actors
    texts: list[str] | None = None  # (B,) prompt texts for Python reward functions (None: no text rewards)
    columns: list[dict[str, Any]] | None = None  # (B,) the prompt file's other fields per row, for them
    with_behaviour_logprobs: bool = False  # also return log mu(a_t) at temperature 1 (stale rollouts need it)
    with_previous_logprobs: bool = False  # also return the tokens' log-probs under the previous policy version

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("a rollout request needs at least one row")
        if len(self.seeds) != len(self.prompts):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.seeds)} seeds (one per row)")
        if self.rows_per_call < 1 or self.mc_stride < 1 or self.mc_rollouts < 0:
            raise ValueError("rows_per_call and mc_stride must be >= 1, mc_rollouts >= 0")

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, start: int, stop: int) -> RolloutRequest:
        """The same request for rows [start, stop) only."""
        return replace(
            self,
            prompts=self.prompts[start:stop],
            seeds=self.seeds[start:stop],
            texts=self.texts[start:stop] if self.texts is not None else None,
            columns=self.columns[start:stop] if self.columns is not None else None,
        )


OPTIONAL_PER_TOKEN = ("token_rewards", "behaviour_logprobs", "previous_logprobs")  # (B, N) fields, None unless asked


@dataclass
class RolloutBatch:
    """Sampled rows with everything the policy and discriminator updates need; rows in request order."""

    tokens: Tensor  # (B, P + N) int64: left-padded prompt, generated tokens, pad_id after the stop
    prompt_width: int  # P: generated token n of a row sits in column P + n
    attention_mask: Tensor  # (B, P + N) int64: 1 for real prompt and generated tokens (eos incl.),
    #                         0 for the left pad and after the stop
    logprobs: Tensor  # (B, N) float32: log-prob of each sampled token under the distribution sampled
    #                   from (temperature, top-k, top-p applied); 0 where not generated
    ref_logprobs: Tensor  # (B, N) float32: the same tokens under the frozen reference at temperature 1,
    #                       full vocabulary; 0 where not generated
    gen_mask: Tensor  # (B, N) int64: 1 for generated tokens (eos incl.); = attention_mask[:, P:]
    lengths: Tensor  # (B,) int64: generated tokens per row, eos included
    d_logits: Tensor  # (B,) float32: discriminator logit of prompt + generated tokens (> 0 = "real")
    rewards: Tensor  # (B,) float32: the sequence reward, the weighted sum of the components; NaN = no
    #                  component scored the row (it is left out of the update)
    token_rewards: Tensor | None  # (B, N) float32: SeqGAN MC rewards, 0 where not generated; None without MC
    policy_version: int  # version of the policy that sampled every row (-1: the reference weights)
    disc_version: int  # version of the discriminator that scored them (-1: never loaded)
    seconds: float  # worker seconds spent on the request (summed over actors after concat)
    actor: str  # which actor(s) produced the rows, comma-separated
    pad_id: int = 0  # the pad token in tokens
    sync_seconds: float = 0.0  # part of seconds: fetching and loading published weights
    mc_seconds: float = 0.0  # part of seconds: sampling and scoring Monte Carlo completions
    mc_tokens: int = 0  # MC cost: token slots sampled for completions (rows x steps run)
    sampled_tokens: int = 0  # token slots sampled for the rows themselves (rows x steps run)
    reward_components: Tensor | None = None  # (B, C) float32: each reward component's value, NaN = not scored
    reward_names: tuple[str, ...] = ()  # (C,) the components' names (rl.rewards.specs.RewardSpec.name)
    behaviour_logprobs: Tensor | None = None  # (B, N) float32: the tokens under the sampling policy at
    #                                           temperature 1, full vocabulary (as the update measures
    #                                           pi), 0 where not generated; None unless asked
    previous_logprobs: Tensor | None = None  # (B, N) float32: the same under the policy version before the
    #                                          sampling one (the sampling one's until there is none)

    @property
    def batch_size(self) -> int:
        return self.tokens.size(0)

    @property
    def gen_width(self) -> int:
        """N, the generated width (the longest row)."""
        return self.tokens.size(1) - self.prompt_width

    @property
    def generated(self) -> Tensor:
        """(B, N) the generated tokens."""
        return self.tokens[:, self.prompt_width :]

    @classmethod
    def concat(cls, batches: list[RolloutBatch]) -> RolloutBatch:
        """Rows of all batches in order; the prompt part is left-padded and the generated part
        right-padded to the widest batch. Versions must agree; costs are summed."""
        if not batches:
            raise ValueError("nothing to concatenate")
        if len(batches) == 1:
            return batches[0]
        versions = {(b.policy_version, b.disc_version) for b in batches}
        if len(versions) > 1:
            raise ValueError(f"cannot concatenate rollouts of different (policy, disc) versions {sorted(versions)}")
        for name in OPTIONAL_PER_TOKEN:
            if len({getattr(b, name) is None for b in batches}) > 1:
                raise ValueError(f"cannot concatenate batches with and without {name}")
        P = max(b.prompt_width for b in batches)
        N = max(b.gen_width for b in batches)
        out: dict[str, Any] = {}
        for name in ("tokens", "attention_mask"):  # (B_b, P_b + N_b) -> (B_b, P + N)
            fill = batches[0].pad_id if name == "tokens" else 0
            out[name] = torch.cat(
                [F.pad(getattr(b, name), (P - b.prompt_width, N - b.gen_width), value=fill) for b in batches]
            )
        for name in ("logprobs", "ref_logprobs", "gen_mask", *OPTIONAL_PER_TOKEN):  # (B_b, N)
            if getattr(batches[0], name) is not None:
                out[name] = torch.cat([F.pad(getattr(b, name), (0, N - b.gen_width)) for b in batches])
        for name in ("lengths", "d_logits", "rewards", "reward_components"):  # (B_b,) or (B_b, C)
            if getattr(batches[0], name) is not None:
                out[name] = torch.cat([getattr(b, name) for b in batches])
        for name in ("seconds", "sync_seconds", "mc_seconds", "mc_tokens", "sampled_tokens"):
            out[name] = sum(getattr(b, name) for b in batches)
        return replace(batches[0], prompt_width=P, actor=",".join(b.actor for b in batches), **out)
