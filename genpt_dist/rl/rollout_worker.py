"""The rollout worker of the RL stage, free of Ray: sample from the policy, score with the reference
and the configured rewards.

``RolloutWorker`` holds the current policy, the frozen reference and the discriminator.
``generate(RolloutRequest) -> RolloutBatch`` samples with ``model.sampling.sample`` (KV cache), then
computes reference log-probs and discriminator logits on the result and, when asked, the sampling
policy's own log-probs at temperature 1 (the denominator of a stale update's importance ratio), the
previous policy version's (an on-policy update's trust region, ``reinforce.clip_against_previous``: the
worker made with ``keep_previous`` keeps the weights it replaces; where those are not the version just
before, as after a restart or a resumed run's first load, the current policy's, which leaves that
update without a trust region) and SeqGAN Monte Carlo token rewards
(``rl.rewards.discriminator``). ``load`` takes new weights (plain or packed state dicts) with their
versions. The Ray actor around it and the pool of actors are in
``rl.rollout``.

Rewards (``rl.rewards.specs``; the specs and Python reward files as the driver read them, ``rl.inputs``):
with no reward specs the reward is D's sequence reward. Otherwise each component is scored:
``discriminator`` by D, a Python function on the decoded prompt texts and completions (completion =
the generated tokens before <eos>) with the request's columns, ``model:`` by a frozen sequence
classifier or one of our trained discriminators (``rl.rewards.reward_model``); the row's reward is the
weighted sum of the components that scored it (NaN if none did).

Reproducibility: rows are sampled in *calls* of ``rows_per_call`` consecutive rows (1 by default),
one batched ``sample`` call each, with a generator seeded from the rows' seeds only (the row's own
seed when a call holds one row; ``derive_seed`` of all of them otherwise). The group splits a
request only at call boundaries, so a row's tokens do not depend on how the rows were split across
actors or on re-issues. Monte Carlo completions of a call's rows are sampled in further batched
calls seeded by ``derive_seed(*seeds, MC, i)``. Reference log-probs and discriminator logits are
deterministic functions of the tokens, batched over the whole request (equal up to float rounding
under a different split).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from genpt_dist.model.discriminator import Discriminator, DiscriminatorConfig
from genpt_dist.model.gpt import GPT, GPTConfig
from genpt_dist.model.sampling import sample
from genpt_dist.rl.batch import RolloutBatch, RolloutRequest
from genpt_dist.rl.inputs import RewardInputs
from genpt_dist.rl.reinforce import derive_seed
from genpt_dist.rl.rewards.discriminator import mc_token_rewards, sequence_reward
from genpt_dist.rl.rewards.reward_model import load_reward_model
from genpt_dist.rl.rewards.specs import combine
from genpt_dist.rl.weights import PackedState, unpack_state

_MC_STREAM = 1  # tag of the Monte Carlo seed stream in derive_seed


class RolloutWorker:
    """Policy + frozen reference + discriminator; turns requests into rollout batches."""

    def __init__(
        self,
        model_config: dict,
        disc_config: dict,
        reference_state: Mapping[str, Any] | PackedState,
        *,
        pad_id: int,
        eos_id: int,
        threads: int | None = 1,
        device: str = "cpu",
        dtype: str = "float32",
        score_batch_size: int = 32,
        rewards: RewardInputs | None = None,
        tokenizer_json: str | None = None,
        keep_previous: bool = False,
    ) -> None:
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self.pad_id, self.eos_id = pad_id, eos_id
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.score_batch_size = score_batch_size
        self.reference = GPT(GPTConfig(**model_config))
        self.reference.load_state_dict(unpack_state(reference_state))
        self.reference.to(self.device, self.dtype).eval().requires_grad_(False)
        self.policy = copy.deepcopy(self.reference)  # the starting policy is the pretrained model
        self.previous = copy.deepcopy(self.reference) if keep_previous else None  # the weights load replaced
        self.previous_version = -2  # their version (-2: none yet)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # every actor (and restart) starts from the same untrained D
            self.disc = Discriminator(DiscriminatorConfig(**disc_config))
        self.disc.to(self.device, self.dtype).eval().requires_grad_(False)
        self.policy_version = -1
        self.disc_version = -1
        self.specs = list(rewards.specs) if rewards is not None and rewards.specs else None
        kinds = {s.kind for s in self.specs or []}
        self.python = rewards.python_rewards() if rewards is not None else None
        self.models = {s.name: load_reward_model(s.target) for s in self.specs or [] if s.kind == "model"}
        self.tokenizer = None
        if kinds & {"python", "model"}:  # text rewards: completions are decoded
            from genpt_dist.tokenizer import Tokenizer

            if tokenizer_json is None:
                raise ValueError("text rewards need the tokenizer to decode completions")
            self.tokenizer = Tokenizer.from_json(tokenizer_json)

    @property
    def versions(self) -> tuple[int, int]:
        """(policy version, discriminator version); -1 = the initial weights."""
        return self.policy_version, self.disc_version

    def load(
        self,
        policy_version: int | None,
        policy_state: Any | None,
        disc_version: int | None = None,
        disc_state: Any | None = None,
    ) -> None:
        """Load new weights (plain or packed state dicts); a None state leaves that model and its version."""
        if policy_state is not None:
            if self.previous is not None:  # the replaced weights become the previous ones: swap, no copy
                self.previous, self.policy = self.policy, self.previous
                self.previous_version = self.policy_version
            self.policy.load_state_dict(unpack_state(policy_state))
            self.policy_version = int(policy_version if policy_version is not None else self.policy_version + 1)
        if disc_state is not None:
            self.disc.load_state_dict(unpack_state(disc_state))
            self.disc_version = int(disc_version if disc_version is not None else self.disc_version + 1)

    @property
    def _holds_previous(self) -> bool:
        """Whether the kept weights are the version just before the policy's."""
        return self.previous is not None and self.previous_version == self.policy_version - 1

    def lacks_previous(self, version: int) -> bool:
        """Whether this worker keeps previous weights, and `version` is the one before its policy's but not
        the one it holds (it was restarted, or the run resumed, after that version was published)."""
        return self.previous is not None and version == self.policy_version - 1 and not self._holds_previous

    def load_previous(self, version: int, state: Any) -> None:
        """Set the previous policy's weights (plain or packed state dict) and version."""
        assert self.previous is not None, "a worker made without keep_previous keeps no previous weights"
        self.previous.load_state_dict(unpack_state(state))
        self.previous_version = int(version)

    # ----------------------------------------------------------------------------------- sampling

    def _sample(self, prompts: list[list[int]], max_new: int, req: RolloutRequest, seed: int):
        return sample(
            self.policy,
            prompts,
            max_new_tokens=max_new,
            top_k=req.top_k,
            top_p=req.top_p,
            temperature=req.temperature,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            seed=seed,
        )

    @staticmethod
    def _calls(req: RolloutRequest) -> list[range]:
        B, g = len(req), req.rows_per_call
        return [range(s, min(s + g, B)) for s in range(0, B, g)]

    @staticmethod
    def _call_seed(seeds: list[int]) -> int:
        return seeds[0] if len(seeds) == 1 else derive_seed(*seeds)

    def generate(self, req: RolloutRequest) -> RolloutBatch:
        """Sample every row, then score it; see the module docstring."""
        t0 = time.perf_counter()
        gen: list[list[int]] = [[] for _ in range(len(req))]
        lps: list[Tensor] = [torch.empty(0)] * len(req)
        sampled = 0
        for rows in self._calls(req):
            out = self._sample(
                [req.prompts[i] for i in rows], req.max_new_tokens, req, self._call_seed([req.seeds[i] for i in rows])
            )
            sampled += len(rows) * out.logprobs.size(1)
            P_c = out.prompt_width
            for j, i in enumerate(rows):
                n = int(out.new_lengths[j])
                gen[i] = out.tokens[j, P_c : P_c + n].tolist()
                lps[i] = out.logprobs[j, :n].float().cpu()
        tokens, attn, P = self._assemble([p + g for p, g in zip(req.prompts, gen)], [len(p) for p in req.prompts])
        B, N = tokens.size(0), tokens.size(1) - P
        lengths = torch.tensor([len(g) for g in gen], dtype=torch.long)  # (B,)
        gen_mask = attn[:, P:]  # (B, N)
        logprobs = torch.zeros(B, N)  # (B, N)
        for i, lp in enumerate(lps):
            logprobs[i, : lp.numel()] = lp
        ref_logprobs = self._token_logprobs(self.reference, tokens, attn, P)  # (B, N)
        behaviour = previous = None
        if req.with_behaviour_logprobs:  # (B, N) log mu(a_t) for the importance ratio of a stale update
            behaviour = self._token_logprobs(self.policy, tokens, attn, P)
        if req.with_previous_logprobs:  # (B, N) the same under the version before: the update's trust region
            if self.previous is None:
                raise ValueError("previous log-probs need a worker made with keep_previous=True")
            before = self.previous if self._holds_previous else self.policy
            previous = self._token_logprobs(before, tokens, attn, P)
        uses_disc = self.specs is None or any(s.kind == "discriminator" for s in self.specs)
        d_logits = self._disc_logits(tokens, attn) if uses_disc else torch.zeros(len(tokens))  # (B,)
        rewards, components, names = self._rewards(req, gen, sequence_reward(d_logits, req.reward_kind))

        token_rewards, mc_tokens, mc_seconds = None, 0, 0.0
        if req.mc_rollouts > 0:
            t_mc = time.perf_counter()
            token_rewards, mc_tokens = self._mc_rewards(req, gen, rewards, gen_mask)
            mc_seconds = time.perf_counter() - t_mc
        return RolloutBatch(
            tokens=tokens,
            prompt_width=P,
            attention_mask=attn,
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            gen_mask=gen_mask.clone(),
            lengths=lengths,
            d_logits=d_logits,
            rewards=rewards,
            token_rewards=token_rewards,
            policy_version=self.policy_version,
            disc_version=self.disc_version,
            seconds=time.perf_counter() - t0,
            actor="local",
            pad_id=self.pad_id,
            mc_seconds=mc_seconds,
            mc_tokens=mc_tokens,
            sampled_tokens=sampled,
            reward_components=components,
            reward_names=names,
            behaviour_logprobs=behaviour,
            previous_logprobs=previous,
        )

    def _rewards(
        self, req: RolloutRequest, gen: list[list[int]], d_reward: Tensor
    ) -> tuple[Tensor, Tensor, tuple[str, ...]]:
        """(B,) combined rewards, (B, C) components and their names (see the module docstring)."""
        if self.specs is None:
            return d_reward, d_reward[:, None].clone(), ("discriminator",)
        parts: dict[str, Tensor] = {}
        if self.tokenizer is not None:
            assert req.texts is not None, "text rewards need the prompt texts"
            completions = [self.tokenizer.decode([t for t in g if t != self.eos_id]) for g in gen]
            if self.python is not None:
                columns = req.columns if req.columns is not None else [{} for _ in gen]
                scored = self.python.score(req.texts, completions, columns)
                parts.update({name: torch.tensor(values, dtype=torch.float32) for name, values in scored.items()})
            for name, model in self.models.items():
                parts[name] = torch.tensor(model.score(req.texts, completions), dtype=torch.float32)
        for spec in self.specs:
            if spec.kind == "discriminator":
                parts[spec.name] = d_reward.float()
        names = tuple(s.name for s in self.specs)
        return combine(parts, self.specs), torch.stack([parts[n] for n in names], dim=1), names

    def _assemble(self, seqs: list[list[int]], prompt_lens: list[int]) -> tuple[Tensor, Tensor, int]:
        """Rows prompt + generated laid out with the prompts right-aligned at column P.

        Returns tokens (B, P + N), attention mask (B, P + N) and P."""
        P = max(prompt_lens)
        N = max(len(s) - p for s, p in zip(seqs, prompt_lens))
        tokens = torch.full((len(seqs), P + N), self.pad_id, dtype=torch.long)  # (B, P + N)
        attn = torch.zeros((len(seqs), P + N), dtype=torch.long)  # (B, P + N)
        for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
            tokens[i, P - p : P - p + len(s)] = torch.tensor(s, dtype=torch.long)
            attn[i, P - p : P - p + len(s)] = 1
        return tokens, attn, P

    # ------------------------------------------------------------------------------------ scoring

    def _score(self, fn: Any, tokens: Tensor, attn: Tensor) -> Tensor:
        """``fn(idx, mask)`` over micro-batches of ``score_batch_size`` rows; float32 on the CPU."""
        out = []
        with torch.inference_mode():
            for s in range(0, tokens.size(0), self.score_batch_size):
                sl = slice(s, s + self.score_batch_size)
                out.append(fn(tokens[sl].to(self.device), attn[sl].to(self.device)).float().cpu())
        return torch.cat(out)

    def _token_logprobs(self, model: GPT, tokens: Tensor, attn: Tensor, P: int) -> Tensor:
        """(B, N) log-probs of the generated tokens (after the P prompt columns) under `model`, 0 where
        nothing was generated."""
        logprobs = self._score(lambda x, m: model.token_logprobs(x, attention_mask=m), tokens, attn)
        return logprobs[:, P - 1 :].masked_fill(attn[:, P:] == 0, 0.0)

    def _disc_logits(self, tokens: Tensor, attn: Tensor) -> Tensor:
        """(B,) discriminator logits."""
        return self._score(lambda x, m: self.disc(x, attention_mask=m), tokens, attn)

    def _mc_rewards(
        self, req: RolloutRequest, gen: list[list[int]], rewards: Tensor, gen_mask: Tensor
    ) -> tuple[Tensor, int]:
        """SeqGAN token rewards (B, N) and the MC cost in sampled token slots.

        For each row, prefixes ending at generated index t = stride-1, 2*stride-1, ... before its last
        token get ``mc_rollouts`` completions with the remaining budget ``max_new_tokens - t - 1``. A
        call's items are sampled together (prefixes left-padded); completions longer than their
        budget are cut, which gives exactly the budgeted distribution since sampling is autoregressive.
        """
        B, N = gen_mask.shape
        M, stride = req.mc_rollouts, req.mc_stride
        positions = torch.arange(stride - 1, max(N - 1, 0), stride)  # (n_pos,)
        scores = torch.zeros(B, positions.numel())  # (B, n_pos)
        cost = 0
        block = self.policy.config.block_size
        for rows in self._calls(req):
            items = [(i, j, int(t)) for j, t in enumerate(positions) for i in rows if t < len(gen[i]) - 1]
            if not items:
                continue
            # Split so that the longest prefix + the largest budget of a call fit the context.
            slack = block - max(len(req.prompts[i]) for i in rows) - req.max_new_tokens
            groups: list[list[tuple[int, int, int]]] = []
            for item in items:
                if groups and item[2] - groups[-1][0][2] <= slack:
                    groups[-1].append(item)
                else:
                    groups.append([item])
            seeds = [req.seeds[i] for i in rows]
            for k, group in enumerate(groups):
                prefixes = [req.prompts[i] + gen[i][: t + 1] for i, _, t in group for _ in range(M)]
                budgets = torch.tensor([req.max_new_tokens - t - 1 for _, _, t in group for _ in range(M)])
                out = self._sample(prefixes, int(budgets.max()), req, derive_seed(*seeds, _MC_STREAM, k))
                cost += len(prefixes) * out.logprobs.size(1)
                P_c, width = out.prompt_width, out.tokens.size(1)
                keep = torch.minimum(out.new_lengths.cpu(), budgets)  # (R,)
                plen = torch.tensor([len(p) for p in prefixes])  # (R,)
                col = torch.arange(width)[None, :]  # (1, W)
                mask = ((col >= P_c - plen[:, None]) & (col < P_c + keep[:, None])).long()  # (R, W)
                d = self._disc_logits(out.tokens.cpu(), mask)  # (R,)
                mean = sequence_reward(d, req.reward_kind).view(len(group), M).mean(dim=1)  # (items,)
                for (i, j, _), s in zip(group, mean.tolist()):
                    scores[i, j] = s
        return mc_token_rewards(scores, positions, rewards, gen_mask), cost
