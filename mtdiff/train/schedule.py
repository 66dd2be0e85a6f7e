"""The task schedule of a run: the paper's single-task fine-tune inside the budget.

The last ``train.finetune_steps`` of ``train.steps`` train the image (eps) loss alone: the tasks in
``train.finetune_tasks`` stay in the forward process (the condition the sampler gives, e.g. the
label) with loss weight 0, the other tasks leave it. Sampling aggregates what the finished model
was last trained with (:func:`final_tasks`).
"""
from __future__ import annotations

from typing import Optional

from mtdiff.config import TASKS, Params, TasksConfig


def finetune_starts_at(params: Params) -> Optional[int]:
    """The number of steps done when the single-task fine-tune starts (None: no fine-tune)."""
    tc = params.train
    return tc.steps - tc.finetune_steps if tc.finetune_steps else None


def tasks_at(params: Params, steps_done: int) -> TasksConfig:
    """The tasks of the training step after ``steps_done`` steps: ``tasks`` before the fine-tune;
    during it ``train.finetune_tasks`` only, each with loss weight 0 (the image loss alone)."""
    start = finetune_starts_at(params)
    if start is None or steps_done < start:
        return params.tasks
    keep = set(params.train.finetune_tasks)
    return params.tasks.model_copy(update={
        n: getattr(params.tasks, n).model_copy(update={"enabled": n in keep, "weight": 0.0}) for n in TASKS})


def final_tasks(params: Params) -> TasksConfig:
    """The tasks the finished model was last trained with: what sampling aggregates."""
    return tasks_at(params, params.train.steps)
