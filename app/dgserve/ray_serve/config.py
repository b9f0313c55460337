"""The config file and the command line: Ray Serve's own config with overrides applied.

``render_config`` edits a Serve config (the example file, by default) and checks the result
against Ray's schema, so a bad override fails here rather than in the cluster. ``main`` is
``python -m dgserve.ray_serve``: ``config`` prints the result (for ``serve deploy`` or a
RayService's ``serveConfigV2``); ``run`` and ``deploy`` hand it to Ray's own ``serve`` command.

Durability needs no option here: it is the dgserve setting ``inspection_commit_timeout_s``
(``--env DGSERVE_INSPECTION_COMMIT_TIMEOUT_S=0`` or ``--set inspection_commit_timeout_s=0`` opts
out of waiting for the commit).
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dgserve.ray_serve.deployment import APP_NAME, DEPLOYMENT_NAME

# The example config, when dgserve runs from a checkout (app/dgserve/ray_serve/ -> the root).
DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "deploy" / "ray" / "dgserve-ray.yaml"


def render_config(
    base: Mapping[str, Any],
    *,
    app_name: str = APP_NAME,
    env: Mapping[str, str] | None = None,
    settings: Mapping[str, Any] | None = None,
    num_replicas: int | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    target_ongoing_requests: float | None = None,
    max_ongoing_requests: int | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    http_host: str | None = None,
    http_port: int | None = None,
) -> dict[str, Any]:
    """``base`` (a Serve config: ``applications:``...) with these overrides applied to the
    application ``app_name`` and its ``dgserve`` deployment; checked against Ray's schema.

    ``num_replicas`` gives a fixed count (and drops autoscaling); any of ``min_replicas``,
    ``max_replicas``, ``target_ongoing_requests`` sets autoscaling (and drops a fixed count).
    """
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    config = copy.deepcopy(dict(base))
    apps = config.setdefault("applications", [])
    app = next((a for a in apps if a.get("name") == app_name), None)
    if app is None:
        raise ValueError(f"the config has no application named {app_name!r}")
    if env:
        app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update({k: str(v) for k, v in env.items()})
    args = app.setdefault("args", {})
    if settings:
        args.setdefault("settings", {}).update(settings)
    deployments = app.setdefault("deployments", [])
    deployment = next((d for d in deployments if d.get("name") == DEPLOYMENT_NAME), None)
    if deployment is None:
        deployment = {"name": DEPLOYMENT_NAME}
        deployments.append(deployment)
    if num_replicas is not None:
        deployment["num_replicas"] = num_replicas
        deployment.pop("autoscaling_config", None)
    autoscaling = {"min_replicas": min_replicas, "max_replicas": max_replicas,
                   "target_ongoing_requests": target_ongoing_requests}  # fmt: skip
    autoscaling = {k: v for k, v in autoscaling.items() if v is not None}
    if autoscaling:
        if num_replicas is not None:
            raise ValueError("give either num_replicas or autoscaling (min/max replicas, target), not both")
        deployment.pop("num_replicas", None)
        current = deployment.get("autoscaling_config") or {}
        current.update(autoscaling)
        deployment["autoscaling_config"] = current
    if max_ongoing_requests is not None:
        deployment["max_ongoing_requests"] = max_ongoing_requests
    actor = deployment.setdefault("ray_actor_options", {})
    if num_cpus is not None:
        actor["num_cpus"] = num_cpus
    if num_gpus is not None:
        actor["num_gpus"] = num_gpus
    if not actor:
        deployment.pop("ray_actor_options")
    http = config.setdefault("http_options", {})
    if http_host is not None:
        http["host"] = http_host
    if http_port is not None:
        http["port"] = http_port
    ServeDeploySchema.model_validate(config)
    if deployment.get("autoscaling_config"):  # the schema takes any dict here
        AutoscalingConfig.model_validate(deployment["autoscaling_config"])
    return config


def _key_value(text: str) -> tuple[str, str]:
    """``--env``/``--set``: KEY=VALUE (the value may hold '=', as database URLs do)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dgserve.ray_serve",
        description="Deploy dgserve on Ray Serve: the example config with command-line overrides.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("config", help="print the Serve config (YAML), for serve deploy or KubeRay")
    run = sub.add_parser("run", help="serve run the config (a local cluster, or --address)")
    deploy = sub.add_parser("deploy", help="serve deploy the config to a running cluster's dashboard")
    for p in (render, run, deploy):
        p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a Serve config [%(default)s]")
        p.add_argument("--app", default=APP_NAME, help="the application's name in it [%(default)s]")
        p.add_argument("--env", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="an environment variable of every replica, e.g. DGSERVE_INSPECTION_URL=...")  # fmt: skip
        p.add_argument("--set", type=_key_value, action="append", default=[], metavar="SETTING=VALUE",
                       help="a dgserve setting by field name, e.g. models=shapes-dgnet (beats --env)")  # fmt: skip
        p.add_argument("--num-replicas", type=int, help="a fixed number of replicas (no autoscaling)")
        p.add_argument("--min-replicas", type=int, help="autoscaling: fewest replicas")
        p.add_argument("--max-replicas", type=int, help="autoscaling: most replicas")
        p.add_argument("--target-ongoing-requests", type=float, help="autoscaling: requests per replica")
        p.add_argument("--max-ongoing-requests", type=int, help="most requests in one replica at once")
        p.add_argument("--num-cpus", type=float, help="CPUs per replica (Ray resources)")
        p.add_argument("--num-gpus", type=float, help="GPUs per replica; 0.5 puts two replicas on a GPU")
        p.add_argument("--http-host", help="where Ray's HTTP proxy listens")
        p.add_argument("--http-port", type=int, help="the proxy's port")
    for p in (run, deploy):
        p.add_argument("--address", help="the cluster (run: Ray's address; deploy: the dashboard's URL)")
    run.add_argument("--non-blocking", action="store_true", help="return once submitted")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dgserve.ray_serve``: print the rendered config, or hand it to Ray's ``serve``."""
    import yaml

    args = _parser().parse_args(argv)
    base = yaml.safe_load(args.config.read_text())
    config = render_config(
        base,
        app_name=args.app,
        env=dict(args.env),
        settings=dict(args.set),
        num_replicas=args.num_replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        max_ongoing_requests=args.max_ongoing_requests,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        http_host=args.http_host,
        http_port=args.http_port,
    )
    text = yaml.safe_dump(config, sort_keys=False)
    if args.command == "config":
        sys.stdout.write(text)
        return 0
    # Ray's `serve` command, from this Python's environment first.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    serve_cli = shutil.which("serve", path=search)
    if serve_cli is None:
        raise SystemExit("the `serve` command of Ray Serve is missing: pip install 'dgserve[ray]'")
    with tempfile.NamedTemporaryFile("w", prefix="dgserve-ray-", suffix=".yaml") as rendered:
        rendered.write(text)
        rendered.flush()
        command = [serve_cli, args.command, rendered.name]
        if args.address:
            command += ["--address", args.address]
        if args.command == "run" and args.non_blocking:
            command.append("--non-blocking")
        child = subprocess.Popen(command)
        try:
            return child.wait()
        except KeyboardInterrupt:  # serve run got it too: let it shut the application down
            return child.wait()
