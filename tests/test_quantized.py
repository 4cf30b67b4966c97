"""Weight formats: int4 from a GGUF's Q4_1 blocks (kept packed in the cache dir), the default
format per CPU, and grouping that changes cost, not content, within each format and on each
kernel variant (the tiny model; the embedded GGUF in the slow tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import cache
from model.engine.grouped_engine import GroupedEngine, Member
from model.engine.sampling import SamplingParams
from model.weights.formats import OutputSlice, has_q4_1_linears, unpermute_rows
from model.weights.gguf_blocks import Q4_1Linear, Q8_0Linear
from model.weights.loading import (
    GgufSource,
    ModelLoadError,
    embedded_gguf_path,
    load_model,
    resolve_weights,
)
from server.prompts import encode_chat, question_messages
from tests.conftest import isa_capped
from tests.test_engine import CONTEXTS, QUESTIONS, reference_greedy


def ggml_dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    """The Q4_1 layout read as ggml's dequantize_row_q4_1 does, block by block."""
    rows = []
    for line in raw:
        values = []
        for block in line.reshape(-1, 20):
            d = float(block[0:2].view(np.float16)[0])
            m = float(block[2:4].view(np.float16)[0])
            low = [d * (b & 0x0F) + m for b in block[4:]]
            high = [d * (b >> 4) + m for b in block[4:]]
            values += low + high
        rows.append(values)
    return np.array(rows, dtype=np.float32)


def test_unpermuting_rows_undoes_llama_cpp_rotary_layout():
    rows = np.arange(2 * 8).reshape(8, 2)  # 2 heads of 4 rows
    # llama.cpp stores each head's rows as pairs (0, 2), (1, 3): interleaved halves
    permuted = rows.reshape(2, 2, 2, 2).swapaxes(1, 2).reshape(8, 2)
    assert (unpermute_rows(permuted, 2) == rows).all()


def engine_answers(loaded, groups: list[list[list[int]]], max_tokens: int) -> dict:
    engine = GroupedEngine(loaded.model, loaded.tokenizer)
    members = [[Member(p, SamplingParams(max_tokens=max_tokens), tag=tuple(p)) for p in g]
               for g in groups]
    out: dict = {}
    for event in engine.generate(members):
        if event.token_id is not None:
            out.setdefault(event.member.tag, []).append(event.token_id)
    return out


@pytest.mark.parametrize("weights", ["loaded", "bf16", "int4"])
def test_grouped_equals_alone_within_each_weight_format_and_kernel_variant(weights, capped_isa):
    loaded = load_model("tiny-random", device="cpu", weights=weights)
    prompts = [encode_chat(loaded.tokenizer, question_messages(CONTEXTS[i % 2], q))
               for i, q in enumerate(QUESTIONS)]
    grouped = engine_answers(loaded, [prompts[0::2], prompts[1::2]], max_tokens=8)
    for prompt in prompts:
        alone = engine_answers(loaded, [[prompt]], max_tokens=8)
        assert grouped[tuple(prompt)] == alone[tuple(prompt)]
        # and both are what full recomputation gives with the same weights
        expected = reference_greedy(loaded.model, prompt, 8, set())
        assert alone[tuple(prompt)] == expected[: len(alone[tuple(prompt)])]


@pytest.mark.slow
def test_int4_from_the_embedded_gguf_matches_its_dequantized_weights():
    """transformers dequantizes the GGUF to float32 on load; the int4 layers built from the same
    Q4_1 blocks hold the same weights, exactly; so does the Q8_0 LM head."""
    as_loaded = load_model(None, device="cpu", weights="loaded")
    int4 = load_model(None, device="cpu", weights="int4")
    assert int4.weights == "int4"
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        dense = as_loaded.model.get_decoder().layers[3].get_submodule(name).weight
        packed = int4.model.get_decoder().layers[3].get_submodule(name)
        if isinstance(packed, OutputSlice):  # q, k and v share one fused int4 projection
            weights = packed.fused.dequantized()[packed.start : packed.end]
        else:
            weights = packed.dequantized()
        assert isinstance(packed.fused if isinstance(packed, OutputSlice) else packed, Q4_1Linear)
        assert torch.allclose(weights, dense, rtol=0, atol=1e-6 * dense.abs().amax())
    head = int4.model.get_output_embeddings()  # the GGUF's Q8_0 LM head, tied to the embeddings
    assert isinstance(head, Q8_0Linear)
    dense = as_loaded.model.get_output_embeddings().weight
    assert torch.allclose(head.dequantized(), dense, rtol=0, atol=1e-6 * dense.abs().amax())
    assert torch.equal(int4.model.get_input_embeddings().weight, dense)
    assert embedded_gguf_path().is_file()


