"""How ``ServedModels`` sizes each CPU replica's torch threads: the cores split over every
replica that may compute at once, in every server process on the host."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dgserve.metrics import Metrics
from dgserve.model_store import ModelStore
from dgserve.serving.served_models import ServedModels
from dgserve.settings import Settings


@pytest.mark.parametrize(
    ("processes", "instances", "threads"),
    [
        (1, 1, 8),
        (2, 1, 4),  # as the launcher passes it to each of 2 processes
        (2, 2, 2),
        ("auto", 1, 8),  # an app made without the launcher (a test, a Ray replica) is alone
        (16, 1, 1),  # never fewer than one
    ],
)
def test_cpu_threads_split_the_cores_over_replicas_and_processes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, processes: int | str, instances: int, threads: int
) -> None:
    monkeypatch.setattr("dgserve.serving.served_models.available_cores", lambda: 8)
    settings = Settings(server_processes=processes, instances_per_device=instances, devices="cpu", data_dir=tmp_path)
    served = ServedModels(settings, ModelStore(tmp_path), Metrics())
    assert served._worker_threads(torch.device("cpu")) == threads
    pinned = ServedModels(settings.model_copy(update={"torch_threads": 3}), ModelStore(tmp_path), Metrics())
    assert pinned._worker_threads(torch.device("cpu")) == 3
