"""API keys (``api/auth.py``): scopes over /v1, /v2 and gRPC, what stays open, the
hashed-key file, and that no key reaches a log or a message."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

sys.path.insert(0, str(Path(__file__).parent))
from server_process import ServerProcess  # noqa: E402

from dgserve.api import auth
from dgserve.api.auth import ApiKeys
from dgserve.errors import ForbiddenError, UnauthorizedError
from dgserve.settings import Settings

pytestmark = [pytest.mark.timeout(600)]
ASYNC = pytest.mark.asyncio(loop_scope="session")

INFER = "infer-key-0123456789abcdef"
READ = "read-key-0123456789abcdef"
BOTH = "both-key-0123456789abcdef"
FILED = "filed-key-0123456789abcdef"  # known only by its hash, from the file
KEYS = f"{INFER}:infer, {READ}:read, {BOTH}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed_settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    hashes = tmp_path / "keys.sha256"
    digest = hashlib.sha256(FILED.encode()).hexdigest()
    hashes.write_text(f"# analysts\n{digest} read\n")
    return make_settings(api_keys=KEYS, api_keys_file=hashes, grpc_port=0)


@ASYNC
async def test_scopes_over_http(run_app: Any, keyed_settings: Settings, image: Callable[..., bytes]) -> None:
    jpeg = {"content": image(), "headers": {"content-type": "image/jpeg"}}
    async with run_app(keyed_settings) as (_, client):
        # Probes, metrics and the OpenAPI document stay open.
        for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready", "/openapi.json"):
            assert (await client.get(path)).status_code == 200, path

        missing = await client.post("/v1/models/clf/classify", **jpeg)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = await client.get("/v1/inspections", headers=bearer("not-a-key-0123456789abcdef"))
        assert wrong.status_code == 401 and "www-authenticate" in wrong.headers

        # infer: classify yes, read no; read: the other way round; both: both.
        classified = await client.post("/v1/models/clf/classify", content=jpeg["content"],
                                       headers={**jpeg["headers"], "X-API-Key": INFER})  # fmt: skip
        assert classified.status_code == 200
        record_id = classified.json()["results"][0]["id"]
        denied = await client.get(f"/v1/inspections/{record_id}", headers={"X-API-Key": INFER})
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"
        refused = await client.post("/v1/models/clf/classify", content=jpeg["content"],
                                    headers={**jpeg["headers"], **bearer(READ)})  # fmt: skip
        assert refused.status_code == 403
        for key in (READ, BOTH, FILED):
            assert (await client.get(f"/v1/inspections/{record_id}", headers=bearer(key))).status_code == 200, key
            assert (await client.get("/v1/models", headers=bearer(key))).status_code == 200  # metadata: any key
        assert (await client.post("/v1/models/clf/classify", headers={**jpeg["headers"], **bearer(BOTH)},
                                  content=jpeg["content"])).status_code == 200  # fmt: skip
        # What is computed from stored records needs read, even under /v1/models.
        summary = "/v1/models/clf/connectivity"
        assert (await client.get(summary, headers=bearer(INFER))).status_code == 403
        assert (await client.get(summary, headers=bearer(READ))).status_code == 200
        assert (await client.get("/v1/models/clf", headers=bearer(INFER))).status_code == 200

        # The Open Inference Protocol: its own error body, the same rules.
        oip = await client.post("/v2/models/clf/infer", json={"inputs": []})
        assert oip.status_code == 401 and "error" in oip.json() and "www-authenticate" in oip.headers
        assert (await client.post("/v2/models/clf/infer", json={"inputs": []}, headers=bearer(READ))).status_code == 403
        assert (await client.get("/v2/models/clf", headers=bearer(READ))).status_code == 200

        # The OpenAPI document says which operations take a key.
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert paths["/v1/inspections"]["get"]["security"]
        assert {"401", "403"} <= paths["/v1/models/{name}/classify"]["post"]["responses"].keys()
        assert "security" not in paths["/healthz"]["get"]


@ASYNC
async def test_scopes_over_grpc(run_app: Any, keyed_settings: Settings) -> None:
    async with run_app(keyed_settings) as (app, _):
        port = app.state.dgserve.grpc_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert (await stub.ServerLive(service_pb2.ServerLiveRequest())).live  # open, as the HTTP probes
            with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
                await stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="clf"))
            assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
            meta = await stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="clf"),
                                            metadata=[("x-api-key", READ)])  # fmt: skip
            assert meta.name == "clf"
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.ModelInfer(service_pb2.ModelInferRequest(model_name="clf"),
                                      metadata=[("authorization", f"Bearer {READ}")])  # fmt: skip
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as allowed_but_empty:
                await stub.ModelInfer(service_pb2.ModelInferRequest(model_name="clf"),
                                      metadata=[("authorization", f"Bearer {INFER}")])  # fmt: skip
            assert allowed_but_empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # past the key check


@ASYNC
async def test_no_key_reaches_a_log_or_a_message(
    run_app: Any, keyed_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with run_app(keyed_settings) as (_, client):
        for key in (INFER, READ, "a-wrong-key-0123456789"):
            response = await client.get("/v1/inspections", headers=bearer(key))
            assert key not in response.text
    text = caplog.text + repr(keyed_settings) + str(keyed_settings.model_dump())
    for key in (INFER, READ, BOTH, FILED, "a-wrong-key-0123456789"):
        assert key not in text


def test_keys_off_by_default_and_bad_configuration_refused(tmp_path: Path) -> None:
    assert not ApiKeys.from_settings(Settings()).enabled
    with pytest.raises(ValueError, match="entry 2 is shorter") as short:
        ApiKeys.from_settings(Settings(api_keys=f"{INFER},tiny"))
    assert "tiny" not in str(short.value)
    with pytest.raises(ValueError, match="unknown scope 'admin'"):
        ApiKeys.from_settings(Settings(api_keys=f"{INFER}:admin"))
    bad = tmp_path / "keys"
    bad.write_text("not-a-hash read\n")
    with pytest.raises(ValueError, match=r"keys:1: expected a SHA-256"):
        ApiKeys.from_settings(Settings(api_keys_file=bad))
    keys = ApiKeys.from_settings(Settings(api_keys=f"{INFER}:infer,{INFER}:read"))
    assert keys.scopes_of(INFER) == {"infer", "read"}  # every entry is compared, and their scopes add up
    assert keys.scopes_of(READ) == frozenset()


def test_every_known_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each check compares the presented key's SHA-256 digest with every known digest by hmac.compare_digest, and
    stops at none: ``==`` returns at the first differing byte, and a stop at the match would tell by its time
    which entry matched."""
    hashes = tmp_path / "keys.sha256"
    hashes.write_text(f"{hashlib.sha256(FILED.encode()).hexdigest()} read\n")
    keys = ApiKeys.from_settings(Settings(api_keys=KEYS, api_keys_file=hashes))
    known = Counter(digest for digest, _ in keys.entries)
    assert sum(known.values()) == 4  # three keys from DGSERVE_API_KEYS, one hash from the file
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)  # what auth.py calls: hmac.compare_digest

    wrong = "a-wrong-key-0123456789abcdef"
    # The first entry, a middle one, the file's (last), one whose scope falls short, and an unknown key.
    cases: list[tuple[str, str, type[Exception] | None]] = [
        (INFER, "infer", None), (BOTH, "read", None), (FILED, "read", None), (READ, "infer", ForbiddenError),
        (wrong, "any", UnauthorizedError),
    ]  # fmt: skip
    for key, need, refused in cases:
        calls.clear()
        if refused is None:
            keys.check(key, need)
        else:
            with pytest.raises(refused):
                keys.check(key, need)
        presented = hashlib.sha256(key.encode()).digest()
        assert calls, f"{key}: no hmac.compare_digest call (a plain == leaks by its time)"
        # Each call sets the presented digest (never the key itself) against one known digest, whichever order.
        others = Counter(b if a == presented else a for a, b in calls if presented in (a, b))
        assert len(others) == len(known) and sum(others.values()) == len(calls), f"{key}: {len(calls)} calls"
        assert others == known, f"{key}: every known digest compared once, the ones after a match included"


