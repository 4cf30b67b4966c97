"""The FastAPI app: `create_app(settings, loaded_model=None)`.

The model, engine and metrics are built when the app is created (a load failure stops start-up
before the port opens); the scheduler and its worker thread need the running event loop, so the
lifespan starts them and, at shutdown, stops them.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

from model.weights.loading import LoadedModel
from server.api import plain, v1
from server.config import Settings
from server.errors import install_error_handlers
from server.gate import RequestGate
from server.middleware import ServingMiddleware
from server.playground import playground
from server.scheduler import GroupingPolicy, Scheduler
from server.services import Services, build_services
from server.worker import EngineWorker


def create_app(settings: Settings, loaded_model: LoadedModel | None = None) -> FastAPI:
    services = build_services(settings, loaded_model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        services.scheduler = build_scheduler(services)
        services.scheduler.start()
        services.metrics.track_queue(services.scheduler)
        try:
            yield
        finally:
            await services.scheduler.stop()

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
    return app


def build_scheduler(services: Services) -> Scheduler:
    settings = services.settings
    policy = GroupingPolicy(max_group_size=settings.max_group_size,
                            max_wait_s=settings.max_wait_s)
    worker = EngineWorker(services.engine, services.metrics, asyncio.get_running_loop())
    return Scheduler(policy, worker, services.metrics, settings.max_queue,
                     trained_head_for_all=settings.csa_scope == "all")


def begin_drain(app: FastAPI) -> None:
    """New requests get 503 and /health turns 503; queued and running ones finish, open
    groups without waiting for more members. Safe to call from a signal handler or thread."""
    services: Services = app.state.services
    services.is_draining = True
    if services.scheduler is not None:
        services.scheduler.drain_soon()


def end_in_flight(app: FastAPI) -> None:
    """Every queued or running request ends at once with an error in OpenAI's shape (a
    second signal: exit now). Safe to call from a signal handler."""
    services: Services = app.state.services
    if services.scheduler is not None:
        services.scheduler.fail_all_soon()


def is_drained(app: FastAPI) -> bool:
    services: Services = app.state.services
    return services.is_draining and (
        services.scheduler is None or services.scheduler.num_in_flight == 0
    )
