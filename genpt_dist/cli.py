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
from typing import Any, Callable

from genpt_dist.errors import UserError

log = logging.getLogger("genpt_dist")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other bad input
        raise UserError(f"{self.prog}: {message}")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe (configs/*.yaml); defaults if omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted path, e.g. train.steps=100 (repeatable)")


def _cmd_prepare(args: argparse.Namespace) -> dict[str, Any]:
    from genpt_dist.config import load_config
    from genpt_dist.data.prepare import prepare

    cfg = load_config(args.config, args.overrides)
    return prepare(args.input, args.output, cfg.data, overwrite=args.overwrite)


def _cmd_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    from genpt_dist.config import load_config
    from genpt_dist.train.pretrain import pretrain

    cfg = load_config(args.config, args.overrides)
    return pretrain(args.data, args.run, cfg, init=args.init, address=args.address)


def _cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from genpt_dist.demo import run_demo

    return run_demo(args.run, config=args.config, overrides=args.overrides)


def _cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    from genpt_dist.bench import run_bench

    return run_bench(args.name, args.output, quick=args.quick)


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="join an existing Ray cluster: auto or ray://host:10001 (default: local Ray)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="genpt-dist", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prepare", help="raw text -> tokenizer + WebDataset shards + manifest")
    p.add_argument("--input", nargs="+", required=True, metavar="SRC", help="files, folders, globs or s3:// prefixes")
    p.add_argument("--output", required=True, metavar="URL", help="dataset folder or s3://bucket/prefix")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset already at --output")
    _config_args(p)
    p.set_defaults(fn=_cmd_prepare)

    p = sub.add_parser("pretrain", help="maximum likelihood on prepared shards (Ray Train x DeepSpeed ZeRO)")
    p.add_argument("--data", required=True, metavar="URL", help="a prepared dataset (its manifest.json)")
    p.add_argument("--run", required=True, metavar="URL", help="run folder; the same --run again resumes")
    p.add_argument("--init", metavar="CKPT", help="warm-start weights from a checkpoint, run or export")
    _config_args(p)
    _address_arg(p)
    p.set_defaults(fn=_cmd_pretrain)

    p = sub.add_parser("demo", help="the pipeline on the embedded corpus, local Ray, under ./runs/demo")
    p.add_argument("--run", default="runs/demo", metavar="URL", help="where the demo writes (default runs/demo)")
    p.add_argument("--config", default=None, help="recipe (default configs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("bench", help="benchmarks: ours vs the peer, same run")
    p.add_argument("name", help="loader | prepare")
    p.add_argument("--output", default="bench-results", help="folder for the JSON results")
    p.add_argument("--quick", action="store_true", help="smaller sizes (for smoke tests)")
    p.set_defaults(fn=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        args = build_parser().parse_args(argv)
        if args.verbose:
            logging.getLogger().setLevel(logging.DEBUG)
        fn: Callable[[argparse.Namespace], dict[str, Any]] = args.fn
        result = fn(args)
    except UserError as exc:
        print(f"genpt-dist: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genpt-dist: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result), flush=True)
    return 0
