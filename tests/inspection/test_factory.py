"""open_inspection_store: which locations it accepts, and which backend each gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from dgserve.inspection import InspectionStore, PostgreSQLBackend, SQLiteBackend, open_inspection_store


def test_factory_accepts_paths_and_sqlite_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cases = {
        "data/x.db": Path("data/x.db"),
        str(tmp_path / "x.db"): tmp_path / "x.db",
        "sqlite:///data/x.db": Path("data/x.db"),
        f"sqlite:///{tmp_path}/x.db": tmp_path / "x.db",  # four slashes: absolute
        "SQLite:///x.db": Path("x.db"),
    }
    for location, path in cases.items():
        store = open_inspection_store(location, max_records=10)
        assert isinstance(store, InspectionStore)
        assert isinstance(store.backend, SQLiteBackend)
        assert store.backend.path == path, location
        assert store.max_records == 10
    store = open_inspection_store(tmp_path / "y.db", max_age_s=5.0, batch_size=8)
    assert isinstance(store.backend, SQLiteBackend) and store.backend.path == tmp_path / "y.db"
    assert store.max_age_s == 5.0


@pytest.mark.parametrize(
    "location, message",
    [
        ("redis://cache:6379/0", "unsupported inspection store URL scheme 'redis'"),
        ("postgresql://db/x?no_such_parameter=1", "invalid PostgreSQL URL"),
        ("sqlite://", "invalid SQLite URL"),
        ("sqlite:///", "invalid SQLite URL"),
        ("sqlite://host/x.db", "invalid SQLite URL"),
        ("sqlite:///x.db?mode=memory", "invalid SQLite URL"),
        ("  ", "empty"),
    ],
)
def test_factory_refuses_what_it_cannot_open(location: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_inspection_store(location)


def test_factory_passes_bad_options_to_the_store() -> None:
    with pytest.raises(ValueError, match="max_records"):
        open_inspection_store("x.db", max_records=0)
    with pytest.raises(TypeError):
        open_inspection_store("x.db", no_such_option=1)


def test_the_refusal_names_what_is_supported_and_hides_the_password() -> None:
    with pytest.raises(ValueError) as info:
        open_inspection_store("redis://user:s3cret@cache/0")
    assert str(info.value).endswith(
        "; supported: a filesystem path or sqlite:///<path> or postgresql://<user>[:<password>]@<host>[:<port>]/<db>"
    )
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "url, location",
    [
        ("postgresql://app:s3cret@db.internal:5433/records", "postgresql://app@db.internal:5433/records"),
        ("postgres://db/records?sslmode=require&password=s3cret", "postgresql://db/records"),
        ("PostgreSQL://app@[::1]/records", "postgresql://app@[::1]/records"),
        ("postgresql:///records?host=/run/postgresql", "postgresql://%2Frun%2Fpostgresql/records"),
    ],
)
def test_postgresql_urls_get_the_shared_backend_and_a_location_without_the_password(url: str, location: str) -> None:
    store = open_inspection_store(url, max_records=10, when_full="drop")
    assert isinstance(store.backend, PostgreSQLBackend)
    assert store.backend.location == location
    assert "s3cret" not in repr(store) and "s3cret" not in repr(store.backend)
