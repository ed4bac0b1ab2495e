"""Bench tasks by name; each fits one model kind (``lm``, ``vit``, ``text-encoder``, ``vlm``)."""

from __future__ import annotations

import difflib

from .base import NotApplicableError, Task, TaskOutput, Treat
from .decode import TASKS as _DECODE
from .lm import TASKS as _LM
from .text import TASKS as _TEXT
from .vision import TASKS as _VISION
from .vqa import TASKS as _VQA

TASKS: dict[str, type[Task]] = {**_LM, **_DECODE, **_VISION, **_TEXT, **_VQA}


def make_task(name: str, limit: int | None = None, seed: int = 0) -> Task:
    """A task instance; an unknown name lists the known ones (and the closest)."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown task {name!r}{hint}; known: {sorted(TASKS)}")
    return TASKS[name](limit=limit, seed=seed)


def task_table() -> list[dict]:
    return [
        {"task": n, "model_kind": t.kind, "metric": t.primary, "higher_is_better": t.higher_is_better,
         "default_limit": t.default_limit, "summary": t.summary}
        for n, t in TASKS.items()
    ]  # fmt: skip


__all__ = ["TASKS", "NotApplicableError", "Task", "TaskOutput", "Treat", "make_task", "task_table"]