@pytest.mark.timeout(300)
def test_a_real_server_logs_no_key(tmp_path: Path, image: Callable[..., bytes]) -> None:
    """Everything a real server writes (stdout and stderr: uvicorn's access log, our logs at debug level) while
    keys come both ways, and a wrong one: the access log shows each request, and no key is in it."""
    wrong = "a-wrong-key-0123456789abcdef"
    env = {"DGSERVE_API_KEYS": KEYS, "DGSERVE_ACCESS_LOG": "true", "DGSERVE_LOG_LEVEL": "debug",
           "DGSERVE_SHUTDOWN_GRACE_S": "0.5"}  # nothing arrives during the stop: no need to wait the 5 s
    jpeg = {"content": image(), "headers": {"content-type": "image/jpeg"}}
    classify = "/v1/models/shapes-dgnet/classify"
    with ServerProcess(tmp_path / "server", env) as server:
        answers = {
            ("GET", "/v1/inspections", httpx.get(server.base + "/v1/inspections", headers=bearer(READ)).status_code),
            ("GET", "/v1/inspections",
             httpx.get(server.base + "/v1/inspections", headers={"X-API-Key": INFER}).status_code),
            ("GET", "/v1/models", httpx.get(server.base + "/v1/models", headers=bearer(wrong)).status_code),
            # inference: the admission gate checks these keys before the app does
            ("POST", classify, httpx.post(server.base + classify, content=jpeg["content"],
                                          headers={**jpeg["headers"], "X-API-Key": INFER}).status_code),
            ("POST", classify, httpx.post(server.base + classify, content=jpeg["content"],
                                          headers={**jpeg["headers"], "X-API-Key": wrong}).status_code),
        }  # fmt: skip
    assert answers == {("GET", "/v1/inspections", 200), ("GET", "/v1/inspections", 403), ("GET", "/v1/models", 401),
                       ("POST", classify, 200), ("POST", classify, 401)}  # fmt: skip
    assert server.proc is not None and server.proc.returncode is not None, "stopped, its output complete"
    output = server.log.read_text(errors="replace")
    # The capture is the server's own output: the access log holds a line for each request above.
    for method, path, status in answers:
        assert re.search(rf'"{method} {re.escape(path)} HTTP/1\.1" {status}\b', output), (method, path, status)
    for key in (INFER, READ, BOTH, wrong):
        assert key not in output
        assert key[:12] not in output, "not even part of a key"
