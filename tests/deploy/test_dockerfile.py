"""The Dockerfile and .dockerignore: layer order, non-root, readiness healthcheck, context contents."""

from __future__ import annotations

import re
import subprocess
import tomllib
from fnmatch import fnmatch
from types import SimpleNamespace


def instructions(lib: SimpleNamespace) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", lib.DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def index_of(steps: list[tuple[str, str]], word: str, contains: str) -> int:
    return next(i for i, (w, rest) in enumerate(steps) if w == word and contains in rest)


def test_dependencies_are_installed_before_the_code_is_copied(lib: SimpleNamespace) -> None:
    steps = instructions(lib)
    copy_pyproject = index_of(steps, "COPY", "pyproject.toml")
    install_deps = index_of(steps, "RUN", "pip install -r")
    copy_app = index_of(steps, "COPY", "app/")
    install_pkg = index_of(steps, "RUN", "--no-deps")
    copy_store = index_of(steps, "COPY", "model_store/")
    assert copy_pyproject < install_deps < copy_app < install_pkg < copy_store
    # the dependency layer sees nothing but pyproject.toml
    assert all(w != "COPY" for w, _ in steps[copy_pyproject + 1 : install_deps])


def test_the_dependency_list_is_read_from_pyproject(lib: SimpleNamespace) -> None:
    steps = instructions(lib)
    run = steps[index_of(steps, "RUN", "pip install -r")][1]
    assert "tomllib" in run and "['project']['dependencies']" in run
    deps = tomllib.loads((lib.ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("torch==") for d in deps), "torch is pinned in pyproject"


def test_runs_as_a_non_root_user_with_a_readiness_healthcheck(lib: SimpleNamespace) -> None:
    steps = instructions(lib)
    users = [rest for w, rest in steps if w == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    (check,) = [rest for w, rest in steps if w == "HEALTHCHECK"]
    assert "curl" in check and "/readyz" in check
    assert ("ENTRYPOINT", '["dgserve"]') in steps and ("CMD", '["serve"]') in steps
    env = " ".join(rest for w, rest in steps if w == "ENV")
    assert "DGSERVE_HOST=0.0.0.0" in env, "listen beyond the container's loopback"
    assert ("VOLUME", '["/data"]') in steps and "DGSERVE_DATA_DIR=/data" in env


def test_the_first_from_is_the_real_base(lib: SimpleNamespace) -> None:
    steps = instructions(lib)
    froms = [rest for w, rest in steps if w == "FROM"]
    assert froms == ["${BASE_IMAGE}"]
    assert ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm") in steps


def test_dockerignore_keeps_the_context_small(lib: SimpleNamespace) -> None:
    patterns = [
        line.strip() for line in lib.DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch(path, p) or fnmatch(path, p.removeprefix("**/")) or path.split("/")[0] == p for p in patterns)

    for path in (".venv", ".git", "data", "tests", "__pycache__", "app/dgserve/__pycache__", "dgserve.egg-info"):
        assert ignored(path), f"{path} should not be sent to the build"
    for path in ("pyproject.toml", "README.md", "app", "app/dgserve/cli.py", "model_store"):
        assert not ignored(path), f"{path} is needed by the build"


def test_container_test_script_is_valid_bash(lib: SimpleNamespace) -> None:
    result = subprocess.run(["bash", "-n", str(lib.CONTAINER_TEST)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert lib.CONTAINER_TEST.stat().st_mode & 0o111, "scripts/container_test.sh should be executable"
