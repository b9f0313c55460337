"""Tasks: what differs between classification, detection and the next one, one module each.

``get_task(manifest.task)`` is how the server and the trainer reach a task. Registering
a task is its import line below.
"""

from dgserve.tasks.base import (
    ImageInfo, InferenceItem, Options, Task, TensorSpec, get_task, register_task, tasks,
)

from dgserve.tasks import classification, detection, segmentation, video  # noqa: E402,F401  (registration)

__all__ = ["ImageInfo", "InferenceItem", "Options", "Task", "TensorSpec", "get_task", "register_task", "tasks"]
