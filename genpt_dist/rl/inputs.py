"""The RL stage's inputs: what its workers and rollout actors read besides the `Job`, carried as data.

The driver reads every input that lives on a filesystem of its own and ships the contents: the prompt
file's rows (already split into train and held-out prompts), the source of each Python reward file,
and the policy's tokenizer. Nodes of a cluster share no disk, so a worker or actor never opens a path
the driver was given. URLs stay URLs: the real text (`--data`) and `model:` rewards name a dataset and
checkpoints that every node reaches, as it reaches the run's own URL. A reward given as
`python:package.module:FUNC` is imported by name on each actor: the package must be installed on
every node.

A Python reward file is imported on an actor from the driver's bytes (nothing is written there); its
`__file__`, tracebacks and messages name the file as the user gave it. A reward file that reads files
beside it by `__file__` therefore finds none on a node that lacks them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from genpt_dist import storage
from genpt_dist.config import ReinforceConfig
from genpt_dist.rl.prompts import (
    Prompt,
    PromptLoader,
    check_prompt_lengths,
    parse_prompts,
    read_prompt_file,
    split_held_out,
)
from genpt_dist.rl.rewards.specs import PythonRewards, RewardSpec, load_reward_function, read_reward_file, reward_file


@dataclass(frozen=True)
class PromptRows:
    """A prompt file, read and split on the driver."""

    url: str  # the file as given: the checkpoint's data URL and the name in messages (no worker opens it)
    sha256: str  # of the file's bytes: the run's data fingerprint, recorded in every checkpoint
    train: tuple[Prompt, ...]  # the rows the policy is trained on, in file order
    held_out: tuple[Prompt, ...]  # the held-out rows evaluated greedily (at most `prompts.eval_prompts`)

    @classmethod
    def read(cls, url: str, section: ReinforceConfig, encode: Callable[[str], list[int]], context: int) -> PromptRows:
        """Read and check the file (field, lengths against the model's context, enough prompts for a step);
        a one-line UserError naming it otherwise."""
        url = storage.normalize(url)
        data = read_prompt_file(url)
        rows = parse_prompts(url, data, section.prompts.prompt_field)
        check_prompt_lengths(rows, encode, section.rollout.sampling.max_new_tokens, context, url)
        train, held_out = split_held_out(rows, section.prompts.held_out_fraction)
        PromptLoader(train, batch_size=section.prompts_per_step, seed=section.train.seed)  # refuses too few prompts
        return cls(
            url=url,
            sha256=hashlib.sha256(data).hexdigest(),
            train=tuple(train),
            held_out=tuple(held_out[: section.prompts.eval_prompts]),
        )


@dataclass(frozen=True)
class RewardInputs:
    """The reward components and the source of every Python reward file they name."""

    specs: tuple[RewardSpec, ...]  # the parsed `--reward` specs, in order (names unique)
    files: Mapping[str, bytes] = field(default_factory=dict)  # FILE.py as a spec gives it -> its bytes

    @classmethod
    def read(cls, specs: list[RewardSpec]) -> RewardInputs:
        """Load every Python function once here (a missing file, module or function fails on the driver,
        named) and keep each file's bytes for the actors."""
        files: dict[str, bytes] = {}
        for spec in specs:
            where = reward_file(spec)
            if where is not None:
                files[where] = read_reward_file(where)  # relative to the current folder
            if spec.kind == "python":
                load_reward_function(spec, files.get(where or ""))  # the bytes the actors will import
        return cls(specs=tuple(specs), files=files)

    @property
    def kinds(self) -> set[str]:
        return {s.kind for s in self.specs}

    @property
    def needs_texts(self) -> bool:
        """Whether a component scores decoded text (a Python function or a `model:` reward)."""
        return bool(self.kinds & {"python", "model"})

    def python_rewards(self) -> PythonRewards | None:
        """The Python components, loaded here (in a rollout actor) from the driver's bytes of each file.
        None when there are none."""
        python = [s for s in self.specs if s.kind == "python"]
        return PythonRewards(python, self.files) if python else None


@dataclass(frozen=True)
class RLInputs:
    """Everything an RL stage's workers and actors read besides the `Job`, built on the driver."""

    rewards: RewardInputs  # the reward components, Python reward files included
    tokenizer_json: str  # the `--init` model's tokenizer (the policy's vocabulary)
    prompts: PromptRows | None = None  # the prompt file's rows; None: prompts are real-text windows
    real: str | None = None  # the real text's dataset URL (`--data`): real-text prompts and D's real side

    def __post_init__(self) -> None:
        if self.prompts is None and self.real is None:
            raise ValueError("an RL stage takes its prompts from a prompt file or from the real text")
