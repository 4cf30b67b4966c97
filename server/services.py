"""The objects every route shares: settings, metrics, and once the model is loaded, the model,
engine and scheduler. `python -m server` opens its port first and loads the model in the
background (server/app.py), so probes see 503 "starting" rather than a refused connection; a bad
model or a mismatched CSA checkpoint still stops start-up with a clear message."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from model.engine.grouped_engine import GroupedEngine
from model.engine.request import EngineInputError
from model.head.group_head import GroupHead
from model.head.shipped import shipped_checkpoint
from server.config import CSA_AUTO, Settings
from server.errors import APIError
from server.metrics import ServerMetrics
from server.prompts import encode_chat, longest_token_chars
from server.scheduler import Scheduler

if TYPE_CHECKING:  # model.weights.loading imports transformers (seconds): only where it loads
    from model.weights.loading import LoadedModel

log = logging.getLogger("groupwise.server")


@dataclass(eq=False)
class Services:
    settings: Settings
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    loaded: LoadedModel | None = None  # None until `load` has run
    engine: GroupedEngine | None = None
    scheduler: Scheduler | None = None  # started on the app's event loop once the engine is built
    is_draining: bool = False
    load_error: Exception | None = None  # why the load failed: the server stops
    created: int = field(default_factory=lambda: int(time.time()))
    max_token_chars: int = 0  # the longest token, in characters (set by `load`)

    def load(self, loaded: LoadedModel | None = None) -> None:
        """Loads the model (unless given), the CSA checkpoint and the engine. Raises
        ModelLoadError, CheckpointMismatchError or FileNotFoundError for a model that cannot
        be loaded or a checkpoint that does not fit it."""
        settings = self.settings
        if loaded is None:
            log.info("loading the model (%s); until it is loaded /health answers 503",
                     settings.model or "the embedded one")
            from model.weights.loading import load_model

            loaded = load_model(settings.model, settings.device, settings.dtype,
                                settings.threads, settings.weights)
        csa = load_csa(settings, loaded)
        log.info("model %s on %s, %s weights, CSA %s", loaded.name, loaded.device,
                 loaded.weights, "on" if csa else "off")
        engine = GroupedEngine(loaded.model, loaded.tokenizer, csa,
                               kv_cache_mb=settings.kv_cache_mb,
                               max_prefill_tokens=settings.max_prefill_tokens,
                               decode_graph_rows=settings.decode_graph_rows)
        log.info("KV cache: %d tokens (%.0f MiB)", engine.limits.kv_capacity,
                 engine.pool.kv.nbytes / 2**20)
        self.max_token_chars = longest_token_chars(loaded.tokenizer)
        self.loaded, self.engine = loaded, engine

    @property
    def is_loaded(self) -> bool:
        return self.engine is not None

    @property
    def model_name(self) -> str | None:
        return self.loaded.name if self.loaded is not None else None

    @property
    def is_ready(self) -> bool:
        return self.scheduler is not None and self.scheduler.is_running and not self.is_draining

    @property
    def status(self) -> str:
        if self.is_draining:
            return "draining"
        if self.load_error is not None:
            return "failed"
        return "ok" if self.is_ready else "starting"

    async def encode(self, messages: list[dict], param: str) -> list[int]:
        """The prompt's token ids, tokenized off the event loop. Text longer than any prompt
        that fits the context could be (every token at most `max_token_chars` characters) is
        refused first, without tokenizing it."""
        chars = sum(len(m["content"]) for m in messages)
        limit = self.engine.limits.max_context * self.max_token_chars
        if chars > limit:
            raise EngineInputError(
                f"the prompt has {chars} characters; this model's maximum context length is "
                f"{self.engine.limits.max_context} tokens, which hold at most {limit} characters",
                param)
        return await asyncio.to_thread(encode_chat, self.loaded.tokenizer, messages)

    def check_model(self, requested: str | None) -> None:
        """`model` omitted means the loaded one; any other name is unknown here (404)."""
        if requested and requested != self.model_name:
            raise APIError(404, f"the model {requested!r} does not exist; this server serves "
                           f"{self.model_name!r}", "model", "model_not_found")


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
    from model.weights.loading import weights_signature

    path = csa_path(settings, loaded.name)
    if path is None:
        return None
    return GroupHead.load(
        path,
        base_model=loaded.name,
        base_signature=weights_signature(loaded.model),
        hidden_size=loaded.model.config.hidden_size,
    )