@pytest.mark.slow
def test_auto_weights_are_int4_only_for_a_q4_1_gguf_on_a_cpu_with_vector_kernels(tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    gguf = GgufSource(embedded_gguf_path(), tmp_path)
    assert resolve_weights("auto", cpu, torch.float32, gguf) == "int4"
    assert resolve_weights("auto", cpu, torch.float32, None) == "loaded"  # a HF model
    assert resolve_weights("auto", cuda, torch.bfloat16, gguf) == "loaded"
    assert resolve_weights("auto", cpu, torch.bfloat16, gguf) == "loaded"
    assert resolve_weights("fp32", cuda, torch.bfloat16, None) == "loaded"  # the alias
    assert resolve_weights("int4", cpu, torch.float32, None) == "int4"  # asked for explicitly
    with pytest.raises(ModelLoadError, match="auto, loaded, bf16, int4, fp32"):
        resolve_weights("int3", cpu, torch.float32, gguf)
    # the portable kernels are slower than float32 (docs/cpu.md): a CPU with no vector variant
    # keeps the weights as loaded unless int4 is asked for
    with isa_capped("scalar"):
        assert resolve_weights("auto", cpu, torch.float32, gguf) == "loaded"
        assert resolve_weights("int4", cpu, torch.float32, gguf) == "int4"


@pytest.mark.slow
def test_auto_keeps_the_weights_of_a_gguf_whose_linears_are_not_q4_1(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "f32.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert not has_q4_1_linears(path)
    assert has_q4_1_linears(embedded_gguf_path())
    gguf = GgufSource(path, tmp_path)
    assert resolve_weights("auto", torch.device("cpu"), torch.float32, gguf) == "loaded"


@pytest.mark.slow
def test_a_later_load_reads_the_packed_blocks_from_the_cache(tmp_path, monkeypatch):
    """The first int4 load of a GGUF packs its blocks once and keeps them beside the
    dequantized copy; a later load reads them, and neither reads the GGUF's tensors again."""
    monkeypatch.setattr(cache, "_directory", tmp_path)
    first = load_model(None, device="cpu")
    (packed,) = tmp_path.glob("models/*/int4-blocks-v*.safetensors")
    import gguf

    def no_reading(*args, **kwargs):
        raise AssertionError("a later load read the GGUF")

    monkeypatch.setattr(gguf, "GGUFReader", no_reading)
    later = load_model(None, device="cpu")
    assert later.weights == first.weights == "int4"
    for name in ("model.layers.5.mlp.down_proj.packed", "lm_head.packed"):
        assert torch.equal(later.model.get_buffer(name), first.model.get_buffer(name))
    assert packed.stat().st_size > 0


def test_stacked_linears_compute_what_the_separate_ones_do(device, dtype):
    """The GPU's as-loaded format: q / k / v (with Qwen2's biases) and gate / up each one
    matmul; transformers' forward and the engine give what the separate linears gave."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from model.weights.formats import use_stacked_linears
    from model.weights.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
        eos_token_id=tokenizer.eos_token_id)).eval().requires_grad_(False).to(device, dtype)
    for layer in qwen.model.layers:
        torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=1.0)
    prompt = encode_chat(tokenizer, question_messages(CONTEXTS[0], QUESTIONS[1]))
    ids = torch.tensor([prompt], device=device)
    before = qwen(ids).logits
    answer = reference_greedy(qwen, prompt, 6, set())
    use_stacked_linears(qwen)
    attention = qwen.model.layers[0].self_attn
    assert isinstance(attention.q_proj, OutputSlice)
    assert attention.q_proj.fused is attention.v_proj.fused
    assert torch.allclose(qwen(ids).logits.float(), before.float(), atol=1e-4, rtol=1e-3)
    member = Member(prompt, SamplingParams(max_tokens=6, ignore_eos=True))
    engine = GroupedEngine(qwen, tokenizer)
    assert [e.token_id for e in engine.generate([[member]])] == answer
