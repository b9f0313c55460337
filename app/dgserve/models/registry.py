"""Models by name: one registry and one factory, as in timm and torchvision.

Architectures register themselves with ``@register_model``; the rest of dgserve only
ever calls ``create_model(name, **kw)`` and never imports a builder directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

# The name of a task in dgserve.tasks; tests check that every architecture's task is one.
Task = str
Family = Literal["dgnet", "glore"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    task: Task
    family: Family
    builder: Callable[..., nn.Module]
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


class UnknownArchitectureError(KeyError):
    """Raised for a name that no builder registered."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown architecture {self.name!r}; known: {', '.join(sorted(_REGISTRY))}"


def register_model(
    name: str, *, task: Task, family: Family, description: str = ""
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} registered twice")
        doc = description or (builder.__doc__ or "").strip().splitlines()[0:1]
        text = doc if isinstance(doc, str) else (doc[0] if doc else "")
        _REGISTRY[name] = ModelEntry(name, task, family, builder, text)
        return builder

    return wrap


def get_entry(name: str) -> ModelEntry:
    _ensure_builtin_models()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownArchitectureError(name) from None


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build a registered architecture with freshly initialised weights."""
    return get_entry(name).builder(**kwargs)


def list_models(task: Task | None = None, family: Family | None = None) -> list[str]:
    _ensure_builtin_models()
    return sorted(
        e.name
        for e in _REGISTRY.values()
        if (task is None or e.task == task) and (family is None or e.family == family)
    )


def _ensure_builtin_models() -> None:
    # Importing the architecture modules registers them. Done lazily so that importing
    # the registry alone stays cheap and free of side effects.
    from dgserve.models import detection, dgnet, glore, segmentation, small  # noqa: F401
