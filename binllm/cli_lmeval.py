"""`--tasks`: lm-evaluation-harness on the model `binllm quantize` or `binllm eval` holds."""

from __future__ import annotations

import argparse
from typing import Any


def add_lm_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("lm-eval (needs `pip install 'lm_eval[hf]'`)")
    g.add_argument("--tasks", default="", help="comma-separated lm-eval tasks, e.g. arc_easy,piqa")
    g.add_argument("--tasks-path", default=None, metavar="DIR",
                   help="folder of extra task YAML files (local datasets)")
    g.add_argument("--limit", type=float, default=None,
                   help="documents per task (a fraction if below 1), for quick runs")
    g.add_argument("--num-fewshot", type=int, default=None)


def _tasks(args) -> list[str]:
    return [t.strip() for t in args.tasks.split(",") if t.strip()]


def check_lm_eval(args) -> None:
    """Before any work: lm-eval is installed and knows every task of `--tasks`."""
    from .cli import CLIError
    from .evaluate import lm_eval_task_manager

    if _tasks(args):
        try:
            lm_eval_task_manager(_tasks(args), args.tasks_path)
        except (RuntimeError, ValueError) as e:
            raise CLIError(str(e)) from None


def run_lm_eval(model, tokenizer, args, title: str) -> dict[str, Any] | None:
    """lm-eval results of `args.tasks` (None when no task is asked for); prints a table."""
    from .cli import CLIError
    from .evaluate import lm_eval_tasks

    tasks = _tasks(args)
    if not tasks:
        return None
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        results = lm_eval_tasks(model, tokenizer, tasks, limit=limit, num_fewshot=args.num_fewshot,
                                include_path=args.tasks_path, device=args.device)
    except (RuntimeError, ValueError, OSError) as e:  # OSError: a task's data is not reachable
        raise CLIError(f"lm-eval failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                       ) from None
    print(f"\n{title}: lm-eval" + (f" (limit {args.limit:g})" if args.limit else ""))
    print(f"  {'task':<24} {'metric':<16} {'value':>8}")
    for task, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, float) and "stderr" not in key:
                print(f"  {task:<24} {key:<16} {value:8.4f}")
    return results
