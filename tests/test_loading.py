"""Model loading: local directories, GGUF files, devices, dtypes and clear errors."""

from __future__ import annotations

import pytest
import torch

from model.head.group_head import signatures_match
from model.weights.loading import (
    ModelLoadError,
    embedded_gguf_path,
    load_model,
    resolve_dtype,
    weights_fingerprint,
    weights_signature,
)
from model.weights.tiny import build_tiny_model


def test_local_directory_loads_with_its_tokenizer(tmp_path):
    tiny = build_tiny_model()
    tiny.model.save_pretrained(tmp_path / "tiny")
    tiny.tokenizer.save_pretrained(tmp_path / "tiny")
    loaded = load_model(str(tmp_path / "tiny"), device="cpu")
    assert loaded.name == "tiny"
    assert loaded.max_context == tiny.model.config.max_position_embeddings
    assert weights_fingerprint(loaded.model) == weights_fingerprint(tiny.model)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_fingerprint_tells_models_apart():
    assert weights_fingerprint(build_tiny_model(seed=0).model) != weights_fingerprint(
        build_tiny_model(seed=1).model
    )


def test_signature_survives_the_dtype_and_tells_models_apart():
    """A group head trained on float32 weights is matched to the same model loaded in bf16 or
    fp16 (what --dtype auto picks on a GPU), never to another model."""
    signature = weights_signature(build_tiny_model(seed=0).model)
    for dtype in (torch.bfloat16, torch.float16):
        rounded = weights_signature(build_tiny_model(seed=0).model.to(dtype))
        assert rounded != signature and signatures_match(signature, rounded)
    assert not signatures_match(signature, weights_signature(build_tiny_model(seed=1).model))


def test_dtype_defaults_to_float32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert load_model("tiny-random", device="cpu", dtype="bfloat16").model.dtype is torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))


def test_missing_things_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(tmp_path))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            load_model("tiny-random", device="cuda")


def test_embedded_gguf_is_installed():
    path = embedded_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
