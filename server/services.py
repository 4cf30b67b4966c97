"""The objects every route shares: settings, model, engine, scheduler, metrics. Built once per
app; the model and the CSA checkpoint are loaded before the server accepts connections, so a
bad model or a mismatched checkpoint stops start-up with a clear message."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from model.engine.grouped_engine import EngineInputError, GroupedEngine
from model.head.group_head import GroupHead
from model.head.shipped import shipped_checkpoint
from model.prompts import encode_chat, longest_token_chars
from model.weights.loading import LoadedModel, load_model, weights_signature
from server.config import CSA_AUTO, Settings
from server.errors import APIError
from server.metrics import ServerMetrics
from server.scheduler import Scheduler

log = logging.getLogger("groupwise.server")


@dataclass(eq=False)
class Services:
    settings: Settings
    loaded: LoadedModel
    engine: GroupedEngine
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    scheduler: Scheduler | None = None  # built in the app's lifespan, on its event loop
    is_draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    max_token_chars: int = 0  # the longest token, in characters (set on build)

    @property
    def model_name(self) -> str:
        return self.loaded.name

    @property
    def is_ready(self) -> bool:
        return self.scheduler is not None and self.scheduler.is_running and not self.is_draining

    @property
    def status(self) -> str:
        if self.is_draining:
            return "draining"
        return "ok" if self.is_ready else "starting"

    async def encode(self, messages: list[dict], param: str) -> list[int]:
        """The prompt's token ids, tokenized off the event loop. Text longer than any prompt
        that fits the context could be (every token at most `max_token_chars` characters) is
        refused first, without tokenizing it."""
        chars = sum(len(m["content"]) for m in messages)
        limit = self.engine.max_context * self.max_token_chars
        if chars > limit:
            raise EngineInputError(
                f"the prompt has {chars} characters; this model's maximum context length is "
                f"{self.engine.max_context} tokens, which hold at most {limit} characters",
                param)
        return await asyncio.to_thread(encode_chat, self.loaded.tokenizer, messages)

    def check_model(self, requested: str | None) -> None:
        """`model` omitted means the loaded one; any other name is unknown here (404)."""
        if requested and requested != self.model_name:
            raise APIError(404, f"the model {requested!r} does not exist; this server serves "
                           f"{self.model_name!r}", "model", "model_not_found")


def build_services(settings: Settings, loaded: LoadedModel | None = None) -> Services:
    if loaded is None:
        loaded = load_model(settings.model, settings.device, settings.dtype, settings.threads,
                            settings.weights)
    csa = load_csa(settings, loaded)
    log.info("model %s on %s, %s weights, CSA %s", loaded.name, loaded.device, loaded.weights,
             "on" if csa else "off")
    engine = GroupedEngine(loaded.model, loaded.tokenizer, csa, kv_cache_mb=settings.kv_cache_mb,
                           max_prefill_tokens=settings.max_prefill_tokens)
    log.info("KV cache: %d tokens (%.0f MiB)", engine.pool.capacity,
             engine.pool.kv.nbytes / 2**20)
    return Services(settings, loaded, engine,
                    max_token_chars=longest_token_chars(loaded.tokenizer))


def csa_path(settings: Settings, model_name: str) -> Path | None:
    """--csa: off -> None; auto -> the shipped checkpoint for this model (or None); else a path."""
    if settings.is_csa_off:
        return None
    if settings.csa.lower() == CSA_AUTO:
        return shipped_checkpoint(model_name)
    return Path(settings.csa).expanduser()


def load_csa(settings: Settings, loaded: LoadedModel) -> GroupHead | None:
    """Raises CheckpointMismatchError for a checkpoint trained on another base model and
    FileNotFoundError for a path that holds none."""
    path = csa_path(settings, loaded.name)
    if path is None:
        return None
    return GroupHead.load(
        path,
        base_model=loaded.name,
        base_signature=weights_signature(loaded.model),
        hidden_size=loaded.model.config.hidden_size,
    )
