"""Settings come from DGSERVE_* variables, and only when built."""

from __future__ import annotations

from pathlib import Path

import pytest

import dgserve
from dgserve.settings import Settings, default_model_store


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DGSERVE_MODELS", "clf, det")
    monkeypatch.setenv("DGSERVE_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("DGSERVE_BATCHING", '{"clf": {"max_batch_size": 2, "max_delay_ms": 0}}')
    monkeypatch.setenv("DGSERVE_DEVICES", "cuda:0,cuda:1")
    settings = Settings()
    assert settings.models == ["clf", "det"] and settings.max_batch_size == 16
    assert settings.batching["clf"].max_batch_size == 2 and settings.batching["clf"].max_queue_size is None
    monkeypatch.setenv("DGSERVE_DEVICES", "tpu")
    with pytest.raises(ValueError, match="tpu"):
        Settings()


def test_default_model_store_is_the_bundled_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DGSERVE_MODEL_STORE", raising=False)
    bundled = Path(dgserve.__file__).resolve().parents[2] / "model_store"  # app/dgserve/ -> the checkout
    assert default_model_store() == (bundled if bundled.is_dir() else Path("model_store"))
    assert Settings().model_store == default_model_store()
    monkeypatch.setenv("DGSERVE_MODEL_STORE", "/srv/models")
    assert Settings().model_store == Path("/srv/models")


def test_inspection_store_defaults_to_sqlite_under_the_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DGSERVE_INSPECTION_URL", raising=False)
    assert Settings(data_dir=Path("/var/x")).inspection_location == Path("/var/x/inspections.sqlite3")
    monkeypatch.setenv("DGSERVE_INSPECTION_URL", "sqlite:////srv/records.db")
    assert Settings().inspection_location == "sqlite:////srv/records.db"


@pytest.mark.parametrize(("cores", "processes"), [(1, 1), (2, 2), (16, 2)])
def test_auto_server_processes_are_two_where_two_cores_are_available(
    monkeypatch: pytest.MonkeyPatch, cores: int, processes: int
) -> None:
    """The default: one GIL per core up to ``AUTO_SERVER_PROCESSES``, never more processes than cores."""
    monkeypatch.delenv("DGSERVE_SERVER_PROCESSES", raising=False)
    monkeypatch.delenv("DGSERVE_DEVICES", raising=False)
    monkeypatch.setattr("dgserve.settings.available_cores", lambda: cores)
    monkeypatch.setattr("dgserve.settings.visible_gpus", lambda: 0)
    settings = Settings()
    assert settings.server_processes == "auto"
    assert settings.server_process_count == processes
    assert Settings(server_processes=3).server_process_count == 3  # a number is taken as given


def test_auto_server_processes_are_one_where_the_models_compute_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """One CUDA context and one copy of each model per GPU, unless asked for more."""
    monkeypatch.delenv("DGSERVE_SERVER_PROCESSES", raising=False)
    monkeypatch.setattr("dgserve.settings.available_cores", lambda: 16)
    monkeypatch.setattr("dgserve.settings.visible_gpus", lambda: 0)
    assert Settings(devices="cuda:0").server_process_count == 1
    assert Settings(devices="cpu,cuda:1").server_process_count == 1
    assert Settings(devices="auto").server_process_count == 2  # auto on a host without a GPU is the CPU
    monkeypatch.setattr("dgserve.settings.visible_gpus", lambda: 8)
    assert Settings(devices="auto").server_process_count == 1
    assert Settings(devices="cpu").server_process_count == 2  # the GPUs are there, and not used
    assert Settings(devices="auto", server_processes=4).server_process_count == 4


def test_server_processes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DGSERVE_SERVER_PROCESSES", "3")
    assert Settings().server_processes == 3
    monkeypatch.setenv("DGSERVE_SERVER_PROCESSES", "auto")
    assert Settings().server_processes == "auto"
    for bad in ("0", "many"):
        monkeypatch.setenv("DGSERVE_SERVER_PROCESSES", bad)
        with pytest.raises(ValueError, match="server_processes"):
            Settings()
