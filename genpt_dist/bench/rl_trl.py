"""`bench rl`'s peer: TRL's `GRPOTrainer` on our Hugging Face export, in a process of its own.

    python -m genpt_dist.bench.rl_trl --model EXPORT --prompts train.jsonl --reward FILE.py:FUNC --output DIR ...

It runs Dr. GRPO (`loss_type="dr_grpo"`, `scale_rewards="none"`: A = r - group mean, the loss summed and
divided by rows x max_completion_length), strictly on-policy (`num_iterations=1`, one generation per
optimizer step), on the CPU in fp32, with the racer's sampling, optimizer and step size. The reward is
the function of FILE.py imported by path, the same file `reinforce --reward python:FILE.py:FUNC` loads.

Every `--snapshot-every` optimizer steps (and before the first) a callback writes the policy's state
dict (Hugging Face names, `lm_head.weight` left out: it is tied) to `DIR/snapshots/step_NNNNNN.safetensors`
with its wall-clock time (`time.time()`, minus the time every earlier snapshot took: the snapshots
cost TRL nothing on the clock); `DIR/snapshots.json` lists them, `DIR/log_history.json` is the Trainer's
per-step log. The last line of stdout is a JSON summary.

The exported tokenizer puts <bos> first (its post-processor, `Tokenizer.with_bos_post_processor`), so
`tok(prompt)` is `<bos> + ours.encode(prompt)`, the prompt ids of our RL stage; checked before training.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

T_START = time.time()


def _load_reward(spec: str):
    file, _, func = spec.rpartition(":")
    loader_spec = importlib.util.spec_from_file_location("bench_rl_reward", file)
    if loader_spec is None or loader_spec.loader is None:
        raise SystemExit(f"reward file {file!r} cannot be imported")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules["bench_rl_reward"] = module
    loader_spec.loader.exec_module(module)
    return getattr(module, func)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="our Hugging Face export (launch.py export --format hf)")
    p.add_argument("--prompts", required=True, help="JSONL with `prompt` and the reward's columns")
    p.add_argument("--reward", required=True, help="FILE.py:FUNC")
    p.add_argument("--output", required=True)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps (max_steps)")
    p.add_argument("--prompts-per-step", type=int, required=True)
    p.add_argument("--group", type=int, required=True, help="num_generations")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k (TRL's convention)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient")
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--adam-beta2", type=float, default=0.95)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--snapshot-every", type=int, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1337)
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    import datasets  # type: ignore[import-untyped]
    import transformers
    import trl
    from safetensors.torch import save_file

    out = Path(a.output)
    snaps = out / "snapshots"
    snaps.mkdir(parents=True, exist_ok=True)
    tok = transformers.AutoTokenizer.from_pretrained(a.model)
    model = transformers.GPT2LMHeadModel.from_pretrained(a.model, dtype=torch.float32)
    rows = [json.loads(line) for line in Path(a.prompts).read_text().splitlines() if line.strip()]
    first = tok(rows[0]["prompt"]).input_ids
    if first[0] != tok.bos_token_id:
        raise SystemExit(f"the exported tokenizer does not start {rows[0]['prompt']!r} with <bos>: {first}")
    dataset = datasets.Dataset.from_list(rows)
    reward = _load_reward(a.reward)

    config = trl.GRPOConfig(
        output_dir=str(out / "trainer"),
        loss_type="dr_grpo",
        scale_rewards="none",
        num_iterations=1,
        beta=a.beta,
        num_generations=a.group,
        max_completion_length=a.max_new_tokens,
        top_k=a.top_k,
        top_p=1.0,
        temperature=a.temperature,
        learning_rate=a.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=a.warmup_steps,
        adam_beta1=a.adam_beta1,
        adam_beta2=a.adam_beta2,
        weight_decay=a.weight_decay,
        max_grad_norm=a.max_grad_norm,
        max_steps=a.steps,
        per_device_train_batch_size=a.prompts_per_step * a.group,  # rows: prompts x G per optimizer step
        gradient_accumulation_steps=1,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_vllm=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        seed=a.seed,
        dataloader_num_workers=0,
        disable_dropout=True,
    )

    snapshots: list[dict] = []
    snap_s = [0.0]  # total seconds spent writing snapshots so far

    def snapshot(step: int, net) -> None:
        t0 = time.time()
        wall = t0 - snap_s[0]
        state = {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in net.state_dict().items()}
        state.pop("lm_head.weight", None)  # tied to transformer.wte.weight
        path = snaps / f"step_{step:06d}.safetensors"
        save_file(state, str(path))
        snapshots.append({"step": step, "wall": wall, "seconds_since_start": wall - T_START, "file": str(path)})
        snap_s[0] += time.time() - t0

    class Snapshots(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            snapshot(0, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % a.snapshot_every == 0 or state.global_step == a.steps:
                snapshot(state.global_step, model)

    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=config,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[Snapshots()],
    )
    t_train = time.time()
    trainer.train()
    t_end = time.time()
    (out / "snapshots.json").write_text(json.dumps(snapshots, indent=1))
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))
    summary = {
        "command": "bench-rl-trl",
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "process_start": T_START,
        "setup_s": round(t_train - T_START, 2),
        "train_s": round(t_end - t_train, 2),
        "snapshot_s": round(snap_s[0], 2),
        "steps": trainer.state.global_step,
        "snapshots": len(snapshots),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
