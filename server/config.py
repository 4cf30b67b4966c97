"""Server settings, read once at start-up: CLI flag, else environment variable, else default.

Every setting has one row in OPTIONS (flag, environment variable, parser, help); `--help` shows
each one's default and variable. `Settings` is frozen and validated on construction, so the rest
of the server never re-reads the environment; what the engine takes goes inward as frozen
`EngineOptions`. A bad value is named by its flag and its variable, with the values it may
take. Nothing here imports torch: `--help` and a mistyped flag answer at once, before the
seconds the model code takes to import.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

# torch-free modules: the flags are checked before torch is imported
from model.engine.interface import (
    AUTO_WEIGHTS,
    DECODE_GRAPH_ROWS,
    ISA_CHOICES,
    KV_CACHE_MB,
    MAX_PREFILL_TOKENS,
    MAX_PROPOSAL_TOKENS,
    POOL_CONTEXTS,
    WEIGHT_CHOICES,
    EngineOptions,
    IsaError,
    check_isa_cap,
    describe_per_device,
)
from model.head.files import CONFIG_FILE

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CSA_OFF = ("off", "none")  # values of --csa that disable CSA
CSA_AUTO = "auto"  # the checkpoint shipped for the model, if there is one
CSA_SCOPES = ("grouped", "all")  # which requests the trained head (CSA + adapter) serves
SPECULATE_CHOICES = ("auto", "off")


class SettingsError(ValueError):
    """A setting has a value the server cannot use."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = None  # None: the embedded model
    csa: str = CSA_AUTO  # "auto", "off" or a checkpoint directory
    device: str = "auto"
    dtype: str = "auto"
    weights: str = AUTO_WEIGHTS  # linear layers: auto (per device), loaded, bf16, int4
    threads: int | None = None  # torch intra-op threads; None: torch's default
    csa_scope: str = "grouped"  # grouped: only requests that chose grouped QA; all: every one
    max_group_size: int = 8
    max_wait_ms: float = 20.0  # how long an open group waits for more members
    max_queue: int = 256  # questions waiting to run; beyond it requests get 429
    kv_cache_mb: float | None = None  # None: the engine's default for the device
    max_prefill_tokens: int | None = None  # prompt tokens per engine step; None: per device
    decode_graph_rows: int | None = None  # decode steps replayed from CUDA graphs; None: per device
    api_key: str | None = None  # one key, or a comma-separated list: one tenant per key
    max_request_bytes: int = 2 * 2**20  # larger bodies are refused (413) before they are read
    header_timeout_s: float = 10.0  # to send a request's headers, else the connection closes
    body_timeout_s: float = 30.0  # to send the body after the headers
    max_connections: int = 1024  # open connections and requests; beyond it: 503
    replica_name: str = field(default_factory=socket.gethostname)
    playground: bool = True  # the browser page at /playground (/ redirects to it)
    cache: str | None = None  # where built things are kept; None: ~/.cache/groupwise
    cpu_isa: str = "auto"  # the most the CPU kernels may use; auto: all this CPU runs
    speculate: str = "auto"  # auto: rows verify proposed tokens where they pay; off: never
    speculate_tokens: int = MAX_PROPOSAL_TOKENS  # the longest proposal a row verifies

    def __post_init__(self):
        _require(0 <= self.port <= 65535, "port", f"must be in 0..65535, got {self.port}")
        _require(self.device in DEVICES or self.device.startswith("cuda:"), "device",
                 f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        _require(self.dtype in DTYPES, "dtype",
                 f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _require(self.weights in WEIGHT_CHOICES, "weights",
                 f"must be one of {', '.join(WEIGHT_CHOICES)}, got {self.weights!r}")
        _require(self.threads is None or self.threads >= 1, "threads",
                 f"must be >= 1, got {self.threads}")
        for name in ("max_group_size", "max_queue", "max_request_bytes", "max_connections"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.max_prefill_tokens is None or self.max_prefill_tokens >= 1,
                 "max_prefill_tokens", f"must be >= 1, got {self.max_prefill_tokens}")
        _require(self.decode_graph_rows is None or self.decode_graph_rows >= 0,
                 "decode_graph_rows", f"must be >= 0, got {self.decode_graph_rows}")
        _require(self.max_wait_ms >= 0, "max_wait_ms", f"must be >= 0, got {self.max_wait_ms}")
        for name in ("header_timeout_s", "body_timeout_s"):
            _require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        _require(self.kv_cache_mb is None or self.kv_cache_mb > 0, "kv_cache_mb",
                 f"must be > 0, got {self.kv_cache_mb}")
        _require(bool(self.csa), "csa", "must be 'auto', 'off' or a checkpoint directory")
        _require(self.csa_scope in CSA_SCOPES, "csa_scope",
                 f"must be one of {', '.join(CSA_SCOPES)}, got {self.csa_scope!r}")
        _require(self.api_key is None or all(self.api_keys), "api_key",
                 "must not hold an empty key (check for stray commas)")
        _require(self.speculate in SPECULATE_CHOICES, "speculate",
                 f"must be one of {', '.join(SPECULATE_CHOICES)}, got {self.speculate!r}")
        _require(self.speculate_tokens >= 1, "speculate_tokens",
                 f"must be >= 1, got {self.speculate_tokens}")
        try:
            check_isa_cap(self.cpu_isa)
        except IsaError as exc:
            _require(False, "cpu_isa", str(exc))

    def check_files(self) -> None:
        """The files the settings name exist: checked before the model loads, so a mistyped
        path is refused at once rather than after the load."""
        if not self.is_csa_off and self.csa.lower() != CSA_AUTO:
            checkpoint = Path(self.csa).expanduser()
            _require((checkpoint / CONFIG_FILE).is_file(), "csa",
                     f"must be auto, off or a CSA checkpoint directory; {checkpoint} holds no "
                     f"CSA checkpoint (no {CONFIG_FILE})")
        if self.model and self.model.endswith(".gguf"):
            _require(Path(self.model).expanduser().is_file(), "model",
                     f"GGUF file not found: {self.model}")

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    @property
    def api_keys(self) -> tuple[str, ...]:
        """Each key is a tenant; empty: no authentication."""
        if self.api_key is None:
            return ()
        return tuple(key.strip() for key in self.api_key.split(","))

    @property
    def is_csa_off(self) -> bool:
        return self.csa.lower() in CSA_OFF

    @property
    def engine_options(self) -> EngineOptions:
        return EngineOptions(self.kv_cache_mb, self.max_prefill_tokens, self.decode_graph_rows,
                             speculate=self.speculate == "auto",
                             max_proposal_tokens=self.speculate_tokens)

    @classmethod
    def from_sources(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Flags in `argv` win over variables in `environ`, which win over the defaults."""
        environ = os.environ if environ is None else environ
        given = vars(build_parser().parse_args(argv))
        values: dict[str, Any] = {}
        for option in OPTIONS:
            raw = given.get(option.field)
            if raw is None:
                raw = environ.get(option.env)
            if raw is None:
                continue
            try:
                values[option.field] = option.parse(raw)
            except ValueError:
                raise SettingsError(f"{source_name(option.field)}: cannot read {raw!r} as "
                                    f"{option.kind}") from None
        return cls(**values)

    def describe(self) -> dict:
        """The settings as logged at start-up (the API key hidden)."""
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["api_key"] = "set" if self.api_key else None
        return shown


class Option(NamedTuple):
    field: str
    flag: str
    env: str
    parse: Callable[[str], object]
    kind: str  # what a value must be, for messages: "an integer", "auto, cpu or cuda"
    help: str
    unset: str = ""  # what the default means when it is not a value (None, or computed)

    @property
    def default(self) -> str:
        if self.unset:
            return self.unset
        value = Settings.__dataclass_fields__[self.field].default
        assert value is not MISSING and value is not None, f"{self.field}: say what unset means"
        return ("on" if value else "off") if isinstance(value, bool) else str(value)


def _optional_text(raw: str) -> str | None:
    return raw or None


def _on_off(raw: str) -> bool:
    if raw.lower() not in ("on", "off"):
        raise ValueError(raw)
    return raw.lower() == "on"


OPTIONS = (
    Option("host", "--host", "GROUPWISE_HOST", str, "a host", "address to bind"),
    Option("port", "--port", "GROUPWISE_PORT", int, "an integer", "port to bind"),
    Option("model", "--model", "GROUPWISE_MODEL", _optional_text, "a model",
           "embedded, tiny-random, a .gguf path, a HF id or a local directory",
           unset="embedded (SmolLM2-135M-Instruct)"),
    Option("csa", "--csa", "GROUPWISE_CSA", str, "auto, off or a checkpoint directory",
           "CSA checkpoint directory, off, or auto (the shipped checkpoint, if any)"),
    Option("device", "--device", "GROUPWISE_DEVICE", str, "a device", "auto, cpu or cuda"),
    Option("dtype", "--dtype", "GROUPWISE_DTYPE", str, "a dtype",
           "auto, float32, bfloat16 or float16"),
    Option("weights", "--weights", "GROUPWISE_WEIGHTS", str, "a format",
           "linear layers: auto (int4 from the GGUF's own Q4_1 blocks on a CPU, else as "
           "loaded), loaded (as loaded, in --dtype; fp32 is taken for it too), bf16 or int4 "
           "(CPU formats)"),
    Option("threads", "--threads", "GROUPWISE_THREADS", int, "an integer", "torch CPU threads",
           unset="torch's"),
    Option("csa_scope", "--csa-scope", "GROUPWISE_CSA_SCOPE", str, "a scope",
           "grouped: CSA and the trained head serve only grouped requests and chat requests "
           "with a group hint; all: every request"),
    Option("max_group_size", "--max-group-size", "GROUPWISE_MAX_GROUP_SIZE", int, "an integer",
           "most questions in one group"),
    Option("max_wait_ms", "--max-wait-ms", "GROUPWISE_MAX_WAIT_MS", float, "a number",
           "how long an open group waits for more members (ms)"),
    Option("max_queue", "--max-queue", "GROUPWISE_MAX_QUEUE", int, "an integer",
           "most questions waiting; beyond it requests get 429"),
    Option("kv_cache_mb", "--kv-cache-mb", "GROUPWISE_KV_CACHE_MB", float, "a number",
           "size of the KV cache pool in MiB, allocated at start-up",
           unset=f"{describe_per_device(KV_CACHE_MB)}, at most {POOL_CONTEXTS} full contexts"),
    Option("max_prefill_tokens", "--max-prefill-tokens", "GROUPWISE_MAX_PREFILL_TOKENS", int,
           "an integer", "most prompt tokens computed in one engine step: longer prompts are "
           "chunked so running requests keep decoding",
           unset=describe_per_device(MAX_PREFILL_TOKENS)),
    Option("decode_graph_rows", "--decode-graph-rows", "GROUPWISE_DECODE_GRAPH_ROWS", int,
           "an integer", "on CUDA, decode steps of up to this many rows replay CUDA graphs "
           "captured at start-up (0: off); a CPU decodes without them",
           unset=str(DECODE_GRAPH_ROWS["cuda"])),
    Option("api_key", "--api-key", "GROUPWISE_API_KEY", _optional_text, "a key",
           "if set, every /v1 route needs 'Authorization: Bearer KEY'; a comma-separated list "
           "gives one tenant per key (tenants never share groups or cached prefixes)",
           unset="none"),
    Option("max_request_bytes", "--max-request-bytes", "GROUPWISE_MAX_REQUEST_BYTES", int,
           "an integer", "largest request body in bytes; larger ones get 413 before they are "
           "read"),
    Option("header_timeout_s", "--header-timeout-s", "GROUPWISE_HEADER_TIMEOUT_S", float,
           "a number", "seconds a connection has to send a request's headers"),
    Option("body_timeout_s", "--body-timeout-s", "GROUPWISE_BODY_TIMEOUT_S", float,
           "a number", "seconds a request has to send its body"),
    Option("max_connections", "--max-connections", "GROUPWISE_MAX_CONNECTIONS", int,
           "an integer", "most open connections and requests; beyond it: 503"),
    Option("replica_name", "--replica-name", "GROUPWISE_REPLICA_NAME", str, "a name",
           "sent in the X-Groupwise-Replica header", unset="the host name"),
    Option("playground", "--playground", "GROUPWISE_PLAYGROUND", _on_off, "on or off",
           "the browser playground at /playground, / redirecting to it: on or off"),
    Option("cache", "--cache", "GROUPWISE_CACHE", _optional_text, "a directory",
           "where what is built once is kept: the converted embedded model, the CPU kernels",
           unset="~/.cache/groupwise"),
    Option("cpu_isa", "--cpu-isa", "GROUPWISE_CPU_ISA", str, "an instruction set",
           "the most the CPU kernels may use: " + ", ".join(ISA_CHOICES) + " (auto: all this "
           "CPU runs); a cap never raises"),
    Option("speculate", "--speculate", "GROUPWISE_SPECULATE", str, "auto or off",
           "prompt-lookup speculation: auto (a decoding row verifies tokens proposed from its "
           "prompt, its output, its group's answers and its tenant's latest ones, when the "
           "step-time model says they pay) or off"),
    Option("speculate_tokens", "--speculate-tokens", "GROUPWISE_SPECULATE_TOKENS", int,
           "an integer", "the most proposed tokens a row verifies in one step"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="groupwise: a grouped-question, OpenAI-compatible LLM server",
    )
    for option in OPTIONS:
        # default None: "not given", so the environment variable can fill it in
        parser.add_argument(option.flag, dest=option.field, default=None,
                            help=f"{option.help} (default: {option.default}; env {option.env})")
    return parser


def source_name(field_name: str) -> str:
    """How a user sets a field: '--max-queue (GROUPWISE_MAX_QUEUE)'."""
    option = next(option for option in OPTIONS if option.field == field_name)
    return f"{option.flag} ({option.env})"


def _require(condition: bool, field_name: str, problem: str) -> None:
    if not condition:
        raise SettingsError(f"{source_name(field_name)}: {problem}")
