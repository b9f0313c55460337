"""dgserve against LitServe, a peer server, on the same store model with the same preprocessing.

LitServe 0.2.19 is installed on demand into a venv of its own (``build/litserve-venv`` by
default), never into dgserve's: the venv sees dgserve's environment (torch, dgserve itself)
through one ``.pth`` line, and pip installs what LitServe needs beside it there, so
dgserve's ``.venv`` is left as it is and LitServe never becomes a dependency of dgserve.

Both servers serve the same stored model (default: the bundled ``shapes-dgnet``), loaded
through dgserve's store loader, and turn each upload into the model's input with the
task's own ``prepare_upload`` (same decoding checks, same resize, the same ``DGSERVE_JPEG_DRAFT``
from the environment both inherit), and lay out its convolutions alike (``DGSERVE_MEMORY_FORMAT``,
likewise), so what differs is the
server: HTTP, batching, decoding placement, response encoding, and dgserve's extras
(connectivity in every answer, an inspection record per image). LitServe uses its own
dynamic batching (``--max-batch`` 32, ``--batch-timeout-ms`` 5, one worker) and answers
the top-k labels (add ``--litserve-connectivity`` to make it collect and return the
connectivity as well). dgserve gets the same batch limit and delay.

Load: ``--clients`` (32) concurrent keep-alive connections through ``benchmarks/loadgen.py``
(prebuilt requests), each posting one JPEG as multipart. Two uploads: ``small`` (a JPEG at
the model's input size) and ``photo`` (a 640x480 JPEG the server resizes). Rounds alternate
dgserve and LitServe; each round prints images/s and p99 of each; at the end the
dgserve/LitServe ratios of throughput and of p99 as min/median/max over the rounds.

Usage::

    python benchmarks/litserve_peer.py --rounds 5 --requests 2000
    python benchmarks/litserve_peer.py --dgserve-env DGSERVE_MODEL_WORKERS=process --rounds 5
    python benchmarks/litserve_peer.py --rounds 1 --requests 64     # a smoke run

``--dgserve-env KEY=VALUE`` (repeatable) sets dgserve's environment, so server modes can be
compared against the same peer. ``--install-only`` just prepares LitServe's venv.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"
LITSERVE = "litserve==0.2.19"
DEFAULT_VENV = ROOT / "build" / "litserve-venv"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=None, help="model store (default: the bundled one)")
    p.add_argument("--model", default="shapes-dgnet", help="a classification model in the store")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both servers)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=1000, help="measured requests per server, upload and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--uploads", default="small,photo", help="comma-separated: small (input-size JPEG), photo (640x480)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-timeout-ms", type=float, default=5.0)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--litserve-connectivity", action="store_true",
                   help="LitServe also collects and returns connectivity")
    p.add_argument("--dgserve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="dgserve setting (repeatable)")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="LitServe's own venv (created on demand)")
    p.add_argument("--install-only", action="store_true", help="prepare LitServe's venv and exit")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    # Internal: the LitServe side, run by the venv's interpreter.
    p.add_argument("--serve-litserve", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)
    return p.parse_args()


# --- LitServe's venv ------------------------------------------------------------------------


def ensure_litserve(venv: Path) -> Path:
    """The venv's python, with LitServe importable; created and installed on first use."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import litserve, dgserve, torch; print(litserve.__version__)"]
    wanted = LITSERVE.split("==")[1]
    if python.exists() and subprocess.run(check, capture_output=True, text=True).stdout.strip() == wanted:
        return python
    print(f"installing {LITSERVE} into {venv} (not into dgserve's environment)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    # addsitedir also runs dgserve's environment's own .pth files (the editable dgserve);
    # appended after the venv's site-packages, so what pip puts in the venv wins.
    ours = sysconfig.get_paths()["purelib"]
    Path(own, "dgserve_env.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", LITSERVE], check=True)
    version = subprocess.run(check, capture_output=True, text=True, check=True).stdout.strip()
    print(f"LitServe {version} ready in {venv}", flush=True)
    return python


try:  # only in LitServe's venv; dgserve's own environment never has it
    import litserve as ls
except ImportError:
    ls = None

