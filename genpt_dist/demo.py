"""`demo` (`make demo`): the whole pipeline on the embedded corpus, local single-node Ray.

The corpus is the running interpreter's standard-library source (its top-level `*.py` modules):
present on every machine, no download. The fine-tuning task is made from the same files: a function's
signature is the prompt, the first line of its docstring the completion.
"""

from __future__ import annotations

import ast
import json
import logging
import sysconfig
from pathlib import Path
from typing import Any

from genpt_dist import storage
from genpt_dist.config import load_config
from genpt_dist.recipes import recipe_path
from genpt_dist.report import format_table

log = logging.getLogger(__name__)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def embedded_corpus() -> list[str]:
    """The top-level `*.py` modules of the running interpreter's standard library."""
    return [str(stdlib_dir() / "*.py")]


def docstring_task(limit: int = 2000) -> list[dict[str, str]]:
    """Prompt/completion pairs: `def name(args):` -> the first line of its docstring."""
    pairs = []
    for path in sorted(stdlib_dir().glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                line = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
                if 8 <= len(line) <= 100 and not node.name.startswith("_"):
                    pairs.append({"prompt": f'def {node.name}({ast.unparse(node.args)}):\n    """', "completion": line})
                    if len(pairs) >= limit:
                        return pairs
    return pairs


def run_demo(run: str, config: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    from genpt_dist.pipeline import pipeline

    cfg = load_config(config or recipe_path("demo"), overrides)
    run = storage.normalize(run)
    task_url = storage.join(run, "task.jsonl")
    if not storage.exists(task_url):
        storage.write_text(task_url, "".join(json.dumps(p) + "\n" for p in docstring_task()))
    out = pipeline(embedded_corpus(), run, cfg, task=task_url)
    print("\nSamples from the final model (top-k):")
    for text in out["samples"]:
        print("-" * 60 + "\n" + text.strip()[:600])
    print("\n" + format_table(out["stages"]) + "\n")
    print(f"report: {out['report']}\nmodel:  {out['model']}\n")
    return {**out, "command": "demo"}
