"""Where the RL stage's prompts come from, and the rollout requests they make.

Prompts come from a prompt file's rows (`RLInputs.prompts`: one global batch of `prompts_per_step`
per step, in a per-epoch shuffle that every rank draws alike, `rl.prompts`; a row's other fields are
its columns), or from real-text windows of the dataset (`RLInputs.real`, `rl.real_text`: <bos> + the
first `prompt_len` tokens of each of this rank's windows, gathered so that rank 0 holds the step's
global batch). Rank 0 turns a step's prompts into its `RolloutRequest`: each prompt
`samples_per_prompt` times, each row seeded by (seed, step, row). Every rank keeps its own real
windows of the step for the discriminator's real side.

The engine's data source is the `PromptSource` (prompt file) or the `ShardSource` of the real text: it
holds the position a checkpoint records and the real text's val batches.
"""

from __future__ import annotations

from typing import Any

import torch

from genpt_dist.config import Config, ReinforceConfig
from genpt_dist.rl.batch import RolloutRequest
from genpt_dist.rl.inputs import RLInputs
from genpt_dist.rl.prompts import Prompt, PromptLoader
from genpt_dist.rl.real_text import RealTextWindows
from genpt_dist.rl.reinforce import rollout_seed
from genpt_dist.rl.state import PromptSource
from genpt_dist.tokenizer import Tokenizer
from genpt_dist.train.collective import all_gather_objects
from genpt_dist.train.sources import DataSource, ShardSource


class StepPrompts:
    """One rank's prompt source: each step's prompts, rank 0's rollout request of them, the real windows."""

    def __init__(self, cfg: Config, section: ReinforceConfig, inputs: RLInputs, *, rank: int, world: int):
        self.section, self.rank, self.world = section, rank, world
        self.prompts_per_rank = section.prompts_per_step // world
        self.texts_needed = inputs.rewards.needs_texts
        real = None
        if inputs.real is not None:
            real = ShardSource(
                inputs.real,
                batch_size=self.prompts_per_rank,
                eval_batches=section.train.eval_batches,
                eval_batch_size=section.train.micro_batch_size,
                loader=cfg.loader,
                rank=rank,
                world=world,
            )
        self.real_source = real
        self.prompt_source: PromptSource | None = None
        self.held_out: list[Prompt] = []
        self.source: DataSource
        if inputs.prompts is not None:
            rows = inputs.prompts
            self.held_out = list(rows.held_out)
            loader = PromptLoader(list(rows.train), batch_size=section.prompts_per_step, seed=section.train.seed)
            tok = real.tokenizer if real is not None else Tokenizer.from_json(inputs.tokenizer_json)
            self.prompt_source = PromptSource(loader, tok, real, rows.sha256, self.prompts_per_rank)
            self.source = self.prompt_source
        else:
            assert real is not None, "RLInputs holds a prompt file or the real text"
            self.source = real
        self.tok: Tokenizer = self.source.tokenizer
        self.real: RealTextWindows | None = None

    def start(self) -> None:
        """Open the real text's window stream; after the engine has restored the source's position."""
        if self.real_source is None:
            return
        r = self.section.rollout
        self.real = RealTextWindows(
            self.real_source.train_batches(),
            bos_id=self.tok.bos_id,
            pad_id=self.tok.pad_id,
            width=r.prompt_len + r.sampling.max_new_tokens,
            samples_per_prompt=r.samples_per_prompt,
        )

    def draw(self, step: int) -> tuple[RolloutRequest | None, torch.Tensor | None]:
        """Rank 0's rollout request for step `step` (None elsewhere) and this rank's real windows (for D);
        every rank calls it (a collective for real-text prompts). The step's prompts stay in flight until
        `consumed`."""
        windows = self.real.next() if self.real is not None else None
        if self.prompt_source is not None:
            batch = self.prompt_source.draw()  # the same global batch on every rank
            if self.rank != 0:
                return None, windows
            prompts = [[self.tok.bos_id, *self.tok.encode(p.text)] for p in batch]
            return self.request(step, prompts, [p.text for p in batch], [p.columns for p in batch]), windows
        assert windows is not None
        parts = all_gather_objects(windows.tolist(), self.world)
        if self.rank != 0:
            return None, windows
        plen = 1 + self.section.rollout.prompt_len
        prompts = [w[:plen] for part in parts for w in part]
        texts = [self.tok.decode(p[1:]) for p in prompts] if self.texts_needed else None
        return self.request(step, prompts, texts, None), windows

    def consumed(self) -> None:
        """The oldest step drawn has been trained on: a checkpoint's prompt position moves past it."""
        if self.prompt_source is not None:
            self.prompt_source.consumed()

    def request(
        self, step: int, prompts: list[list[int]], texts: list[str] | None, columns: list[dict[str, Any]] | None
    ) -> RolloutRequest:
        """Each prompt `samples_per_prompt` times, with its text and columns for the reward functions."""
        sec = self.section
        r, s, g = sec.rollout, sec.rollout.sampling, sec.rollout.samples_per_prompt
        rows = [p for p in prompts for _ in range(g)]
        seeds = [rollout_seed(sec.train.seed, step, i) for i in range(len(rows))]
        # Rows are sampled in batched calls of whole prompt groups, one per actor where possible; tokens
        # depend on this grouping (fixed by the config), never on which actor serves a call.
        per_actor = max(1, sec.prompts_per_step // r.num_actors) * g
        return RolloutRequest(
            prompts=rows,
            seeds=seeds,
            max_new_tokens=s.max_new_tokens,
            top_k=s.top_k,
            top_p=s.top_p,
            temperature=s.temperature,
            mc_rollouts=sec.mc_rollouts,
            mc_stride=sec.mc_stride,
            reward_kind=sec.reward,
            rows_per_call=per_actor,
            texts=[t for t in texts for _ in range(g)] if texts is not None else None,
            columns=[c for c in columns for _ in range(g)] if columns is not None else None,
            with_behaviour_logprobs=r.max_staleness > 0,
            with_previous_logprobs=sec.clips_against_previous,
        )

    def held_out_request(self) -> RolloutRequest | None:
        """Rank 0's request for greedy completions of the held-out prompts, one each (None elsewhere)."""
        sec, ps = self.section, self.held_out
        if self.rank != 0:
            return None
        return RolloutRequest(
            prompts=[[self.tok.bos_id, *self.tok.encode(p.text)] for p in ps],
            seeds=[0] * len(ps),
            max_new_tokens=sec.rollout.sampling.max_new_tokens,
            top_k=1,
            reward_kind=sec.reward,
            rows_per_call=max(1, -(-len(ps) // sec.rollout.num_actors)),
            texts=[p.text for p in ps],
            columns=[p.columns for p in ps],
        )
