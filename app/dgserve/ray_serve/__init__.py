"""dgserve as a Ray Serve application: stateless replicas of the same app behind Ray's proxy.

Every replica runs the app that ``dgserve serve`` runs, ``dgserve.api.app.create_app(settings)``,
as a Serve ingress deployment; there is no second implementation of the API. Ray's HTTP proxy
spreads requests over the replicas, Ray places them (``num_cpus``, ``num_gpus``) and scales them
(``autoscaling_config``), and all of them share one PostgreSQL inspection store, so an id that
one replica handed out is readable through any other.

Deploy with Ray's own CLI and the example config (``pip install 'dgserve[ray]'``)::

    serve run deploy/ray/dgserve-ray.yaml                               # a local cluster
    serve deploy deploy/ray/dgserve-ray.yaml --address http://HEAD:8265 # a running cluster

or through this package, which applies command-line overrides to that file first::

    python -m dgserve.ray_serve run --config deploy/ray/dgserve-ray.yaml --min-replicas 2 --num-gpus 1
    python -m dgserve.ray_serve config ... > serve.yaml   # the result, for serve deploy or KubeRay

The modules:

* ``deployment``: ``build_app(args)``, the config's ``import_path`` (``dgserve.ray_serve:build_app``).
  Serve calls it where it builds the application, with the config's ``args``
  (``ReplicaOptions``); it checks them and binds the deployment. It imports neither torch nor
  the app.
* ``replica``: what runs in each replica. Ray calls the ingress builder (``serve.ingress`` with a
  function, Ray >= 2.47), ``create_replica_app``: this replica's ``Settings``, then
  ``create_app``, whose lifespan's startup returns only once the models are loaded and the
  inspection store is open.
* ``config`` (and ``__main__``): the example config with command-line overrides, and
  ``python -m dgserve.ray_serve``.

Durability is the app's own: an answer waits until its inspection records are committed
(``DGSERVE_INSPECTION_COMMIT_TIMEOUT_S``, 2 s), so an id a client holds survives its replica
being killed; set it to 0, in the config's ``runtime_env`` or ``args.settings``, to answer
without waiting (write-behind: a killed replica loses the records of its last ~50 ms).
"""

from __future__ import annotations

try:
    from ray import serve as _serve  # noqa: F401  (the extra's check, before any submodule)
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(f"dgserve.ray_serve needs Ray Serve: pip install 'dgserve[ray]' ({exc})") from exc

from dgserve.ray_serve.config import DEFAULT_CONFIG, main, render_config
from dgserve.ray_serve.deployment import APP_NAME, DEPLOYMENT_DEFAULTS, DEPLOYMENT_NAME, build_app, dgserve_deployment
from dgserve.ray_serve.replica import ReplicaOptions, create_replica_app, replica_settings

__all__ = [
    "APP_NAME",
    "DEFAULT_CONFIG",
    "DEPLOYMENT_DEFAULTS",
    "DEPLOYMENT_NAME",
    "ReplicaOptions",
    "build_app",
    "create_replica_app",
    "dgserve_deployment",
    "main",
    "render_config",
    "replica_settings",
]
