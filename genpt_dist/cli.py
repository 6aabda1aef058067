"""The command line: `genpt-dist` and `python launch.py` are the same program.

Every command ends by printing one JSON object on the last line of stdout; logs and progress go to
stderr. Exit codes: 0 done, 2 bad input or configuration (one line naming the problem), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from genpt_dist.errors import UserError

log = logging.getLogger("genpt_dist")


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _disconnect_ray(was_up: bool) -> None:
    """Leave Ray if this command joined it (not one its caller had started: `main` called in-process), so that
    nothing it relays reaches stderr after our last line."""
    if _ray_up() and not was_up:
        sys.modules["ray"].shutdown()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other bad input
        command = self.prog.removeprefix("genpt-dist").strip()
        raise UserError(f"{command}: {message}" if command else message)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="YAML recipe: a file, or a shipped recipe's name (tiny, demo, shakespeare, "
        "seed-300d, oracle); defaults if omitted",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by its dotted path, e.g. train.steps=100 (repeatable)",
    )


def _cmd_prepare(args: argparse.Namespace) -> dict[str, Any]:
    from genpt_dist.config import load_config
    from genpt_dist.data.prepare import prepare

    cfg = load_config(args.config, args.overrides)
    return prepare(
        args.input, args.output, cfg.data, overwrite=args.overwrite, address=args.address, tokenizer=args.tokenizer
    )


def _cmd_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    from genpt_dist.config import load_config
    from genpt_dist.train.pretrain import pretrain

    cfg = load_config(args.config, args.overrides)
    return pretrain(args.data, args.run, cfg, init=args.init, address=args.address)


def _cmd_adversarial(args: argparse.Namespace) -> dict[str, Any]:
    from genpt_dist.config import load_config
    from genpt_dist.rl.driver import adversarial

    cfg = load_config(args.config, args.overrides)
    return adversarial(args.data, args.init, args.run, cfg, address=args.address)


def _cmd_reinforce(args: argparse.Namespace) -> dict[str, Any]:
    from genpt_dist.config import load_config
    from genpt_dist.rl.driver import reinforce

    cfg = load_config(args.config, args.overrides)
    return reinforce(
        args.init, args.run, cfg, prompts=args.prompts, data=args.data, rewards=args.rewards, address=args.address
    )


def _cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from genpt_dist.config import load_config
    from genpt_dist.train.finetune import finetune

    cfg = load_config(args.config, args.overrides)
    return finetune(args.task, args.init, args.run, cfg, address=args.address)


def _cmd_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    from genpt_dist.config import load_config
    from genpt_dist.pipeline import pipeline

    cfg = load_config(args.config, args.overrides)
    return pipeline(args.input, args.run, cfg, task=args.task, address=args.address)


def _cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from genpt_dist.report import write_report

    return {"command": "report", **write_report(args.run)}


def _cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from genpt_dist.demo import run_demo

    return run_demo(args.run, config=args.config, overrides=args.overrides)


def _cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    from genpt_dist.bench import run_bench
    from genpt_dist.bench.rl_stats import parse_seeds

    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    return run_bench(
        args.name, args.output, quick=args.quick, only=only, device=args.device, overrides=args.overrides, seeds=seeds
    )


def _cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from genpt_dist.generate import generate, read_prompts

    prompts = read_prompts(args.prompt, args.prompt_file)
    return generate(
        args.model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        num_samples=args.num_samples,
        seed=args.seed,
        fmt=args.format,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
    )


def _cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from genpt_dist.evaluate import evaluate

    return evaluate(args.model, args.data, split=args.split, batch_size=args.batch_size, device=args.device)


def _cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from genpt_dist.export import export

    return export(args.model, args.output, fmt=args.format, overwrite=args.overwrite)


def _cmd_submit(args: argparse.Namespace) -> dict[str, Any]:
    from genpt_dist.submit import run_cli

    return run_cli(args, build_parser().parse_args)  # the job's command line is checked as the job will read it


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="join an existing Ray cluster: auto or ray://host:10001 (default: local Ray)")


def _stage_args(p: argparse.ArgumentParser) -> None:
    """What every stage that runs on Ray takes: --config/--set and --address."""
    _config_args(p)
    _address_arg(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="genpt-dist", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prepare", help="raw text -> tokenizer + WebDataset shards + manifest")
    p.add_argument("--input", nargs="+", required=True, metavar="SRC", help="files, folders, globs or s3:// prefixes")
    p.add_argument("--output", required=True, metavar="URL", help="dataset folder or s3://bucket/prefix")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset already at --output")
    p.add_argument(
        "--tokenizer",
        metavar="SRC",
        help="reuse this tokenizer instead of training one: a tokenizer.json, a Hugging Face folder or a checkpoint",
    )
    _address_arg(p)  # where a corpus above data.parallel_min_bytes is tokenised
    _config_args(p)
    p.set_defaults(fn=_cmd_prepare)

    p = sub.add_parser("pretrain", help="maximum likelihood on prepared shards (Ray Train x DeepSpeed ZeRO)")
    p.add_argument("--data", required=True, metavar="URL", help="a prepared dataset (its manifest.json)")
    p.add_argument("--run", required=True, metavar="URL", help="run folder; the same --run again resumes")
    p.add_argument("--init", metavar="CKPT", help="warm-start weights from a checkpoint, run or export")
    _stage_args(p)
    p.set_defaults(fn=_cmd_pretrain)

    p = sub.add_parser("adversarial", help="SeqGAN-style REINFORCE against an online discriminator")
    p.add_argument("--data", required=True, metavar="URL", help="the prepared dataset (real text for D and prompts)")
    p.add_argument("--init", required=True, metavar="CKPT", help="the pretrained generator (also the KL reference)")
    p.add_argument("--run", required=True, metavar="URL", help="run folder; the same --run again resumes")
    _stage_args(p)
    p.set_defaults(fn=_cmd_adversarial)

    p = sub.add_parser("reinforce", help="REINFORCE toward the rewards you name (Python functions, discriminator)")
    p.add_argument("--init", required=True, metavar="CKPT", help="the model to improve (also the KL reference)")
    p.add_argument("--run", required=True, metavar="URL", help="run folder; the same --run again resumes")
    p.add_argument("--prompts", metavar="SRC", help="JSONL or parquet prompts; their other fields reach the rewards")
    p.add_argument("--data", metavar="URL", help="a prepared dataset: real-text prompts, and the discriminator's text")
    p.add_argument(
        "--reward",
        dest="rewards",
        action="append",
        metavar="SPEC",
        help="python:FILE.py:FUNC, python:package.module:FUNC, model:FOLDER or discriminator, with an optional @WEIGHT "
        "(repeatable; the weighted sum is the reward; default: the recipe's reinforce.rewards)",
    )
    _stage_args(p)
    p.set_defaults(fn=_cmd_reinforce)

    p = sub.add_parser("finetune", help="supervised fine-tuning of a checkpoint on a downstream task")
    p.add_argument(
        "--task",
        required=True,
        metavar="SRC",
        help="prompt/completion JSONL, text/JSONL 'text', or a prepared dataset folder",
    )
    p.add_argument("--init", required=True, metavar="CKPT", help="checkpoint, run or export to start from")
    p.add_argument("--run", required=True, metavar="URL", help="run folder; the same --run again resumes")
    _stage_args(p)
    p.set_defaults(fn=_cmd_finetune)

    p = sub.add_parser("pipeline", help="prepare -> pretrain -> adversarial -> finetune -> export, one run URL")
    p.add_argument("--input", nargs="+", required=True, metavar="SRC", help="files, folders, globs or s3:// prefixes")
    p.add_argument("--run", required=True, metavar="URL", help="run folder; again = skip finished, resume unfinished")
    p.add_argument("--task", metavar="SRC", help="fine-tuning task (prompt/completion JSONL or text)")
    _stage_args(p)
    p.set_defaults(fn=_cmd_pipeline)

    p = sub.add_parser("report", help="plots and report.md of a run")
    p.add_argument("run", metavar="RUN", help="a pipeline run or a stage's run folder")
    p.set_defaults(fn=_cmd_report)

    p = sub.add_parser("demo", help="the pipeline on the embedded corpus, local Ray, under ./runs/demo")
    p.add_argument("--run", default="runs/demo", metavar="URL", help="where the demo writes (default runs/demo)")
    p.add_argument("--config", default=None, help="recipe (default configs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("generate", help="sample continuations of prompts from a checkpoint or export")
    p.add_argument("--model", required=True, metavar="CKPT", help="a run (its latest checkpoint), checkpoint or export")
    p.add_argument(
        "--prompt", action="append", metavar="TEXT", help="a prompt (repeatable); - reads one per stdin line"
    )
    p.add_argument("--prompt-file", metavar="FILE", help="prompts, one per line")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="default: the checkpoint's sampling config")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely (0 = off)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus mass (1 = off)")
    p.add_argument("--temperature", type=float, metavar="T")
    p.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples per prompt")
    p.add_argument("--seed", type=int, metavar="S", help="same seed, same tokens (default: drawn and reported)")
    p.add_argument(
        "--format", choices=["text", "jsonl"], default="text", help="stdout: text blocks or one JSON per sample"
    )
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="rows sampled together")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights' dtype while sampling")
    p.set_defaults(fn=_cmd_generate)

    p = sub.add_parser("evaluate", help="loss, perplexity and bits-per-byte on a dataset's split or a text file")
    p.add_argument("--model", required=True, metavar="CKPT", help="a run (its latest checkpoint), checkpoint or export")
    p.add_argument("--data", required=True, metavar="URL|FILE", help="a prepared dataset or a raw text file")
    p.add_argument("--split", default="val", choices=["val", "train"], help="dataset split (default val)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(fn=_cmd_evaluate)

    p = sub.add_parser("export", help="consolidate a checkpoint into safetensors or a Hugging Face GPT-2 folder")
    p.add_argument("--model", required=True, metavar="CKPT", help="a run (its latest checkpoint), checkpoint or export")
    p.add_argument("--output", required=True, metavar="URL", help="export folder or s3://bucket/prefix")
    p.add_argument("--format", choices=["safetensors", "hf"], default="safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace what is at --output")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("bench", help="benchmarks: ours vs the peer, same run")
    p.add_argument(
        "name",
        help="all | train | scaling | generate | sync | checkpoint | loader | prepare | oracle "
        "(all = every one but oracle, which measures learning)",
    )
    p.add_argument("--output", default="bench-results", help="folder for the JSON results")
    p.add_argument("--quick", action="store_true", help="smaller sizes (for smoke tests)")
    p.add_argument("--only", default=None, metavar="A,B", help="with all: run only these benches")
    p.add_argument(
        "--seeds",
        default=None,
        metavar="0,1,2",
        help="with rl: the seeds to race over (default: RLSpec.seeds, one with --quick)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="where train and generate measure: cpu, cuda, cuda:N or auto (the GPU when one is visible)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="with oracle: override a value of its recipe (configs/oracle.yaml), e.g. adversarial.train.steps=300",
    )
    p.set_defaults(fn=_cmd_bench)

    p = sub.add_parser(
        "submit",
        help="run a command as a Ray job on a cluster, through its dashboard: submit --address URL -- pretrain ...",
    )
    p.add_argument(
        "--address",
        metavar="URL",
        help="the head's dashboard, http://HOST:8265 (default: RAY_ADDRESS, else http://127.0.0.1:8265)",
    )
    p.add_argument(
        "--working-dir",
        metavar="DIR",
        help="the folder that travels with the job (default: this checkout, without .venv, runs/ and .git)",
    )
    p.add_argument("--runtime-env", metavar="FILE", help="more of the job's runtime env, e.g. cluster/runtime_env.yaml")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return; do not follow the job")
    p.add_argument("job", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="the genpt-dist command to run")
    p.set_defaults(fn=_cmd_submit)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    ray_was_up = _ray_up()
    try:
        args = build_parser().parse_args(argv)
        if args.verbose:
            logging.getLogger().setLevel(logging.DEBUG)
        fn: Callable[[argparse.Namespace], dict[str, Any]] = args.fn
        result = fn(args)
    except UserError as exc:
        _disconnect_ray(ray_was_up)  # before the line: Ray's log and autoscaler-event threads print to stderr too
        print(f"genpt-dist: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genpt-dist: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result), flush=True)
    return 0
