"""Running the app: uvicorn worker processes under a small supervisor.

The supervisor binds the socket, starts ``processes`` workers (each loads the models and runs
uvicorn on the shared socket) and restarts a worker that dies. ``SIGTERM`` (or Ctrl-C) drains: the
supervisor closes its copy of the socket and passes the signal on; each worker stops accepting,
answers the requests it holds (up to ``drain_timeout`` seconds) and exits; then the supervisor exits.

A client that sends its headers too slowly (``read_timeout``) gets a 408 and its connection is
closed: uvicorn itself waits for headers as long as bytes keep trickling in.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from gradmap.serve.config import ServeConfig

__all__ = ["HeaderTimeoutProtocol", "ServeError", "serve"]

logger = logging.getLogger(__name__)

#: A worker that exits this soon after it started is failing at startup, not crashing: not restarted.
_STARTUP_FAILED = 3
_RESTART_DELAY = 1.0
_LOAD_FAILED = 3


class ServeError(RuntimeError):
    """The server could not start (socket in use, a model that does not load)."""


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's headers, from the connection's start
    or the previous response: slow-header clients get 408 instead of holding a connection forever."""

    header_timeout = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete and self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        idle = self.cycle is None or self.cycle.response_complete  # not a pipelined request started already
        if self._header_timer is None and idle and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
            self.transport.close()  # an idle keep-alive connection: nothing was asked
            return
        body = b'{"error":"the request headers did not arrive within %g s (--read-timeout)"}' % self.header_timeout
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def _protocol(timeout: float) -> type:
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": timeout})


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _worker(config: ServeConfig, sock: socket.socket, drain_timeout: float, log_level: str, ready: Any) -> None:
    """One worker process: load the models, serve until SIGTERM, drain."""
    import uvicorn

    from gradmap.serve.app import create_app

    from gradmap.runtime import GradmapModelError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    try:
        app = create_app(config, loaded=True)
    except (GradmapModelError, ValueError) as e:  # a model that does not load: said once, no traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(_LOAD_FAILED)
    state = app.state.gradmap
    started = state.lifespan

    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app_):
        async with started(app_):
            ready.set()
            yield

    app.router.lifespan_context = lifespan
    uv = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", http=_protocol(config.limits.read_timeout),
                        timeout_graceful_shutdown=drain_timeout, limit_concurrency=config.limits.max_connections,
                        timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024)
    uvicorn.Server(uv).run(sockets=[sock])


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8080, *, processes: int = 1,
          drain_timeout: float | None = None, log_level: str = "info", on_listening=None) -> int:
    """Serve ``config`` on ``host:port`` with ``processes`` workers until SIGTERM or Ctrl-C.

    Args:
        drain_timeout: seconds a worker takes to answer the requests it holds after SIGTERM (default:
            the request timeout plus 5 s).
        on_listening: called with the bound port once every worker is ready (``port=0`` picks one).

    Returns:
        0 after a drain; raises :class:`ServeError` when the server cannot start.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    drain = config.limits.request_timeout + 5.0 if drain_timeout is None else drain_timeout
    sock = _bind(host, port)
    port = sock.getsockname()[1]
    metrics_dir = None
    if processes > 1:  # prometheus_client's multiprocess files, on a tmpfs where there is one
        metrics_dir = tempfile.mkdtemp(prefix="gradmap-metrics-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    context = multiprocessing.get_context("spawn")
    stopping = False

    def start_worker():
        ready = context.Event()
        process = context.Process(target=_worker, args=(config, sock, drain, log_level, ready),
                                  name="gradmap-serve-worker", daemon=False)
        process.start()
        return process, ready, time.monotonic()

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    workers = []
    try:
        workers = [start_worker() for _ in range(processes)]
        # the first start: every worker must load the models, or the server does not start
        while not stopping and not all(r.is_set() for _, r, _ in workers):
            for process, ready, _ in workers:
                if not ready.is_set() and process.exitcode is not None:
                    raise ServeError("a worker could not load the models (its error is above)"
                                     if process.exitcode == _LOAD_FAILED else
                                     f"a worker exited with {process.exitcode} while loading the models")
            time.sleep(0.05)
        if not stopping:
            logger.info("gradmap serve: %d worker(s) on http://%s:%d", processes, host, port)
            if on_listening is not None:
                on_listening(port)
        while not stopping:
            time.sleep(0.2)
            for i, (process, ready, since) in enumerate(workers):
                if process.exitcode is None or stopping:
                    continue
                if metrics_dir is not None:
                    from prometheus_client import multiprocess

                    multiprocess.mark_process_dead(process.pid)
                if not ready.is_set() and time.monotonic() - since < _STARTUP_FAILED:
                    raise ServeError(f"a restarted worker exited with {process.exitcode} while loading the models")
                logger.warning("worker %d exited with %s; starting another", process.pid, process.exitcode)
                time.sleep(_RESTART_DELAY)
                workers[i] = start_worker()
        logger.info("draining: up to %g s for the requests in flight", drain)
        sock.close()  # no new connections reach this server from now on
        for process, _, _ in workers:
            if process.exitcode is None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + drain + 10
        for process, _, _ in workers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                logger.warning("worker %d did not drain in time; killing it", process.pid)
                process.kill()
                process.join()
        return 0
    finally:
        for process, _, _ in workers:
            if process.exitcode is None:
                process.kill()
                process.join()
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
