"""The Serve deployment and application: ``build_app`` is the config's ``import_path``.

Serve calls ``build_app`` where it builds the application (the controller, or ``serve run``'s
process), so this module imports neither torch nor the app: the replica's app is built in the
replica, by ``create_replica_app``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ray import serve

from dgserve.ray_serve.replica import ReplicaOptions, create_replica_app
from dgserve.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application
    from ray.serve.deployment import Deployment

APP_NAME = "dgserve"
DEPLOYMENT_NAME = "dgserve"

# Defaults in code; the config's `deployments:` entry overrides each one.
DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    # Dynamic batching needs several requests in the replica at once: Ray's default of 5
    # would cap every batch at 5 images.
    "max_ongoing_requests": 64,
    "ray_actor_options": {"num_cpus": 1, "num_gpus": 0},
    # In-flight batches of a big model on a CPU, then the store's close (3 attempts).
    "graceful_shutdown_timeout_s": 40,
    "health_check_period_s": 10,
    "health_check_timeout_s": 30,
}


def dgserve_deployment(options: ReplicaOptions | Mapping[str, Any] | None = None) -> Deployment:
    """The Serve deployment: an ingress whose replicas each run ``create_replica_app(options)``."""
    options = ReplicaOptions.model_validate(options or {})

    # A builder function, not an app: the app (torch, the models) is made in the replica.
    def build_asgi_app() -> FastAPI:
        return create_replica_app(options)

    class DGServe:
        """One dgserve replica. Requests go to the app; Ray runs its lifespan."""

    return serve.deployment(name=DEPLOYMENT_NAME, **copy.deepcopy(DEPLOYMENT_DEFAULTS))(
        serve.ingress(build_asgi_app)(DGServe)
    )


def build_app(args: Mapping[str, Any] | None = None) -> Application:
    """The config's ``import_path``: Serve calls it with the config's ``args``.

    Checks the arguments and the settings here, so a typo fails the deploy rather than every
    replica's start.
    """
    options = ReplicaOptions.model_validate(dict(args or {}))
    Settings(**options.settings)
    return dgserve_deployment(options).bind()
