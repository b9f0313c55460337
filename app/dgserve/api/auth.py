"""Optional API keys, with scopes: who may run inference and who may read the records.

Off unless keys are given: ``DGSERVE_API_KEYS`` (the keys themselves, e.g. from a
Kubernetes Secret) and/or ``DGSERVE_API_KEYS_FILE`` (their SHA-256 hashes, so the file
holds nothing that works as a key). A client sends its key as ``Authorization: Bearer
<key>`` or ``X-API-Key: <key>``, over HTTP (``/v1``, ``/v2``) or as gRPC metadata.

* **Scopes.** ``infer`` runs models (``POST /v1/models/{name}/{task}``, OIP infer);
  ``read`` reads inspection records and everything else the server stores
  (``/v1/inspections`` and any later route that is not listed here: default deny). A
  key may have both (the default for a key given without scopes). Model metadata
  (``GET /v1/models``, ``/v2`` metadata and model readiness) takes any valid key.
* **Open:** the probes (``/healthz``, ``/readyz``, ``/v2/health/*``, gRPC
  ``ServerLive``/``ServerReady``), ``/metrics``, the OpenAPI document and docs, and the
  web inspector's own page and files (``/inspector``; its API calls carry a key). Kubelet
  probes and Prometheus scrapes carry no key by default; metrics hold counts and
  model names, no records. Keep ``/metrics`` off the public network instead.
* **Answers:** no key or an unknown one: 401 with ``WWW-Authenticate: Bearer``; a
  known key without the scope: 403. Both are typed errors (``dgserve.errors``), answered
  by the one error handler.
* **Keys are compared as SHA-256 digests with ``hmac.compare_digest``,** against every
  known digest without stopping at a match, so timing tells nothing about a key. Only
  digests are kept in memory, and no key is ever logged or put in a message (the
  settings hold them as ``SecretStr``).

``DGSERVE_API_KEYS`` is a comma-separated list of ``KEY`` or ``KEY:SCOPES`` with scopes
joined by ``+`` (``k1:infer,k2:read,k3:infer+read``). Each line of the file is
``SHA256HEX [SCOPES]`` (``printf %s "$KEY" | sha256sum``), ``#`` starts a comment.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from fastapi import Request

from dgserve.errors import ForbiddenError, UnauthorizedError
from dgserve.oip.http import ERROR_CONTENT
from dgserve.settings import Settings

__all__ = ["SCOPES", "ApiKeys", "Need", "authorize", "document_security", "grpc_need", "http_need", "presented_key"]

Scope = Literal["infer", "read"]
SCOPES: Final[tuple[Scope, ...]] = ("infer", "read")
# What a call needs: "open" (no key), "any" (any valid key), or one scope.
Need = Literal["open", "any", "infer", "read"]
MIN_KEY_LENGTH = 16  # shorter is a mistake (a test value, a truncated secret), refused at start

# The inspector's page and assets hold no records: they must load before the user can give a key.
OPEN_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready",
                               "/inspector", "/inspector/{asset}"})
METADATA_PATHS: Final = frozenset({"/v1/models", "/v1/models/{name}"})
# gRPC methods by name (the path's last part); any other method (Triton's unimplemented ones) needs a key.
_GRPC_NEEDS: Final[Mapping[str, Need]] = {
    "ServerLive": "open", "ServerReady": "open", "ModelInfer": "infer",
    "ServerMetadata": "any", "ModelMetadata": "any", "ModelReady": "any",
}  # fmt: skip


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _scopes(text: str, where: str) -> frozenset[Scope]:
    names = [s.strip() for s in text.replace(",", "+").split("+") if s.strip()]
    unknown = [n for n in names if n not in SCOPES]
    if unknown:
        raise ValueError(f"{where}: unknown scope {unknown[0]!r}; scopes are {', '.join(SCOPES)}")
    return frozenset(names or SCOPES)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """The known keys' SHA-256 digests and their scopes; empty means keys are off."""

    entries: tuple[tuple[bytes, frozenset[Scope]], ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        entries = []
        if settings.api_keys is not None:
            for n, item in enumerate(settings.api_keys.get_secret_value().split(","), 1):
                key, _, scopes = item.strip().partition(":")
                if not key:
                    continue
                if len(key) < MIN_KEY_LENGTH:  # the message names the entry, never the key
                    raise ValueError(f"DGSERVE_API_KEYS entry {n} is shorter than {MIN_KEY_LENGTH} characters")
                entries.append((_digest(key), _scopes(scopes, f"DGSERVE_API_KEYS entry {n}")))
        if settings.api_keys_file is not None:
            entries.extend(_read_hashes(settings.api_keys_file))
        return cls(tuple(entries))

    def scopes_of(self, key: str) -> frozenset[Scope]:
        """The scopes of ``key`` (empty for an unknown key), in time independent of which matched."""
        digest, found = _digest(key), frozenset[Scope]()
        for known, scopes in self.entries:
            if hmac.compare_digest(digest, known):
                found = found | scopes
        return found

    def check(self, key: str | None, need: Need) -> None:
        """Return if a call that needs ``need`` may go ahead with ``key``; else 401 or 403."""
        if not self.enabled or need == "open":
            return
        if not key:
            raise UnauthorizedError("this server needs an API key: send Authorization: Bearer <key> or X-API-Key")
        scopes = self.scopes_of(key)
        if not scopes:
            raise UnauthorizedError("the API key is not valid")
        if need != "any" and need not in scopes:
            raise ForbiddenError(f"the API key does not have the {need!r} scope this call needs")


def _read_hashes(path: Path) -> list[tuple[bytes, frozenset[Scope]]]:
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        digest, _, scopes = text.partition(" ")
        where = f"{path}:{n}"
        try:
            raw = bytes.fromhex(digest)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise ValueError(f"{where}: expected a SHA-256 hash in hex (64 characters), then optional scopes")
        entries.append((raw, _scopes(scopes, where)))
    return entries


def presented_key(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> str | None:
    """The key in ``Authorization: Bearer`` or ``X-API-Key`` (lower-case header names)."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    bearer = api_key = None
    for name, value in pairs:
        if name == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
        elif name == "x-api-key" and value.strip():
            api_key = value.strip()
    return bearer or api_key


def http_need(method: str, path_template: str) -> Need:
    """What an HTTP route needs, by its path template (default deny: ``read``).

    Under ``/v1/models`` only the model metadata takes any key: the routes beside it
    that read stored records (the connectivity summary and its picture) need ``read``,
    as the new routes there will unless they are listed here.
    """
    if path_template in OPEN_PATHS:
        return "open"
    if path_template.startswith("/v2"):
        return "infer" if method == "POST" else "any"
    if path_template.startswith("/v1/models/") and method == "POST":
        return "infer"
    if path_template in METADATA_PATHS:
        return "any"
    return "read"


def grpc_need(method_path: str) -> Need:
    return _GRPC_NEEDS.get(method_path.rsplit("/", 1)[-1], "any")


async def authorize(request: Request) -> None:
    """The app-wide dependency: every API route passes here before its own code runs."""
    keys: ApiKeys = request.app.state.dgserve.api_keys
    if keys.enabled:
        route: Any = request.scope.get("route")
        keys.check(presented_key(request.headers), http_need(request.method, str(getattr(route, "path", ""))))


def document_security(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare the keys in an OpenAPI document: the schemes, and each operation's 401/403."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {}).update({
        "bearer": {"type": "http", "scheme": "bearer", "description": "an API key (DGSERVE_API_KEYS)"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    })  # fmt: skip
    v1_error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for path, operations in schema.get("paths", {}).items():
        error = {"content": ERROR_CONTENT} if path.startswith("/v2") else v1_error  # each protocol's error body
        for method, operation in operations.items():
            need = http_need(method.upper(), path)
            if need == "open":
                continue
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
            responses = operation.setdefault("responses", {})
            responses.setdefault("401", {"description": "no API key, or an unknown one", **error})
            if need != "any":
                responses.setdefault("403", {"description": f"the key lacks the {need!r} scope", **error})
    return schema
