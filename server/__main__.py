"""`python -m server [flags]`: check the settings, open the port, load the model, serve until
SIGTERM or Ctrl-C.

What can be refused without the model is refused at once, before torch is even imported: a bad
flag or value, a missing checkpoint or GGUF file, a port already in use. The port opens before
the model loads, so probes see 503 (`{"status": "starting"}`) during the load rather than a
refused connection; a load that fails stops the server with status 1.

The first SIGTERM/SIGINT drains: new requests get 503, queued and running ones finish, then the
process exits with status 0. A second signal ends the queued and running requests at once,
each with an error in OpenAI's shape, and exits; a third stops waiting for anything.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from typing import TYPE_CHECKING

import uvicorn

from server.config import Settings, SettingsError
from server.connections import uvicorn_config

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("groupwise.server")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class DrainingServer(uvicorn.Server):
    """uvicorn stops listening at the first signal; here the port stays open and answers 503
    until the in-flight requests are done (a proxy sees the 503s and retries elsewhere)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame) -> None:
        from server.app import begin_drain, end_in_flight

        # not recorded in _captured_signals: uvicorn would re-raise it after a clean shutdown
        if self.app.state.services.is_draining:
            # the second signal ends what is in flight, with an error its clients can read,
            # so the shutdown need not wait for it; a third stops waiting altogether
            self.force_exit = self.should_exit
            self.should_exit = True
            end_in_flight(self.app)
            return
        log.info("received %s: draining (again to exit now)", signal.Signals(sig).name)
        begin_drain(self.app)

    async def on_tick(self, counter: int) -> bool:
        from server.app import is_drained

        if await super().on_tick(counter):
            return True
        return is_drained(self.app) or self.app.state.services.load_error is not None


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound (not yet listening): a port in use is refused now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        settings = Settings.from_sources(argv)
        settings.check_files()
    except SettingsError as exc:
        print(f"groupwise: {exc}", file=sys.stderr)
        return 2
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        print(f"groupwise: cannot start: cannot bind {settings.host}:{settings.port} "
              f"(--port, GROUPWISE_PORT): {exc.strerror or exc}", file=sys.stderr)
        return 1
    log.info("settings: %s", settings.describe())
    # imported once the checks have passed: torch and the model code take seconds to import
    from server.app import create_app

    app = create_app(settings)
    config = uvicorn_config(app, settings.host, settings.port,
                            header_timeout_s=settings.header_timeout_s,
                            body_timeout_s=settings.body_timeout_s,
                            max_connections=settings.max_connections, log_level="info",
                            timeout_graceful_shutdown=30)
    with sock:
        DrainingServer(config, app).run(sockets=[sock])
    error = app.state.services.load_error
    if error is None:
        return 0
    from model.head.files import CheckpointMismatchError
    from model.weights.loading import ModelLoadError

    if not isinstance(error, ModelLoadError | CheckpointMismatchError | FileNotFoundError):
        raise error  # a bug, not a setting: its traceback
    print(f"groupwise: cannot start: {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
