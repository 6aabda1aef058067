"""Real text for the RL stage: prompt windows and the discriminator's real side, cut from a dataset.

Each training batch of the rank's shard stream (`train.sources.ShardSource`, resumable) gives one
window per row: <bos> + the row's first `prompt_len + max_new_tokens` tokens. A row cut at a
document start already begins with <bos>, so its window is that <bos> + the tokens after it (the
row's targets, pad for -100), never <bos><bos>, which no rollout has. A prompt is a window's first
1 + prompt_len tokens; D's real side of an update is as many distinct windows as there are samples.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from genpt_dist.train.sources import Batch


class RealTextWindows:
    """Windows of real text, `(rows, 1 + width)` each call, from an endless stream of batches."""

    def __init__(self, batches: Iterator[Batch], *, bos_id: int, pad_id: int, width: int, samples_per_prompt: int):
        self.batches, self.bos_id, self.pad_id = batches, bos_id, pad_id
        self.width, self.samples_per_prompt = width, samples_per_prompt

    def next(self) -> torch.Tensor:
        """(B, 1 + width) real windows: <bos> + real tokens, one per row of the next batch."""
        batch = next(self.batches)
        starts = batch.idx[:, :1] == self.bos_id  # (B, 1)
        body = torch.where(starts, batch.targets[:, : self.width].clamp(min=self.pad_id), batch.idx[:, : self.width])
        bos = torch.full((body.shape[0], 1), self.bos_id, dtype=body.dtype)  # (B, 1)
        return torch.cat([bos, body], dim=1)  # (B, 1 + width)

    def for_discriminator(self, prompt_windows: torch.Tensor) -> torch.Tensor:
        """(B * samples_per_prompt, 1 + width): the step's prompt windows and `samples_per_prompt - 1`
        fresh batches (not the prompt windows repeated), so D sees as many distinct real sequences as
        generated ones."""
        extra = [self.next() for _ in range(self.samples_per_prompt - 1)]
        return torch.cat([prompt_windows, *extra])
