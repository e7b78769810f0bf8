"""Tasks: loss, metrics and evaluation protocol of rating, CTR and top-k recommendation."""

from __future__ import annotations

from dnis.data.dataset import EncodedDataset
from dnis.tasks.base import Task, predict
from dnis.tasks.pointwise import CTRTask, RatingTask
from dnis.tasks.topk import TopKTask

TASK_CLASSES: dict[str, type[Task]] = {"rating": RatingTask, "ctr": CTRTask, "topk": TopKTask}


def make_task(dataset: EncodedDataset) -> Task:
    return TASK_CLASSES[dataset.task](dataset)


__all__ = ["CTRTask", "RatingTask", "Task", "TopKTask", "make_task", "predict"]
