"""`generate`: sample continuations of prompts from a checkpoint (any ZeRO stage) or an export.

Prompts come from `--prompt TEXT` (repeatable; `-` reads stdin, one prompt a line) and
`--prompt-file F` (a local file or URL, one prompt a line; blank lines skipped). Each prompt is
encoded as `<bos>` + its tokens, which is how every training document starts. Every prompt is
sampled `num_samples` times; the rows (prompt-major) go through `model.sampling.sample` in batches
of `batch_size`, left-padded, with one torch generator seeded from `seed` for the whole run, so the
same seed, model weights, prompts and batch size give the same tokens (checkpoint or export alike).
With no seed one is drawn and reported, so any run can be repeated.

Sampling settings default to the `sampling` section of the run's config in the checkpoint's meta.json
(`top_k 0` and `top_p 1` switch those filters off). A prompt that leaves no room in the model's
context is an error; when prompt + max_new_tokens exceeds the context, max_new_tokens is cut to fit
the longest prompt and a warning says so (the summary carries the value used).

Output: `text` prints each sample (prompt + completion) under a header line to stdout; `jsonl` prints
one JSON object per sample (prompt, text, tokens, logprobs, finished). Either way the last line is the
JSON summary.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
from typing import IO, Any

import torch
from pydantic import ValidationError

from genpt_dist import storage
from genpt_dist.checkpoint import load_model
from genpt_dist.config import SamplingConfig
from genpt_dist.device import pick_device
from genpt_dist.errors import UserError
from genpt_dist.model.sampling import sample

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def read_prompts(prompts: list[str] | None, prompt_file: str | None, stdin: IO[str] | None = None) -> list[str]:
    """`--prompt` values (`-` = one prompt per stdin line) then the lines of `--prompt-file`."""
    out: list[str] = []
    for p in prompts or []:
        if p == "-":
            out.extend(line for line in (stdin or sys.stdin).read().splitlines() if line.strip())
        else:
            out.append(p)
    if prompt_file:
        url = prompt_file if storage.is_s3(prompt_file) else storage.normalize(prompt_file)
        if not storage.exists(url):
            raise UserError(f"--prompt-file {prompt_file} does not exist")
        out.extend(line for line in storage.read_text(url).splitlines() if line.strip())
    if not out:
        raise UserError("no prompts: pass --prompt TEXT, --prompt - (stdin) or --prompt-file FILE")
    return out


def sampling_settings(
    run_config: dict[str, Any] | None,
    max_new_tokens: int | None,
    top_k: int | None,
    top_p: float | None,
    temperature: float | None,
) -> SamplingConfig:
    """The checkpoint's sampling defaults (`run_config`: the run's Config dump in its meta.json) with the
    command line's overrides; 0 / 1 switch filters off."""
    base = ((run_config or {}).get("sampling")) or {}
    merged = {k: v for k, v in base.items() if k in SamplingConfig.model_fields}
    for key, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature)):
        if value is not None:
            merged[key] = value
    if top_k is not None:
        merged["top_k"] = top_k or None
    if top_p is not None:
        merged["top_p"] = None if top_p == 1.0 else top_p
    try:
        return SamplingConfig.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserError(f"bad sampling setting {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def generate(
    model: str,
    prompts: list[str],
    *,
    max_new_tokens: int | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    num_samples: int = 1,
    seed: int | None = None,
    fmt: str = "text",
    batch_size: int = 32,
    device: str | None = None,
    dtype: str = "fp32",
    out: IO[str] | None = None,
) -> dict[str, Any]:
    """Run the whole `generate` command: samples to `out` (stdout), returns the JSON summary."""
    out = out or sys.stdout
    if fmt not in ("text", "jsonl"):
        raise UserError(f"unknown --format {fmt!r} (text or jsonl)")
    if num_samples < 1 or batch_size < 1:
        raise UserError("--num-samples and --batch-size must be >= 1")
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r} ({', '.join(DTYPES)})")
    dev = pick_device(device)
    net, tok, ref = load_model(model, device=dev)
    net = net.to(DTYPES[dtype])
    cfg = sampling_settings(ref.meta.config, max_new_tokens, top_k, top_p, temperature)
    block = net.config.block_size

    encoded = [[tok.bos_id, *tok.encode(p)] for p in prompts]
    for i, ids in enumerate(encoded):
        if len(ids) >= block:
            raise UserError(
                f"prompt {i + 1} is {len(ids)} tokens with <bos>; the model's context is {block} "
                f"tokens, so it leaves no room to generate"
            )
    n_new = min(cfg.max_new_tokens, block - max(len(ids) for ids in encoded))
    if n_new < cfg.max_new_tokens:
        log.warning(
            "max_new_tokens cut from %d to %d: the longest prompt (%d tokens) + new tokens must fit the "
            "model's %d-token context",
            cfg.max_new_tokens,
            n_new,
            max(map(len, encoded)),
            block,
        )
    if seed is None:
        seed = secrets.randbits(31)
    generator = torch.Generator(device=dev).manual_seed(seed)

    rows = [(i, j) for i in range(len(prompts)) for j in range(num_samples)]
    completions: list[str] = []
    new_tokens, t0 = 0, time.time()
    for lo in range(0, len(rows), batch_size):
        batch = rows[lo : lo + batch_size]
        res = sample(
            net,
            [encoded[i] for i, _ in batch],
            max_new_tokens=n_new,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            temperature=cfg.temperature,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            generator=generator,
        )
        P = res.prompt_width
        for r, (i, j) in enumerate(batch):
            n = int(res.new_lengths[r])
            ids = res.tokens[r, P : P + n].tolist()
            finished = bool(ids) and ids[-1] == tok.eos_id
            text = tok.decode(ids[:-1] if finished else ids)
            completions.append(text)
            new_tokens += n
            if fmt == "jsonl":
                record = {
                    "prompt": prompts[i],
                    "prompt_index": i,
                    "sample_index": j,
                    "text": text,
                    "tokens": ids,
                    "logprobs": [round(x, 6) for x in res.logprobs[r, :n].tolist()],
                    "finished": finished,
                    "prompt_tokens": len(encoded[i]),
                }
                print(json.dumps(record, ensure_ascii=False), file=out)
            else:
                print(
                    f"===== prompt {i + 1}/{len(prompts)}, sample {j + 1}/{num_samples} "
                    f"({n} tokens{', <eos>' if finished else ''}) =====",
                    file=out,
                )
                print(prompts[i] + text, file=out)
        out.flush()
    seconds = time.time() - t0
    if fmt == "text":
        print("=====", file=out)
    summary: dict[str, Any] = {
        "command": "generate",
        "model": ref.url,
        "step": ref.step,
        "prompts": len(prompts),
        "samples": len(rows),
        "new_tokens": new_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1),
        "seed": seed,
        "max_new_tokens": n_new,
        "top_k": cfg.top_k,
        "top_p": cfg.top_p,
        "temperature": cfg.temperature,
        "format": fmt,
        "device": str(dev),
        "dtype": dtype,
    }
    if fmt == "text":
        summary["completions"] = completions
    return summary
