"""`python -m server [flags]`: load the model, then serve until SIGTERM or Ctrl-C.

The first SIGTERM/SIGINT drains: new requests get 503, queued and running ones finish, then the
process exits with status 0. A second signal ends the queued and running requests at once,
each with an error in OpenAI's shape, and exits; a third stops waiting for anything.
"""

from __future__ import annotations

import logging
import signal
import sys

import uvicorn

from model.head.group_head import CheckpointMismatchError
from model.weights.loading import ModelLoadError
from server.app import begin_drain, create_app, end_in_flight, is_drained
from server.config import Settings, SettingsError
from server.connections import uvicorn_config

log = logging.getLogger("groupwise.server")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class DrainingServer(uvicorn.Server):
    """uvicorn stops listening at the first signal; here the port stays open and answers 503
    until the in-flight requests are done (a proxy sees the 503s and retries elsewhere)."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.app = config.app

    def handle_exit(self, sig: int, frame) -> None:
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
        if await super().on_tick(counter):
            return True
        return is_drained(self.app)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        settings = Settings.from_sources(argv)
    except SettingsError as exc:
        print(f"groupwise: {exc}", file=sys.stderr)
        return 2
    log.info("settings: %s", settings.describe())
    try:
        app = create_app(settings)
    except (ModelLoadError, CheckpointMismatchError, FileNotFoundError) as exc:
        print(f"groupwise: cannot start: {exc}", file=sys.stderr)
        return 1
    config = uvicorn_config(app, settings.host, settings.port,
                            header_timeout_s=settings.header_timeout_s,
                            body_timeout_s=settings.body_timeout_s,
                            max_connections=settings.max_connections, log_level="info",
                            timeout_graceful_shutdown=30)
    DrainingServer(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
