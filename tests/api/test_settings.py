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
