"""`--tasks`: lm-evaluation-harness on the model `binllm quantize` or `binllm eval` holds."""

from __future__ import annotations

import argparse
from typing import Any

from .common import CLIError


def add_lm_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("lm-eval (needs `pip install 'lm_eval[hf]'`)")
    g.add_argument("--tasks", default="", help="comma-separated lm-eval tasks, e.g. arc_easy,piqa")
    g.add_argument("--tasks-path", default=None, metavar="DIR",
                   help="folder of extra task YAML files (local datasets)")
    g.add_argument("--limit", type=float, default=None,
                   help="documents per task (a fraction if below 1), for quick runs")
    g.add_argument("--num-fewshot", type=int, default=None,
                   help="few-shot examples per task (default: each task's own)")


def _tasks(args) -> list[str]:
    return [t.strip() for t in args.tasks.split(",") if t.strip()]


def check_lm_eval(args):
    """Before any work: lm-eval is installed and knows every task of `--tasks`.

    Returns the task manager for `run_lm_eval` (None without tasks)."""
    from ..evaluation.harness import lm_eval_task_manager

    if not _tasks(args):
        return None
    try:
        return lm_eval_task_manager(_tasks(args), args.tasks_path)
    except (RuntimeError, ValueError) as e:
        raise CLIError(str(e)) from None


def run_lm_eval(model, tokenizer, args, title: str, manager) -> dict[str, Any] | None:
    """lm-eval results of `args.tasks` with `check_lm_eval`'s manager (None: no tasks)."""
    from ..evaluation.harness import lm_eval_tasks

    if manager is None:
        return None
    tasks = _tasks(args)
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        results = lm_eval_tasks(model, tokenizer, tasks, limit=limit, num_fewshot=args.num_fewshot,
                                device=args.device, task_manager=manager)
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
