"""Routes. Thin: parse, then hand over to server/chat.py or server/grouped.py. Every /v1 route
answers 503 `starting` until the model is loaded, and the completion routes refuse new work
while the server drains; /health and /metrics answer from the start. The API key was checked
before the body was read (server/gate.py), which also put the caller's tenant in
`request.state`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from server.chat import create_chat_completion
from server.dispatcher import Dispatcher
from server.errors import APIError
from server.grouped import create_grouped_completion
from server.intake import chat_prompt
from server.metrics import CONTENT_TYPE
from server.schemas import ChatCompletionRequest, GroupedCompletionRequest
from server.services import ServedModel, Services


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


STARTING = "the server is starting: the model is loading; retry shortly"


async def require_model(services: ServicesDep) -> ServedModel:
    if services.load_error is not None:
        raise APIError(503, "the model could not be loaded (the server's log says why)",
                       code="load_failed")
    if services.model is None:
        raise APIError(503, STARTING, code="starting")
    return services.model


async def require_serving(services: ServicesDep) -> Dispatcher:
    if services.is_draining:
        raise APIError(503, "the server is shutting down; retry on another replica",
                       code="draining")
    if services.dispatcher is None or not services.is_ready:
        raise APIError(503, STARTING, code="starting")
    return services.dispatcher


ModelDep = Annotated[ServedModel, Depends(require_model)]
DispatcherDep = Annotated[Dispatcher, Depends(require_serving)]

# the API key is checked before the body is read (server/gate.py)
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_model)])
plain = APIRouter()


@v1.get("/models")
async def list_models(model: ModelDep, services: ServicesDep) -> dict:
    return {"object": "list", "data": [_model_card(model, services)]}


@v1.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, model: ModelDep, services: ServicesDep) -> dict:
    model.check_name(model_id)
    return _model_card(model, services)


@v1.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, model: ModelDep,
                           dispatcher: DispatcherDep):
    return await create_chat_completion(body, request, model, dispatcher)


@v1.post("/chat/completions/render", dependencies=[Depends(require_serving)])
async def render_chat_prompt(body: ChatCompletionRequest, model: ModelDep) -> dict:
    """The prompt's token ids, nothing run (as vLLM's route of this name): what a cache-aware
    router matches against the prompts each replica has seen (docs/deployment.md)."""
    model.check_name(body.model)
    return {"token_ids": await chat_prompt(body, model)}


@v1.post("/grouped_completions")
async def grouped_completions(body: GroupedCompletionRequest, request: Request,
                              model: ModelDep, dispatcher: DispatcherDep, services: ServicesDep):
    return await create_grouped_completion(body, request, model, dispatcher,
                                           services.settings.max_group_size)


@plain.get("/health")
async def health(services: ServicesDep) -> JSONResponse:
    body = {"status": services.status, "model": services.model_name}
    return JSONResponse(body, status_code=200 if services.is_ready else 503)


@plain.get("/metrics")
async def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)


def _model_card(model: ServedModel, services: Services) -> dict:
    return {"id": model.name, "object": "model", "created": services.created,
            "owned_by": "groupwise", "max_model_len": model.limits.max_context}
