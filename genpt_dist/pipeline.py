"""`pipeline`: prepare -> pretrain -> adversarial -> finetune (with a task) -> export -> report.

All stages live under one run URL (`<run>/data`, `<run>/pretrain`, `<run>/adversarial`,
`<run>/finetune`, `<run>/export`), each handed the previous stage's checkpoint. A stage whose
newest checkpoint already reached its step count (or stopped early) is skipped; an unfinished one
resumes, because every stage resumes from its own run folder. `<run>/pipeline.json` records each
stage's output, figures and wall time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from genpt_dist import storage
from genpt_dist.checkpoint import CheckpointRef, latest_checkpoint, read_meta
from genpt_dist.config import Config
from genpt_dist.data.prepare import prepare
from genpt_dist.meta import CheckpointMeta, ExportMeta
from genpt_dist.raycluster import init_ray
from genpt_dist.tracking import check_tracking

log = logging.getLogger(__name__)


def finished(run: str, steps: int) -> CheckpointRef | None:
    """The stage's final checkpoint if it is done (all steps, or stopped early), else None."""
    ref = latest_checkpoint(run)
    if ref is None or not isinstance(ref.meta, CheckpointMeta):
        return None
    stopped = ref.meta.finetune is not None and ref.meta.finetune.stopped
    return ref if ref.step >= steps or stopped else None


def _timed(summary: dict[str, Any], stage: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.time()
    out = fn()
    summary[stage] = {**out, "minutes": round((time.time() - t0) / 60, 2)}
    return out


def pipeline(
    inputs: list[str], run: str, cfg: Config, task: str | None = None, address: str | None = None
) -> dict[str, Any]:
    from genpt_dist.export import export
    from genpt_dist.report import write_report
    from genpt_dist.rl.driver import adversarial
    from genpt_dist.train.finetune import best_checkpoint, finetune
    from genpt_dist.train.pretrain import pretrain

    # A missing MLflow and a cluster that does not answer fail now, not after the data is prepared.
    check_tracking(cfg.tracking)
    init_ray(address)
    run = storage.normalize(run)
    summary_url = storage.join(run, "pipeline.json")
    summary: dict[str, Any] = storage.read_json(summary_url) if storage.exists(summary_url) else {}
    data = storage.join(run, "data")
    _timed(summary, "prepare", lambda: prepare(inputs, data, cfg.data, address=address))
    storage.write_json(summary_url, summary)

    def stage(name: str, steps: int, go: Callable[[], dict[str, Any]], pick=latest_checkpoint) -> str:
        stage_run = storage.join(run, name)
        done = finished(stage_run, steps)
        if done is not None:
            log.info("pipeline: %s is finished (step %d); skipping it", name, done.step)
        else:
            _timed(summary, name, go)
            storage.write_json(summary_url, summary)
        ref = pick(stage_run)
        return ref.url

    current = stage(
        "pretrain", cfg.train.steps, lambda: pretrain(data, storage.join(run, "pretrain"), cfg, address=address)
    )
    if cfg.pipeline.adversarial:
        init = current
        current = stage(
            "adversarial",
            cfg.adversarial.train.steps,
            lambda: adversarial(data, init, storage.join(run, "adversarial"), cfg, address=address),
        )
    generator = current  # the last model trained on the corpus itself
    if task and cfg.pipeline.finetune:
        init = current
        current = stage(
            "finetune",
            cfg.finetune.train.steps,
            lambda: finetune(task, init, storage.join(run, "finetune"), cfg, address=address),
            pick=best_checkpoint,
        )

    export_url = storage.join(run, "export")
    exported = read_meta(export_url)
    if not (isinstance(exported, ExportMeta) and exported.source is not None and exported.source.checkpoint == current):
        _timed(summary, "export", lambda: export(current, export_url, cfg.pipeline.export_format, overwrite=True))
    summary["final_model"] = export_url
    storage.write_json(summary_url, summary)
    n = cfg.pipeline.report_samples
    samples = sample_texts(generator, [""] * n, cfg)
    if task and cfg.pipeline.finetune and n:
        samples += task_completions(export_url, task, n, cfg)
    report = write_report(
        run, samples=samples, extra={k: summary[k].get("minutes") for k in summary if isinstance(summary[k], dict)}
    )
    return {
        "command": "pipeline",
        "run": run,
        "model": export_url,
        "report": report["report"],
        "stages": report["stages"],
        "samples": samples,
    }


def sample_texts(model: str, prompts: list[str], cfg: Config, greedy: bool = False) -> list[str]:
    """Samples with the recipe's sampling settings (greedy: top-1) continuing each prompt after <bos>,
    drawn by `generate` with seed 0, so a report shows the same texts each time."""
    if not prompts:
        return []
    import io

    from genpt_dist.generate import generate

    s = cfg.sampling
    out = generate(
        model,
        prompts,
        max_new_tokens=s.max_new_tokens,
        top_k=1 if greedy else (s.top_k or 0),
        top_p=s.top_p or 1.0,
        temperature=s.temperature,
        seed=0,
        out=io.StringIO(),
    )
    return [prompt + text for prompt, text in zip(prompts, out["completions"])]


def task_completions(model: str, task: str, n: int, cfg: Config) -> list[str]:
    """Greedy completions of the first `n` held-back (val) prompts of a prompt/completion task."""
    from genpt_dist.checkpoint import load_model
    from genpt_dist.data.task import load_task

    _, tok, ref = load_model(model)
    data = load_task(task, tok, cfg.finetune, ref.model_config.block_size)
    if data.kind != "prompt-completion":
        return []
    prompts = [tok.decode(e.tokens[1 : 1 + e.loss_from]) for e in data.val[:n]]
    return sample_texts(model, prompts, cfg, greedy=True)
