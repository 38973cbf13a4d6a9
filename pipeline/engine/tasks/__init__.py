"""Tasks: what a model learns. Each task is one file (its loss, its metrics, its per-epoch artifacts) and
one entry in TASKS; the engine calls them through the Task protocol in base.py."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from pipeline.engine.tasks.base import Task
from pipeline.engine.tasks.classify import ClassifyTask
from pipeline.engine.tasks.generate import GenerateTask
from pipeline.engine.tasks.lm import LMTask
from pipeline.engine.tasks.mlm import MLMTask
from pipeline.engine.tasks.reconstruct import ReconstructTask
from pipeline.engine.tasks.regress import RegressTask
from pipeline.engine.tasks.seq2seq import Seq2SeqTask

if TYPE_CHECKING:
    from pipeline.data.prepare import DataMeta

# One entry per task name: adding a task is one new file here plus its line.
TASKS: dict[str, Callable[[], Task]] = {"classify": ClassifyTask, "regress": RegressTask, "seq2seq": Seq2SeqTask,
                                        "lm": LMTask, "reconstruct": ReconstructTask, "generate": GenerateTask,
                                        "mlm": MLMTask}


def data_kind(meta: DataMeta) -> str:
    """class or value (inputs with labels or real targets), token pairs (seq2seq sources and targets) or text."""
    if meta.target == "tokens":
        return "token pairs" if meta.target_len else "text"
    return meta.target


def task_data_mismatch(task: str, meta: DataMeta) -> str | None:
    """Why `task` cannot read the data that `meta` describes, or None when it can."""
    kind, wanted = data_kind(meta), TASKS[task]().reads
    if kind in wanted:
        return None
    readers = ", ".join(name for name, make in TASKS.items() if kind in make().reads)
    return (f"{task} needs {' or '.join(sorted(wanted))} data, but dataset {meta.name!r} holds "
            f"{kind} data; tasks for {kind} data: {readers}")


def make_task(name: str, meta: DataMeta | None = None) -> Task:
    """A task for data described by `meta` (a task that needs the data's facts, such as where its prepared
    folder is for a feature classifier, keeps them)."""
    task = TASKS[name]()
    if meta is not None:
        task.attach(meta)
    return task
