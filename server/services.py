"""The objects every route shares: settings and metrics from the start; once the model is
loaded, the `ServedModel` the handlers read and the engine the worker thread drives; once the
event loop runs, the dispatcher. `python -m server` opens its port first and loads the model in
the background (server/app.py), so probes see 503 "starting" rather than a refused connection;
a bad model or a mismatched CSA checkpoint still stops start-up with a clear message."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from model.engine.interface import (
    Engine,
    EngineLimits,
    open_engine,
    use_cache_dir,
    use_isa_cap,
)
from model.head.files import shipped_checkpoint
from server.config import CSA_AUTO, Settings
from server.dispatcher import Dispatcher
from server.errors import APIError
from server.metrics import ServerMetrics
from server.prompts import PromptEncoder

if TYPE_CHECKING:  # model.weights.loading imports transformers (seconds): only where it loads
    from model.weights.loading import LoadedModel

log = logging.getLogger("groupwise.server")


@dataclass(frozen=True)
class ServedModel:
    """What the handlers read of the loaded model. Frozen: the event loop never touches the
    engine's state, which its thread changes."""

    name: str  # the id clients use in the `model` field
    limits: EngineLimits
    prompts: PromptEncoder

    def check_name(self, requested: str | None) -> None:
        """`model` omitted means the loaded one; any other name is unknown here (404)."""
        if requested and requested != self.name:
            raise APIError(404, f"the model {requested!r} does not exist; this server serves "
                           f"{self.name!r}", "model", "model_not_found")


@dataclass(eq=False)
class Services:
    settings: Settings
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    model: ServedModel | None = None  # None until `load` has run
    engine: Engine | None = None  # driven by the worker thread only
    dispatcher: Dispatcher | None = None  # started on the app's event loop once loaded
    is_draining: bool = False
    load_error: Exception | None = None  # why the load failed: the server stops
    created: int = field(default_factory=lambda: int(time.time()))

    def load(self, loaded: LoadedModel | None = None) -> None:
        """Loads the model (unless given), the CSA checkpoint and the engine. Raises
        ModelLoadError, CheckpointMismatchError or FileNotFoundError for a model that cannot
        be loaded or a checkpoint that does not fit it."""
        settings = self.settings
        use_cache_dir(settings.cache)
        use_isa_cap(settings.cpu_isa)
        if loaded is None:
            log.info("loading the model (%s); until it is loaded /health answers 503",
                     settings.model or "the embedded one")
            from model.weights.loading import load_model

            loaded = load_model(settings.model, settings.device, settings.dtype,
                                settings.threads, settings.weights)
        checkpoint = csa_path(settings, loaded.name)
        engine = open_engine(loaded, checkpoint, settings.engine_options)
        log.info("model %s on %s, %s weights, %s, CSA %s", loaded.name, loaded.device,
                 loaded.weights, loaded.kernels, "on" if checkpoint else "off")
        self.model = ServedModel(loaded.name, engine.limits, PromptEncoder(loaded.tokenizer))
        self.engine = engine

    @property
    def model_name(self) -> str | None:
        return self.model.name if self.model is not None else None

    @property
    def is_ready(self) -> bool:
        return (self.dispatcher is not None and self.dispatcher.is_running
                and not self.is_draining)

    @property
    def status(self) -> str:
        if self.is_draining:
            return "draining"
        if self.load_error is not None:
            return "failed"
        return "ok" if self.is_ready else "starting"


def csa_path(settings: Settings, model_name: str) -> Path | None:
    """--csa: off -> None; auto -> the shipped checkpoint for this model (or None); else a path."""
    if settings.is_csa_off:
        return None
    if settings.csa.lower() == CSA_AUTO:
        return shipped_checkpoint(model_name)
    return Path(settings.csa).expanduser()
