"""dgserve on a real local Ray cluster: two replicas of the bundled models behind Ray's HTTP
proxy, sharing one PostgreSQL; a replica killed mid-load; a graceful stop. Prints its figures.

Slow (a Ray cluster, replicas that import torch and load three models, a PostgreSQL), so it
runs only with ``DGSERVE_RAY_E2E=1``: ``make ray-test``. Not part of ``make test`` or CI.

1. start PostgreSQL (``tests/inspection/postgres_server.py``) and a local Ray cluster;
2. deploy the example config with ``python -m dgserve.ray_serve run`` (which runs Ray's
   ``serve run``): 2 replicas, ``DGSERVE_INSPECTION_URL`` pointing at that PostgreSQL;
   ``/readyz`` through the proxy turns 200 only once the models are loaded;
3. classify images through the proxy: both replicas answer (``prediction.replica`` of each
   record), and every returned id is readable through the proxy, whichever replica wrote it;
4. SIGKILL one replica's process under load and count the answers; every acknowledged id
   (a 200 with an id) is looked up in PostgreSQL directly. Done twice: first opted out of the
   commit wait, ``DGSERVE_INSPECTION_COMMIT_TIMEOUT_S=0`` (write-behind: ids go out before
   their records are committed, so a kill may lose some), then redeployed with the default
   (answers wait until their records are committed: a kill must lose none);
5. a graceful stop (``serve.delete``): each replica runs its lifespan's shutdown (its log says
   so) and every acknowledged record is in PostgreSQL;
6. tear everything down.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

pytestmark = [
    pytest.mark.skipif(os.environ.get("DGSERVE_RAY_E2E") != "1", reason="slow: set DGSERVE_RAY_E2E=1 (make ray-test)"),
    pytest.mark.timeout(1500),
]

# Ray's own modules use APIs that pydantic deprecates; warnings are errors here.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    ray = pytest.importorskip("ray", reason="Ray Serve is an extra: pip install 'dgserve[ray]'")
    from ray import serve

from dgserve.data.scenes import render_classification  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "inspection"))
from postgres_server import PostgresServer, find_bin_dir, free_port, unavailable  # noqa: E402

APP = "dgserve"
REPLICAS = 2
MODELS = "shapes-dgnet,shapes-glore,shapes-detector"
CLIENTS = 8
LOAD_S, KILL_AFTER_S = 15.0, 3.0
# Under write-behind a kill loses the records its replica acknowledged in the last ~50 ms, so
# a single kill may lose none: several kills give the loss a chance to show.
WRITE_BEHIND_KILLS = int(os.environ.get("DGSERVE_RAY_E2E_KILLS", "3"))
COMMIT_KILLS = 2
DEPLOY_TIMEOUT_S = 600.0


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def pngs(count: int = 32) -> list[bytes]:
    images = []
    for i in range(count):
        buf = io.BytesIO()
        render_classification(7, i, 64)[0].save(buf, "PNG")
        images.append(buf.getvalue())
    return images


@dataclass
class Outcome:
    sent: float
    done: float
    status: int | None  # None: no HTTP answer
    id: str | None = None
    error: str | None = None  # an exception's type, or an error answer's message
    committed: str | None = None  # a 200's X-Inspection-Committed header


@dataclass
class Cluster:
    gcs_address: str
    http_port: int
    temp_dir: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        unavailable("no PostgreSQL binaries are installed (apt-get install postgresql)")
    server = PostgresServer(bin_dir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Short: Ray's Unix sockets live under it (108 characters at most).
    temp_dir = Path(tempfile.mkdtemp(prefix="dgr-", dir="/tmp"))
    started = time.monotonic()
    ray.init(
        num_cpus=4,  # logical: 2 replicas of 1 CPU, and room for a replacement
        include_dashboard=True,  # ray.util.state (the replicas' PIDs) asks the dashboard
        dashboard_port=free_port(),
        _temp_dir=str(temp_dir),
        log_to_driver=False,
        namespace="dgserve-e2e",
    )
    say(f"\n[ray] local cluster up in {time.monotonic() - started:.1f} s, temp dir {temp_dir}")
    try:
        yield Cluster(ray.get_runtime_context().gcs_address, free_port(), temp_dir)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def deploy(cluster: Cluster, postgres: PostgresServer, *extra: str) -> float:
    """``python -m dgserve.ray_serve run``, as the README says (``extra``: more options);
    returns the seconds it took."""
    command = [
        sys.executable, "-m", "dgserve.ray_serve", "run",
        "--env", f"DGSERVE_INSPECTION_URL={postgres.url}",
        "--env", "DGSERVE_TORCH_THREADS=1", "--env", "DGSERVE_DECODE_THREADS=1",
        "--env", "DGSERVE_ACCESS_LOG=false",
        "--set", f"models={MODELS}",
        "--num-replicas", str(REPLICAS), "--num-cpus", "1",
        "--http-host", "127.0.0.1", "--http-port", str(cluster.http_port),
        "--address", cluster.gcs_address, "--non-blocking", *extra,
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return time.monotonic() - started


def app_status() -> tuple[str, dict[str, int]]:
    app = serve.status().applications.get(APP)
    if app is None:
        return "MISSING", {}
    deployment = app.deployments.get("dgserve")
    replica_states = deployment.replica_states if deployment else {}
    states = {str(getattr(k, "value", k)): v for k, v in replica_states.items()}
    return str(getattr(app.status, "value", app.status)), states


def wait_running(timeout: float = DEPLOY_TIMEOUT_S) -> float:
    started = time.monotonic()
    while True:
        status, replicas = app_status()
        if status == "RUNNING" and replicas.get("RUNNING") == REPLICAS and sum(replicas.values()) == REPLICAS:
            return time.monotonic() - started
        # UNHEALTHY is what a killed replica makes of the application until its replacement runs.
        assert status != "DEPLOY_FAILED", (status, serve.status().applications[APP].message)
        assert time.monotonic() - started < timeout, (status, replicas)
        time.sleep(0.5)


def replica_pids() -> dict[str, int]:
    """Ray's replica id -> the PID of that replica's process."""
    try:
        from ray.util.state import list_actors

        actors = [(a.name or "", a.pid, a.state) for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)]
    except Exception:  # no dashboard: the GCS's actor table
        from ray._private.state import actors as actor_table

        actors = [(a.get("Name") or "", a.get("Pid"), a.get("State")) for a in actor_table().values()]
    pids = {}
    for name, pid, state in actors:
        if name.startswith("SERVE_REPLICA::") and f"#{APP}#" in name and str(state) in ("ALIVE", "2"):
            pids[name.rsplit("#", 1)[-1]] = int(pid)
    return pids


async def classify(client: httpx.AsyncClient, image: bytes) -> Outcome:
    sent = time.monotonic()
    try:
        response = await client.post("/v1/models/shapes-dgnet/classify", content=image,
                                     headers={"content-type": "image/png"})  # fmt: skip
    except httpx.HTTPError as exc:
        return Outcome(sent, time.monotonic(), None, error=type(exc).__name__)
    done = time.monotonic()
    if response.status_code == 200:
        return Outcome(sent, done, 200, id=response.json()["results"][0]["id"],
                       committed=response.headers.get("x-inspection-committed"))  # fmt: skip
    try:
        message = response.json()["error"]["message"][:80]
    except Exception:
        message = response.text[:80]
    return Outcome(sent, done, response.status_code, error=message)


async def burst(base_url: str, images: list[bytes], count: int) -> list[Outcome]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        gate = asyncio.Semaphore(CLIENTS)

        async def one(i: int) -> Outcome:
            async with gate:
                return await classify(client, images[i % len(images)])

        return list(await asyncio.gather(*(one(i) for i in range(count))))


async def under_load(base_url: str, images: list[bytes], kill: Any, run_s: float, after_s: float) -> list[Outcome]:
    """``CLIENTS`` clients post back to back; ``kill()`` after ``after_s``; stop after ``run_s``."""
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:

        async def client_loop(k: int) -> None:
            i = k
            while not stop.is_set():
                outcomes.append(await classify(client, images[i % len(images)]))
                i += CLIENTS

        tasks = [asyncio.create_task(client_loop(k)) for k in range(CLIENTS)]
        await asyncio.sleep(after_s)
        await asyncio.to_thread(kill)
        await asyncio.sleep(run_s - after_s)
        stop.set()
        await asyncio.gather(*tasks)
    return outcomes


def stored(postgres: PostgresServer, ids: list[str]) -> dict[str, str]:
    """id -> the replica named in its record, for those of ``ids`` that are in PostgreSQL."""
    with psycopg.connect(postgres.url, connect_timeout=10) as conn:
        rows = conn.execute(
            "SELECT id, prediction::jsonb->>'replica' FROM inspections WHERE id = ANY(%s)", (ids,)
        ).fetchall()
    return {row[0]: row[1] for row in rows}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def describe(outcomes: list[Outcome]) -> str:
    counts = Counter((o.status, o.error if o.status != 200 else None) for o in outcomes)
    parts = [f"{n} x {status or 'no answer'}{'' if error is None else f' ({error})'}"
             for (status, error), n in counts.most_common()]  # fmt: skip
    return ", ".join(parts) if parts else "none"


def kill_round(label: str, cluster: Cluster, postgres: PostgresServer, images: list[bytes]) -> dict[str, int]:
    """One replica SIGKILLed under load: what the clients got, and what PostgreSQL has."""
    pids = replica_pids()
    assert len(pids) == REPLICAS, pids
    victim_tag, victim_pid = sorted(pids.items())[0]
    killed_at: list[float] = []

    def kill() -> None:
        os.kill(victim_pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    started = time.monotonic()
    outcomes = asyncio.run(under_load(cluster.base_url, images, kill, run_s=LOAD_S, after_s=KILL_AFTER_S))
    t_kill = killed_at[0]
    time.sleep(1.0)  # the surviving replica's write-behind queue: 50 ms
    acknowledged = [o.id for o in outcomes if o.status == 200 and o.id]
    found = stored(postgres, acknowledged)
    missing = [o for o in outcomes if o.status == 200 and o.id and o.id not in found]
    before = [o for o in outcomes if o.done < t_kill]
    around = [o for o in outcomes if o.sent <= t_kill <= o.done]
    after = [o for o in outcomes if o.sent > t_kill]
    per_replica = Counter(("killed " if victim_tag in r else "") + r for r in found.values())
    say(f"\n[{label}] {CLIENTS} clients for {LOAD_S:.0f} s through the proxy; SIGKILL of replica {victim_tag} "
        f"(pid {victim_pid}) at +{t_kill - started:.1f} s")  # fmt: skip
    say(f"  answers finished before the kill:  {len(before):4d}: {describe(before)}")
    say(f"  answers in flight at the kill:     {len(around):4d}: {describe(around)}")
    say(f"  requests sent after the kill:      {len(after):4d}: {describe(after)}")
    failed_after = [o for o in after if o.status != 200]
    if failed_after:
        say(f"  failures after the kill: from +{min(o.sent for o in failed_after) - t_kill:.2f} s "
            f"to +{max(o.done for o in failed_after) - t_kill:.2f} s after it")  # fmt: skip
    latencies = [o.done - o.sent for o in outcomes if o.status == 200]
    say(f"  latency of 200s: p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms")  # fmt: skip
    say(f"  acknowledged (200 with an id): {len(acknowledged)}; found in PostgreSQL: {len(found)}; "
        f"missing: {len(missing)}")  # fmt: skip
    say(f"  records in PostgreSQL per replica: {dict(per_replica)}")
    say(f"  X-Inspection-Committed of the 200s: {dict(Counter(o.committed for o in outcomes if o.status == 200))}")
    if missing:
        lags = sorted((t_kill - o.done) * 1000 for o in missing)
        say(f"  missing ids were answered {lags[0]:.0f} to {lags[-1]:.0f} ms before the kill; "
            f"first: {missing[0].id}")  # fmt: skip
    recovered = wait_running()
    say(f"  the application RUNNING again with {REPLICAS} replicas {time.monotonic() - t_kill:.1f} s after the "
        f"kill ({recovered:.1f} s after the load stopped)")  # fmt: skip
    return {
        "acknowledged": len(acknowledged), "missing": len(missing), "in_flight": len(around),
        "in_flight_failed": sum(o.status != 200 for o in around), "failed": sum(o.status != 200 for o in outcomes),
    }  # fmt: skip


def kill_phase(
    label: str, rounds: int, cluster: Cluster, postgres: PostgresServer, images: list[bytes]
) -> Counter[str]:
    totals: Counter[str] = Counter()
    for i in range(rounds):
        totals.update(kill_round(f"{label}, kill {i + 1}/{rounds}", cluster, postgres, images))
    say(f"[{label}] over {rounds} kills: {totals['acknowledged']} acknowledged, {totals['missing']} missing "
        f"from PostgreSQL; {totals['failed']} requests failed, {totals['in_flight_failed']} of them in flight "
        f"at a kill")  # fmt: skip
    return totals


def test_two_replicas_share_postgres_survive_a_kill_and_stop_gracefully(
    cluster: Cluster, postgres: PostgresServer
) -> None:
    images = pngs()

    # --- deploy; /readyz through the proxy -------------------------------------------------
    started = time.monotonic()
    submit_s = deploy(cluster, postgres, "--env", "DGSERVE_INSPECTION_COMMIT_TIMEOUT_S=0")
    probes: Counter[str] = Counter()
    with httpx.Client(base_url=cluster.base_url, timeout=5) as client:
        while True:
            try:
                response = client.get("/readyz")
            except httpx.HTTPError as exc:
                probes[type(exc).__name__] += 1
            else:
                if response.status_code == 200:
                    ready = response.json()
                    break
                try:
                    code = response.json()["error"]["code"]  # dgserve's own error body
                except Exception:
                    code = "proxy"
                probes[f"{response.status_code} {code}"] += 1
            assert time.monotonic() - started < DEPLOY_TIMEOUT_S, probes
            time.sleep(0.25)
    first_ready_s = time.monotonic() - started
    running_s = wait_running()
    say(f"[deploy] `python -m dgserve.ray_serve run` returned in {submit_s:.1f} s; first /readyz 200 through the "
        f"proxy after {first_ready_s:.1f} s; both replicas RUNNING {running_s:.1f} s later")  # fmt: skip
    say(f"  /readyz answers before that: {dict(probes) or 'none'}; the 200 lists {ready['models']}")
    assert ready["models"] == ["shapes-detector:1", "shapes-dgnet:1", "shapes-glore:1"]
    # dgserve's own 503 not_ready never reaches a client: Ray routes only to started replicas.
    assert not any("not_ready" in key for key in probes), probes

    # --- both replicas serve; every id is readable through the proxy ----------------------
    count = 64
    started = time.monotonic()
    outcomes = asyncio.run(burst(cluster.base_url, images, count))
    elapsed = time.monotonic() - started
    assert [o.status for o in outcomes] == [200] * count, describe(outcomes)
    ids = [o.id for o in outcomes if o.id]
    with httpx.Client(base_url=cluster.base_url, timeout=30) as client:
        records = [client.get(f"/v1/inspections/{i}") for i in ids]
    assert [r.status_code for r in records] == [200] * count
    per_replica = Counter(r.json()["prediction"]["replica"] for r in records)
    latencies = [o.done - o.sent for o in outcomes]
    say(f"[serve] {count} images, {CLIENTS} clients: {count / elapsed:.1f} images/s, p50 "
        f"{percentile(latencies, 0.5) * 1000:.0f} ms, p99 {percentile(latencies, 0.99) * 1000:.0f} ms")  # fmt: skip
    say(f"  requests per replica (prediction.replica): {dict(per_replica)}")
    say(f"  every returned id read back through the proxy: {sum(r.status_code == 200 for r in records)}/{count}")
    assert len(per_replica) == REPLICAS
    assert set(stored(postgres, ids)) == set(ids)

    # --- SIGKILL a replica under load -------------------------------------------------------
    write_behind = kill_phase("write-behind (DGSERVE_INSPECTION_COMMIT_TIMEOUT_S=0, opted out)",
                              WRITE_BEHIND_KILLS, cluster, postgres, images)  # fmt: skip
    started = time.monotonic()
    # The same command without the opt-out: the default, the replicas' own commit wait.
    deploy(cluster, postgres)
    redeploy_s = wait_running()
    time.sleep(2.0)  # the old replicas' graceful stop
    say(f"\n[redeploy] with the default commit wait: both new replicas RUNNING after "
        f"{time.monotonic() - started:.1f} s ({redeploy_s:.1f} s of waiting)")  # fmt: skip
    committed = kill_phase("the default (committed before answering)", COMMIT_KILLS, cluster, postgres, images)
    assert committed["missing"] == 0, "an acknowledged id is missing although answers wait for the commit"
    for phase in (write_behind, committed):
        assert phase["acknowledged"] > 0

    # --- a graceful stop ---------------------------------------------------------------------
    tags = sorted(replica_pids())
    outcomes = asyncio.run(burst(cluster.base_url, images, 32))
    acknowledged = [o.id for o in outcomes if o.status == 200 and o.id]
    started = time.monotonic()
    serve.delete(APP)
    stop_s = time.monotonic() - started
    found = stored(postgres, acknowledged)
    logs = cluster.temp_dir / "session_latest" / "logs" / "serve"
    shut_down = [
        tag for tag in tags
        for path in logs.glob(f"replica_*{tag}*.log")
        if "lifespan shutdown done" in path.read_text(errors="replace")
    ]  # fmt: skip
    say(f"\n[stop] serve.delete after {len(acknowledged)} acknowledged answers took {stop_s:.1f} s; "
        f"found in PostgreSQL: {len(found)}/{len(acknowledged)}; replicas whose log shows the lifespan "
        f"shutdown: {len(set(shut_down))}/{len(tags)}")  # fmt: skip
    assert len(found) == len(acknowledged) == 32
    assert sorted(set(shut_down)) == tags