if ls is not None:
    # At module level: LitServe pickles the API into its worker process (spawn).

    class StoreModelAPI(ls.LitAPI):  # type: ignore[misc]
        """A dgserve store model behind LitServe, prepared by the task exactly as dgserve prepares it."""

        def __init__(self, store: str, model: str, top_k: int, connectivity: bool, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.store, self.model, self.top_k, self.connectivity = store, model, top_k, connectivity

        def setup(self, device: str) -> None:
            import torch

            from dgserve.model_store import ModelStore
            from dgserve.models.connectivity import connectivity_sources
            from dgserve.serving.worker import set_memory_format
            from dgserve.settings import Settings
            from dgserve.tasks import get_task

            self.device = torch.device(device)
            self.loaded = ModelStore(Path(self.store)).load(self.model, device=self.device)
            self.manifest = self.loaded.manifest
            self.task = get_task(self.manifest.task)
            self.options = self.task.Options(top_k=self.top_k)
            # dgserve's defaults, read from this process's environment as dgserve reads its own: the
            # pixel limit, DGSERVE_JPEG_DRAFT (reduced JPEG decoding), so both decode alike, and
            # DGSERVE_MEMORY_FORMAT, so both run the same convolutions.
            self.limits = Settings()
            set_memory_format(self.loaded.model, self.limits.memory_format)
            self.sources = connectivity_sources(self.loaded.model) if self.connectivity else None

        # No annotations on decode_request's argument nor encode_response's result: LitServe
        # reads them as the endpoint's request and response types (unannotated: Starlette's own).
        def decode_request(self, request):  # type: ignore[no-untyped-def]
            from dgserve.tasks import InferenceItem

            data = request["images"].file.read()
            tensor, info, context = self.task.prepare_upload(data, None, self.manifest.preprocessing, self.limits)
            return InferenceItem(tensor, info, self.options, context)

        def batch(self, inputs: list[Any]) -> list[Any]:
            return inputs  # the task's predict stacks them, as in dgserve's worker

        def predict(self, items: list[Any]) -> list[dict[str, Any]]:
            import torch

            from dgserve.models.connectivity import collect_connectivity

            with torch.inference_mode():
                predictions = self.task.predict(self.loaded.model, items, self.manifest, self._to_device)
                if self.sources is None:
                    return [{"predictions": p} for p in predictions]
                records = collect_connectivity(self.loaded.model, len(items), self.sources)
            return [{"predictions": p, "connectivity": r.to_dict()} for p, r in zip(predictions, records, strict=True)]

        def _to_device(self, tensor: Any) -> Any:
            return tensor.to(self.device)

        def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return output

        def encode_response(self, output: dict[str, Any]):  # type: ignore[no-untyped-def]
            return output


def serve_litserve(args: argparse.Namespace) -> None:
    """Runs in LitServe's venv: the same store model and preprocessing behind LitServe."""
    import torch

    from dgserve.settings import default_model_store

    if ls is None:
        raise SystemExit("--serve-litserve runs in LitServe's venv (see --venv)")
    store = str((args.store or default_model_store()).resolve())
    api = StoreModelAPI(store, args.model, args.top_k, args.litserve_connectivity,
                        max_batch_size=args.max_batch, batch_timeout=args.batch_timeout_ms / 1000.0)
    server = ls.LitServer(api, accelerator=torch.device(args.device).type, devices=1, workers_per_device=1, timeout=600)
    server.run(host=HOST, port=args.serve_litserve, num_api_servers=1, log_level="warning",
               generate_client_file=False)


# --- the benchmark -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def jpeg(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    from dgserve.data.scenes import render_classification

    scene, _ = render_classification(seed, seed, min(width, height, 128))
    buf = io.BytesIO()
    scene.resize((width, height), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def start_dgserve(args: argparse.Namespace, store: Path, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DGSERVE_MODELS": args.model, "DGSERVE_DEVICES": args.device,
           "DGSERVE_MAX_BATCH_SIZE": str(args.max_batch), "DGSERVE_MAX_DELAY_MS": str(args.batch_timeout_ms),
           "DGSERVE_MAX_QUEUE_SIZE": str(max(256, 4 * args.clients)), "DGSERVE_ACCESS_LOG": "false",
           "DGSERVE_LOG_LEVEL": "warning", "DGSERVE_GRPC_PORT": "off"}
    for item in args.dgserve_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("DGSERVE_"):
            raise SystemExit(f"--dgserve-env {item!r}: expected DGSERVE_KEY=VALUE")
        env[key] = value
    command = [sys.executable, "-c", "from dgserve.cli import main; main()", "serve", "--host", HOST,
               "--port", str(port), "--store", str(store), "--data-dir", str(data_dir)]
    return subprocess.Popen(command, env=env, start_new_session=True)


def start_litserve(args: argparse.Namespace, python: Path, store: Path, port: int) -> subprocess.Popen[bytes]:
    command = [str(python), str(Path(__file__).resolve()), "--serve-litserve", str(port), "--store", str(store),
               "--model", args.model, "--device", args.device, "--max-batch", str(args.max_batch),
               "--batch-timeout-ms", str(args.batch_timeout_ms), "--top-k", str(args.top_k)]
    if args.litserve_connectivity:
        command.append("--litserve-connectivity")
    # Its own session: LitServe starts worker processes, and all of them must go at the end.
    return subprocess.Popen(command, start_new_session=True)


def wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float = 600) -> None:
    """Until ``url`` answers 200 (LitServe's ``/health``)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {server.returncode}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


def signal_tree(pid: int, sig: int) -> None:
    """``sig`` to the process group of ``pid`` and of each descendant: dgserve's server
    processes (DGSERVE_SERVER_PROCESSES) each have a group of their own."""
    from serve_throughput import tree_pids

    groups = set()
    for p in tree_pids(pid):
        try:
            groups.add(os.getpgid(p))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass


def stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def top1_agree(dg_port: int, ls_port: int, args: argparse.Namespace, body: bytes) -> tuple[str, str]:
    """Both servers' top label for one image: the same model must give the same answer."""
    import httpx

    files = {"images": ("0.jpg", body, "image/jpeg")}
    dg = httpx.post(f"http://{HOST}:{dg_port}/v1/models/{args.model}/classify?top_k=1", files=files, timeout=60)
    lit = httpx.post(f"http://{HOST}:{ls_port}/predict", files=files, timeout=60)
    dg.raise_for_status()
    lit.raise_for_status()
    return dg.json()["results"][0]["predictions"][0]["label"], lit.json()["predictions"][0]["label"]


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def measure(port: int, requests: list[Any], clients: int, server: int) -> dict[str, float]:
    from loadgen import run_load
    from serve_throughput import process_cpu_s

    cpu = process_cpu_s(server) or 0.0  # the server's whole process tree
    load = asyncio.run(run_load(HOST, port, requests, clients))
    cpu = (process_cpu_s(server) or 0.0) - cpu
    if load.errors:
        raise RuntimeError(f"port {port}: {len(load.errors)} requests failed, e.g. {load.errors[0]}")
    return {"images_per_s": load.images / load.seconds, "p50_ms": percentile(load.latencies_s, 50) * 1e3,
            "p99_ms": percentile(load.latencies_s, 99) * 1e3, "cpu_ms_per_image": cpu / load.images * 1e3}


def main() -> None:
    args = parse_args()
    if args.serve_litserve is not None:
        serve_litserve(args)
        return
    python = ensure_litserve(args.venv)
    if args.install_only:
        return

    sys.path.insert(0, str(HERE))
    import serve_throughput
    import torch
    from loadgen import build_post, multipart_body

    from dgserve.model_store import ModelStore
    from dgserve.settings import default_model_store

    store = (args.store or default_model_store()).resolve()
    manifest = ModelStore(store).resolve(args.model).manifest
    height, width = manifest.preprocessing.input_size
    sizes = {"small": (width, height), "photo": (640, 480)}
    uploads = [u.strip() for u in args.uploads.split(",") if u.strip()]
    images = {u: [jpeg(*sizes[u], seed) for seed in range(8)] for u in uploads}
    print(f"model {args.model!r} ({manifest.architecture}, {height}x{width}), device {args.device}, "
          f"{args.clients} clients, {args.requests} requests per server/upload/round, {args.rounds} rounds, "
          f"max batch {args.max_batch}, batch timeout {args.batch_timeout_ms} ms, {os.cpu_count()} CPU cores; "
          f"dgserve env: {' '.join(args.dgserve_env) or '(defaults)'}; LitServe connectivity: "
          f"{args.litserve_connectivity}; torch {torch.__version__}", flush=True)

    dg_port, ls_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="dgserve-litserve-") as tmp:
        dgserve = start_dgserve(args, store, Path(tmp) / "data", dg_port)
        litserve = start_litserve(args, python, store, ls_port)
        try:
            serve_throughput.wait_ready(f"http://{HOST}:{dg_port}", dgserve)  # every server process
            wait_ready(f"http://{HOST}:{ls_port}/health", litserve)
            for u in uploads:
                dg_label, ls_label = top1_agree(dg_port, ls_port, args, images[u][0])
                print(f"same model check ({u}): dgserve top-1 {dg_label!r}, LitServe top-1 {ls_label!r}")
                if dg_label != ls_label:
                    raise SystemExit("the two servers disagree on one image: not the same model or preprocessing")

            def requests_for(port: int, path: str, u: str) -> list[Any]:
                out = []
                for i in range(args.requests):
                    body, content_type = multipart_body([images[u][i % len(images[u])]])
                    out.append(build_post(HOST, port, path, body, content_type))
                return out

            classify = f"/v1/models/{args.model}/classify?top_k={args.top_k}"
            workloads = {
                u: {"dgserve": (dg_port, requests_for(dg_port, classify, u)),
                    "litserve": (ls_port, requests_for(ls_port, "/predict", u))}
                for u in uploads
            }
            processes = {"dgserve": dgserve, "litserve": litserve}

            def alone(name: str, port: int, requests: list[Any], clients: int) -> dict[str, float]:
                # The other server is stopped while this one is measured: idle, LitServe's
                # worker still polls its queue every millisecond (about a tenth of a core
                # here), and neither server may tax the other's figures.
                others = [p for n, p in processes.items() if n != name]
                for other in others:
                    signal_tree(other.pid, signal.SIGSTOP)
                try:
                    return measure(port, requests, clients, processes[name].pid)
                finally:
                    for other in others:
                        signal_tree(other.pid, signal.SIGCONT)

            for per_server in workloads.values():  # warm-up, not measured
                for name, (port, requests) in per_server.items():
                    alone(name, port, requests[: 2 * args.clients], args.clients)
            rounds: list[dict[str, dict[str, dict[str, float]]]] = []
            for r in range(args.rounds):
                result: dict[str, dict[str, dict[str, float]]] = {}
                for u, per_server in workloads.items():
                    # Alternate which server goes first, so neither always follows the other.
                    order = list(per_server) if r % 2 == 0 else list(reversed(per_server))
                    result[u] = {s: alone(s, *per_server[s], args.clients) for s in order}
                    dg, lit = result[u]["dgserve"], result[u]["litserve"]
                    print(f"round {r + 1} {u}: dgserve {dg['images_per_s']:.0f} img/s p99 {dg['p99_ms']:.0f} ms "
                          f"CPU {dg['cpu_ms_per_image']:.2f} ms/img | LitServe {lit['images_per_s']:.0f} img/s "
                          f"p99 {lit['p99_ms']:.0f} ms CPU {lit['cpu_ms_per_image']:.2f} ms/img | "
                          f"throughput x{dg['images_per_s'] / lit['images_per_s']:.2f}, "
                          f"p99 x{dg['p99_ms'] / lit['p99_ms']:.2f}", flush=True)
                rounds.append(result)
        finally:
            stop(dgserve)
            stop(litserve)

    summary: dict[str, dict[str, list[float]]] = {}
    for u in uploads:
        thr = sorted(rd[u]["dgserve"]["images_per_s"] / rd[u]["litserve"]["images_per_s"] for rd in rounds)
        p99 = sorted(rd[u]["dgserve"]["p99_ms"] / rd[u]["litserve"]["p99_ms"] for rd in rounds)
        summary[u] = {"throughput_ratio": thr, "p99_ratio": p99}
        print(f"{u}: dgserve/LitServe throughput median {statistics.median(thr):.2f}x (min {thr[0]:.2f}, "
              f"max {thr[-1]:.2f}); p99 median {statistics.median(p99):.2f}x (min {p99[0]:.2f}, max {p99[-1]:.2f}); "
              f"{len(thr)} rounds")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds,
                                         "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
