"""The FastAPI app: `create_app(settings, loaded_model=None)`.

Given a loaded model, the app builds its engine at once (a mismatched checkpoint raises here).
Without one, the lifespan loads the model in a background thread while the server already
answers: /health and /metrics at once, every /v1 route 503 `starting` until the model is in.
The dispatcher and its worker thread need the running event loop, so they start on it once the
engine is built, and stop at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from server.api import plain, v1
from server.config import Settings
from server.dispatcher import Dispatcher
from server.errors import install_error_handlers
from server.gate import RequestGate
from server.grouping import GroupingPolicy
from server.middleware import HeadAsGet, ServingMiddleware
from server.playground import playground
from server.services import Services
from server.worker import EngineWorker

if TYPE_CHECKING:
    from model.weights.loading import LoadedModel


def create_app(settings: Settings, loaded_model: LoadedModel | None = None) -> FastAPI:
    services = Services(settings)
    if loaded_model is not None:
        services.load(loaded_model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if services.model is not None:
            start_dispatcher(services)
        else:
            load_in_background(services, asyncio.get_running_loop())
        try:
            yield
        finally:
            if services.dispatcher is not None:
                await services.dispatcher.stop()

    app = FastAPI(title="groupwise", version="0.1.0", lifespan=lifespan)
    app.state.services = services
    app.include_router(v1)
    app.include_router(plain)
    if settings.playground:
        app.include_router(playground)
    install_error_handlers(app)
    # the gate runs inside the serving layer, so its 401 / 413 replies are counted too
    app.add_middleware(RequestGate, api_keys=settings.api_keys,
                       max_request_bytes=settings.max_request_bytes)
    app.add_middleware(ServingMiddleware, metrics=services.metrics,
                       replica_name=settings.replica_name)
    app.add_middleware(HeadAsGet)  # outermost: every layer inside sees the GET
    return app


def load_in_background(services: Services, loop: asyncio.AbstractEventLoop) -> None:
    """Loads the model in a daemon thread (a shutdown during the load need not wait for it),
    then starts the dispatcher on `loop`. A failure is kept in `services.load_error`, which
    stops the server and is reported there (server/__main__.py)."""

    def load() -> None:
        try:
            services.load()
        except Exception as exc:
            services.load_error = exc
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server stopped
            loop.call_soon_threadsafe(start_dispatcher, services)

    threading.Thread(target=load, name="model-load", daemon=True).start()


def start_dispatcher(services: Services) -> None:
    if services.is_draining:  # stopped while the model loaded: nothing left to serve
        return
    services.dispatcher = build_dispatcher(services)
    services.dispatcher.start()
    services.metrics.track_queue(services.dispatcher)


def build_dispatcher(services: Services) -> Dispatcher:
    settings = services.settings
    assert services.engine is not None, "the engine is built before the dispatcher"
    policy = GroupingPolicy(max_group_size=settings.max_group_size,
                            max_wait_s=settings.max_wait_s)
    worker = EngineWorker(services.engine, services.metrics, asyncio.get_running_loop())
    return Dispatcher(policy, worker, services.metrics, settings.max_queue,
                      trained_head_for_all=settings.csa_scope == "all")


def begin_drain(app: FastAPI) -> None:
    """New requests get 503 and /health turns 503; queued and running ones finish, open
    groups without waiting for more members. Safe to call from a signal handler or thread."""
    services: Services = app.state.services
    services.is_draining = True
    if services.dispatcher is not None:
        services.dispatcher.drain_soon()


def end_in_flight(app: FastAPI) -> None:
    """Every queued or running request ends at once with an error in OpenAI's shape (a
    second signal: exit now). Safe to call from a signal handler."""
    services: Services = app.state.services
    if services.dispatcher is not None:
        services.dispatcher.fail_all_soon()


def is_drained(app: FastAPI) -> bool:
    services: Services = app.state.services
    return services.is_draining and (
        services.dispatcher is None or services.dispatcher.num_in_flight == 0
    )
