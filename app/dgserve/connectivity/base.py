"""What a connectivity record is, whatever its kind.

A *kind* is one sort of per-image record a module leaves behind after a forward pass:
a DG-Net stage's thresholded edge matrix, a GloRe unit's graph and projection. Each
kind is one dataclass that subclasses ``ConnectivityRecord`` and declares, on its own
fields, everything the rest of the server needs to know about it:

* ``kind``: its key in the connectivity JSON (``{"stages": [...], ...}``);
* ``matrix(...)`` fields: large, left out of a response by ``?connectivity=false``;
* ``shared(digest_field, ...)`` fields: the same for every image of a model version
  (GloRe's A_g), so a store keeps each value once under the digest the record carries;
* ``derived``: properties that ``to_dict`` adds, figures a client would recompute;
* ``Graph``: the dataclass that describes a module of this kind in ``/v1/models/{name}``;
* ``tensor``: the field that tensor protocols (the Open Inference Protocol) send, one
  output per module, with its datatype and the value that pads ragged images;
* ``aggregates``: how analysis over many images summarises its fields
  (``Aggregate``: an edge matrix, a per-node frequency, a mean, shares over categories),
  so ``dgserve.analysis`` summarises and exports every kind without knowing it by name.

The API schema, ``strip_matrices`` and the inspection store's de-duplication are all
derived from these declarations, so adding a kind touches none of them. Nothing here
imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

__all__ = [
    "STATISTICS",
    "Aggregate",
    "ConnectivityRecord",
    "ConnectivitySource",
    "GraphDescription",
    "ImageConnectivity",
    "TensorField",
    "describe",
    "kind_of",
    "kinds",
    "matrix",
    "register_kind",
    "shared",
    "strip_matrices",
    "value",
]

R = TypeVar("R", bound="ConnectivityRecord")

_MATRIX = "dgserve_matrix"
_SHARED_BY = "dgserve_shared_by"
_DESCRIPTION = "description"


def value(description: str = "", default: Any = dataclasses.MISSING) -> Any:
    """A plain field: always in the response. A ``default`` lets a kind add a field that older records lack."""
    return dataclasses.field(default=default, metadata={_DESCRIPTION: description})


def matrix(description: str = "") -> Any:
    """A large per-image field, left out of responses by ``?connectivity=false`` (still stored)."""
    return dataclasses.field(metadata={_DESCRIPTION: description, _MATRIX: True})


def shared(digest_field: str, description: str = "") -> Any:
    """A matrix that is the same for every image of a model version, named by ``digest_field``.

    A store keeps one copy per digest and puts it back on read.
    """
    return dataclasses.field(metadata={_DESCRIPTION: description, _MATRIX: True, _SHARED_BY: digest_field})


@dataclasses.dataclass(frozen=True, slots=True)
class TensorField:
    """The field a kind sends as one tensor per module: ``[images, *dims]`` of ``datatype``."""

    field: str
    datatype: str  # the protocol's name: FP32, INT32, ...
    ndim: int
    pad: float = 0  # fills an image whose field is smaller than the batch's largest


# What ``Aggregate.statistic`` may say; ``dgserve.analysis.layout`` gives each its numbers:
# "edges": a square weight matrix (0 = closed edge): open frequency, mean, std, patterns;
# "frequency": a list of booleans: how often each entry is true;
# "mean": a number: its mean;
# "shares": a map of category indices (-1 = none): each category's share of the entries.
STATISTICS = frozenset({"edges", "frequency", "mean", "shares"})


@dataclasses.dataclass(frozen=True, slots=True)
class Aggregate:
    """How analysis summarises one field (or derived property) of a kind over many images.

    ``size_field`` names the field that holds the number of categories ("shares" only).
    """

    field: str
    statistic: str
    size_field: str | None = None

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {self.statistic!r}; known: {', '.join(sorted(STATISTICS))}")
        if (self.statistic == "shares") != (self.size_field is not None):
            raise ValueError("size_field is required by, and only by, the 'shares' statistic")


@dataclasses.dataclass(frozen=True, slots=True)
class GraphDescription:
    """How one module of a kind describes its graph in ``/v1/models/{name}``."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectivityRecord:
    """One module's record for one image. Subclasses are frozen dataclasses of plain values.

    Records are built from lists, numbers and strings only, so they serialise to JSON
    without torch. Lists may be shared between the records of a batch (a weight is the
    same for every image), so a record is read, never mutated.
    """

    kind: ClassVar[str]
    derived: ClassVar[tuple[str, ...]] = ()
    Graph: ClassVar[type[GraphDescription]]
    name_field: ClassVar[str]
    """The field that names the module (as the Graph's ``name`` does)."""
    tensor: ClassVar[TensorField | None] = None
    aggregates: ClassVar[tuple[Aggregate, ...]] = ()
    # Filled in by register_kind, from the fields' declarations.
    field_names: ClassVar[tuple[str, ...]] = ()
    matrix_fields: ClassVar[frozenset[str]] = frozenset()
    shared_fields: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def tensor_dims(cls, graph: Mapping[str, Any]) -> tuple[int, ...]:
        """The per-image shape of ``tensor`` for the module ``graph`` describes; -1 where it varies."""
        return (-1,) * (cls.tensor.ndim if cls.tensor is not None else 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, derived figures included; shares the record's lists, copies nothing."""
        out = {name: getattr(self, name) for name in self.field_names}
        for name in self.derived:
            out[name] = getattr(self, name)
        return out


_KINDS: dict[str, type[ConnectivityRecord]] = {}


def register_kind(cls: type[R]) -> type[R]:
    """Class decorator: make ``cls`` a known kind (its ``kind`` key must be new)."""
    key = getattr(cls, "kind", None)
    if not isinstance(key, str) or not key:
        raise TypeError(f"{cls.__name__} must set the class attribute kind")
    if key in _KINDS and _KINDS[key] is not cls:
        raise ValueError(f"connectivity kind {key!r} is already registered by {_KINDS[key].__name__}")
    if getattr(cls.Graph, "kind", None) != key:
        raise TypeError(f"{cls.__name__}.Graph must declare kind = {key!r}")
    fields = dataclasses.fields(cls)
    cls.field_names = tuple(f.name for f in fields)
    cls.matrix_fields = frozenset(f.name for f in fields if f.metadata.get(_MATRIX))
    cls.shared_fields = {f.name: f.metadata[_SHARED_BY] for f in fields if _SHARED_BY in f.metadata}
    if cls.name_field not in cls.field_names:
        raise TypeError(f"{cls.__name__}.name_field {cls.name_field!r} is not a field")
    if cls.tensor is not None and cls.tensor.field not in cls.field_names:
        raise TypeError(f"{cls.__name__}.tensor names {cls.tensor.field!r}, which is not a field")
    for name, digest in cls.shared_fields.items():
        if digest not in cls.field_names:
            raise TypeError(f"{cls.__name__}.{name} is shared by {digest!r}, which is not a field")
    readable = (*cls.field_names, *cls.derived)
    for agg in cls.aggregates:
        for name in (agg.field, agg.size_field):
            if name is not None and name not in readable:
                raise TypeError(f"{cls.__name__} aggregates {name!r}, which is neither a field nor derived")
    _KINDS[key] = cls
    return cls


def kinds() -> tuple[type[ConnectivityRecord], ...]:
    """Every registered kind, in registration order (the order of the JSON's keys)."""
    return tuple(_KINDS.values())


def kind_of(key: str) -> type[ConnectivityRecord]:
    try:
        return _KINDS[key]
    except KeyError:
        raise KeyError(f"unknown connectivity kind {key!r}; known: {', '.join(_KINDS)}") from None


def field_description(cls: type[Any], name: str) -> str:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return str(f.metadata.get(_DESCRIPTION, ""))
    return ""


class ImageConnectivity:
    """Every record of one image, grouped by kind (every registered kind has a list)."""

    __slots__ = ("_records",)

    def __init__(self, records: Iterable[ConnectivityRecord] = ()) -> None:
        self._records: dict[str, list[ConnectivityRecord]] = {cls.kind: [] for cls in kinds()}
        for record in records:
            self.add(record)

    def add(self, record: ConnectivityRecord) -> None:
        bucket = self._records.get(type(record).kind)
        if bucket is None or type(record) is not _KINDS[type(record).kind]:
            raise TypeError(f"{type(record).__name__} is not a registered connectivity kind")
        bucket.append(record)

    def __getitem__(self, key: str) -> list[ConnectivityRecord]:
        return self._records[key]

    def of(self, cls: type[R]) -> list[R]:
        """The records of one kind, typed."""
        return self._records[cls.kind]  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, ``{kind: [record, ...]}``; shares the records' lists (meant to be serialised)."""
        return {key: [r.to_dict() for r in records] for key, records in self._records.items()}


def strip_matrices(connectivity: Mapping[str, Any]) -> dict[str, Any]:
    """The connectivity without its matrix fields: what ``?connectivity=false`` returns."""
    out = {}
    for key, records in connectivity.items():
        drop = kind_of(key).matrix_fields
        out[key] = [{k: v for k, v in record.items() if k not in drop} for record in records]
    return out


@runtime_checkable
class ConnectivitySource(Protocol):
    """A module that recorded connectivity during its last forward pass."""

    def image_connectivity(self, name: str) -> Sequence[ConnectivityRecord]:
        """One record per image of the last batch, named ``name`` (empty before any forward)."""
        ...

    def graph_description(self, name: str) -> GraphDescription:
        """This module's graph, for ``/v1/models/{name}``."""
        ...


def describe(sources: Iterable[tuple[str, ConnectivitySource]]) -> dict[str, list[dict[str, Any]]]:
    """``{kind: [graph, ...]}`` for every registered kind, from a model's sources."""
    out: dict[str, list[dict[str, Any]]] = {cls.kind: [] for cls in kinds()}
    for name, source in sources:
        graph = source.graph_description(name)
        out[kind_of(graph.kind).kind].append(graph.to_dict())
    return out
