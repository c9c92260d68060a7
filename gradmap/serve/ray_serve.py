"""``gradmap serve --engine ray``: the same ASGI app as a Ray Serve deployment (``pip install 'gradmap[serve-ray]'``).

Each replica builds the app itself (``__serve_build_asgi_app__``), so its lifespan loads the models
in the replica and runs its own dynamic batching; Ray Serve's HTTP proxy routes requests to the
replicas, restarts a replica that dies and drains them on shutdown.

    from gradmap.serve import ServeConfig
    from gradmap.serve.ray_serve import deployment
    from ray import serve
    serve.run(deployment(ServeConfig({"resnet18": "/models/resnet18.onnx"}), replicas=2), route_prefix="/")

``/metrics`` answers with the metrics of the replica that takes the request; Ray Serve exports its
own per-deployment metrics as well.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from gradmap.serve.config import ServeConfig

__all__ = ["RAY_SERVE_MISSING", "RayServeError", "deployment", "run_ray_serve"]

logger = logging.getLogger(__name__)

RAY_SERVE_MISSING = "gradmap serve --engine ray needs Ray Serve: pip install 'gradmap[serve-ray]'"
APP_NAME = "gradmap"


class RayServeError(RuntimeError):
    """Ray or the deployment could not be started."""


def _import_serve():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ImportError(f"{RAY_SERVE_MISSING} ({e})") from e
    return ray, serve


class GradmapReplica:
    """One replica: gradmap's ASGI app over the models of ``config``."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config

    def __serve_build_asgi_app__(self):
        from gradmap.serve.app import create_app

        return create_app(self.config)


def deployment(config: ServeConfig, *, replicas: int = 1, replica_cpus: float = 1.0) -> Any:
    """The bound Ray Serve application: ``replicas`` replicas of ``replica_cpus`` CPUs each (fractions
    allowed). In-flight requests per replica are capped at the app's queue limit; Ray Serve holds
    the rest in its own queue, and a replica drains for the request timeout on shutdown."""
    _, serve = _import_serve()
    limits = config.limits
    cls = serve.deployment(
        name="gradmap", num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=limits.max_queue, graceful_shutdown_timeout_s=limits.request_timeout + 5,
        health_check_period_s=10,
    )(serve.ingress()(GradmapReplica))
    return cls.bind(config)


def run_ray_serve(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8080, address: str | None = None,
                  replicas: int = 1, replica_cpus: float = 1.0, on_listening=None,
                  stop: threading.Event | None = None) -> None:
    """Start (or join) Ray, deploy, serve on ``host:port`` until SIGTERM/Ctrl-C (or ``stop``), then shut
    the deployment down (draining its replicas) and the Ray this started."""
    ray, serve = _import_serve()
    started = False
    if not ray.is_initialized():
        try:
            if address is None:
                ray.init(include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
            where = "a local Ray" if address is None else f"Ray at {address}"
            raise RayServeError(f"cannot start or reach {where}: {str(e).strip()}") from e
        started = True
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, lambda signum, frame: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            serve.start(http_options={"host": host, "port": port})
            serve.run(deployment(config, replicas=replicas, replica_cpus=replica_cpus), name=APP_NAME,
                      route_prefix="/", blocking=False)
        except Exception as e:  # Ray Serve's own errors: a port in use, a replica that cannot load the models
            raise RayServeError(f"Ray Serve could not deploy gradmap: {type(e).__name__}: "
                                f"{(str(e).strip().splitlines() or [''])[-1][:500]}") from e
        if on_listening is not None:
            on_listening(port)
        logger.info("gradmap on Ray Serve: %d replica(s) on http://%s:%d", replicas, host, port)
        while not stop.wait(0.5):
            pass
        logger.info("shutting the deployment down (its replicas drain)")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()
