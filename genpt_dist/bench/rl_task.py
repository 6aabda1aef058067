"""The verifiable task of `bench rl`, and its reward file: plain Python, no imports beyond the standard library.

The same file is the reward of both racers: ours gets `--reward python:<this file>:correct`, TRL gets
`reward_funcs=[correct]` imported from this path (`rl_trl.py`). It also generates the task, so the
bench and its test build the prompts from one place.

The task: fixed-width addition of two 2-digit numbers, the sum written with 3 digits:
`"07+45="` -> `"052"`. Every document `a+b=sss` is 9 characters, so with the byte tokenizer a prepared
sample of `seq_len` 11 is exactly `<bos> a+b=sss <eos>` (and the next `<bos>` as the last target), as
the RL prompts `<bos> a+b=` see it: positions in pretraining and in RL agree.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DOC_CHARS = 9  # "aa+bb=sss"
PROMPT_CHARS = 6  # "aa+bb="
ANSWER_CHARS = 3


def problem(a: int, b: int) -> tuple[str, str]:
    """(prompt, answer) of a + b, both zero-padded."""
    return f"{a:02d}+{b:02d}=", f"{a + b:03d}"


def split_problems(seed: int, held_out: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """All 10,000 problems shuffled by `seed`: (train, held-out), the last `held_out` held out."""
    pairs = [problem(a, b) for a in range(100) for b in range(100)]
    random.Random(seed).shuffle(pairs)
    return pairs[:-held_out], pairs[-held_out:]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompt_rows(pairs: list[tuple[str, str]]) -> list[dict]:
    """Prompt-file rows: the prompt and its `answer` column (which reaches the reward by name)."""
    return [{"prompt": p, "answer": a} for p, a in pairs]


def corpus_rows(pairs: list[tuple[str, str]]) -> list[dict]:
    """`prepare` JSONL rows: one solved problem per document."""
    return [{"text": p + a} for p, a in pairs]


def first_line(completion: str) -> str:
    """The completion up to its first newline, stripped (it already ends at <eos>)."""
    return completion.split("\n", 1)[0].strip()


def correct(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL's reward signature: 1.0 where the completion (up to its first newline, stripped) is the answer."""
    return [1.0 if first_line(c) == str(a) else 0.0 for c, a in zip(completions, answer)]
