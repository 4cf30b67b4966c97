"""Random weights in the shape of a known model: what a GPU is measured on without downloading
the model (nothing is downloaded here). The tokenizer is any model's (the embedded one's by
default): the vocabulary is its, the rest of the architecture the named model's."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from model.weights.loading import LoadedModel, apply_weights

SHAPES = {
    # Qwen2.5-7B-Instruct (its vocabulary of 152,064 aside)
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=False),
    # the same architecture, small enough for a CPU (the GPU check's dry run)
    "qwen2-tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2,
                       max_position_embeddings=8192, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=False),
}


def build_random_model(shape: str, tokenizer: PreTrainedTokenizerBase, device: torch.device,
                       dtype: torch.dtype) -> LoadedModel:
    """A model of `shape` (SHAPES) with random weights, built on `device` in `dtype`, in the
    weight format the server would use there (the weights as loaded)."""
    config = Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         **SHAPES[shape])
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.eval().requires_grad_(False)
    apply_weights(model, "loaded", None)
    return LoadedModel(model, tokenizer, f"{shape}-random", "loaded")
