"""lm-evaluation-harness on a model held in memory (the library part of `--tasks`)."""

from __future__ import annotations

from torch import nn


def lm_eval_task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's TaskManager, after checking that lm-eval is installed and knows every task."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise RuntimeError("lm-eval is not installed: pip install 'lm_eval[hf]'") from None
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; see `lm_eval ls tasks`, "
                         "or point include_path= at a folder of task YAML files")
    return manager


def lm_eval_tasks(model: nn.Module, tokenizer, tasks: list[str], *, batch_size: int = 1,
                  limit: int | float | None = None, num_fewshot: int | None = None,
                  include_path: str | None = None, device: str = "cpu",
                  task_manager=None) -> dict:
    """lm-evaluation-harness tasks on an in-memory model, binarized or not.

    Needs `pip install 'lm_eval[hf]'`. `include_path` is a folder of task YAML files (local
    datasets, e.g. `dataset_path: json`); `task_manager` one `lm_eval_task_manager` already
    built for these tasks (indexing every task takes seconds); returns lm-eval's per-task
    results.
    """
    manager = task_manager or lm_eval_task_manager(tasks, include_path)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    out = simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                          task_manager=manager, log_samples=False)
    return out["results"]
