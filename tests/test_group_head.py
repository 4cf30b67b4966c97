"""The group head: CSA is the identity at init, the row mask, the formula against a per-group
reference; checkpoints with their metadata."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from model.head.files import CheckpointMismatchError
from model.head.group_head import GroupHead, GroupHeadConfig

D = 32


def trained_like(seed: int = 0, **overrides) -> GroupHead:
    """A head whose CSA output projection is not zero, so it really mixes rows."""
    torch.manual_seed(seed)
    head = GroupHead(GroupHeadConfig(hidden_size=D, num_heads=4, **overrides))
    torch.nn.init.normal_(head.o_proj.weight, std=0.3)
    return head.eval()


def test_untrained_module_is_the_identity():
    head = GroupHead(GroupHeadConfig(hidden_size=D, num_heads=4))
    h = torch.randn(6, D)
    out = head(h, torch.tensor([0, 0, 0, 1, 1, 2]), torch.ones(6, dtype=torch.bool))
    assert torch.equal(out, h)


def test_rows_of_other_groups_have_no_influence():
    head = trained_like()
    h = torch.randn(5, D)
    groups = torch.tensor([0, 0, 0, 1, 1])
    active = torch.ones(5, dtype=torch.bool)
    out = head(h, groups, active)
    changed = h.clone()
    changed[3:] = torch.randn(2, D)
    out_changed = head(changed, groups, active)
    assert torch.equal(out[:3], out_changed[:3])
    assert not torch.allclose(out[3:], out_changed[3:])
    assert not torch.allclose(out[:3], h[:3]), "rows with peers are mixed"


def test_a_row_never_attends_to_itself():
    head = trained_like()
    h = torch.randn(3, D)
    out = head(h, torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.bool))
    assert torch.equal(out, h)


def test_inactive_rows_drop_out():
    head = trained_like()
    h = torch.randn(4, D)
    groups = torch.zeros(4, dtype=torch.long)
    active = torch.tensor([True, True, False, True])
    out = head(h, groups, active)
    changed = h.clone()
    changed[2] = torch.randn(D)
    out_changed = head(changed, groups, active)
    assert torch.equal(out[[0, 1, 3]], out_changed[[0, 1, 3]])
    assert torch.equal(out[2], h[2])
    reduced = head(h[[0, 1, 3]], groups[:3], torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(out[[0, 1, 3]], reduced)


def reference(module: GroupHead, h: torch.Tensor) -> torch.Tensor:
    """The formula for one group, written out row by row."""
    heads, dh = module.num_heads, module.head_dim
    out = []
    for i in range(h.shape[0]):
        others = [j for j in range(h.shape[0]) if j != i]
        parts = []
        for head in range(heads):
            cut = slice(head * dh, (head + 1) * dh)
            q = module.q_proj(h[i])[cut]
            k = torch.stack([module.k_proj(h[j])[cut] for j in others])
            v = torch.stack([module.v_proj(h[j])[cut] for j in others])
            parts.append(torch.softmax(k @ q / math.sqrt(dh), dim=0) @ v)
        a = module.o_proj(torch.cat(parts))
        ln_h, ln_a = module.norm_h(h[i]), module.norm_a(a)
        gate_input = torch.cat([ln_h, ln_a, ln_h * ln_a])
        g = torch.sigmoid(module.gate_out(F.gelu(module.gate_in(gate_input))))
        out.append(h[i] + g * a)
    return torch.stack(out)


def test_matches_the_formula():
    head = trained_like(seed=1)
    with torch.no_grad():
        h = torch.randn(7, D)
        groups = torch.tensor([0, 0, 0, 1, 1, 1, 1])
        out = head(h, groups, torch.ones(7, dtype=torch.bool))
        torch.testing.assert_close(out[:3], reference(head, h[:3]))
        torch.testing.assert_close(out[3:], reference(head, h[3:]))


def test_gate_starts_nearly_closed():
    head = GroupHead(GroupHeadConfig(hidden_size=D, num_heads=4))
    assert torch.all(head.gate_out.bias == -3.0)
    assert torch.all(head.o_proj.weight == 0)


def test_checkpoint_round_trip(tmp_path):
    head = trained_like(adapter_rank=4, vocab_size=50, base_model="m", base_signature=(0.5, -1.0))
    head.meta.update(trained=["q_proj"], metrics={"f1": 0.5})
    torch.nn.init.normal_(head.adapter_up.weight)
    head.save(tmp_path)
    loaded = GroupHead.load(tmp_path, "m", (0.5, -1.0), hidden_size=D)
    h = torch.randn(4, D)
    groups, active = torch.tensor([0, 0, 1, 1]), torch.ones(4, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(loaded(h, groups, active), head(h, groups, active))
        torch.testing.assert_close(loaded.head_delta(h), head.head_delta(h))
    assert loaded.config == head.config
    assert loaded.meta == {"trained": ["q_proj"], "metrics": {"f1": 0.5}}


def test_config_is_frozen_and_metadata_sits_beside_it():
    head = GroupHead(GroupHeadConfig(hidden_size=D, num_heads=4), {"trained": ["q_proj"]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        head.config.use_csa = False
    assert head.meta == {"trained": ["q_proj"]}
    assert "meta" not in {f.name for f in dataclasses.fields(GroupHeadConfig)}


def test_half_precision_checkpoint_is_half_the_size_and_loads_as_fp32(tmp_path):
    head = trained_like(adapter_rank=4, vocab_size=50)
    head.save(tmp_path / "fp32")
    head.save(tmp_path / "fp16", torch.float16)
    sizes = [(tmp_path / name / "csa.safetensors").stat().st_size for name in ("fp32", "fp16")]
    assert sizes[1] < 0.55 * sizes[0]
    loaded = GroupHead.load(tmp_path / "fp16")
    for name, tensor in head.state_dict().items():
        assert loaded.state_dict()[name].dtype == torch.float32
        assert torch.equal(loaded.state_dict()[name], tensor.half().float())
    assert not torch.equal(loaded.q_proj.weight, head.q_proj.weight)  # it really was rounded


def test_checkpoint_for_another_model_is_refused(tmp_path):
    trained_like(base_model="model-a", base_signature=(0.5, -1.0)).save(tmp_path)
    with pytest.raises(CheckpointMismatchError, match="hidden size 32"):
        GroupHead.load(tmp_path, "model-a", (0.5, -1.0), hidden_size=64)
    with pytest.raises(CheckpointMismatchError, match="model-a"):
        GroupHead.load(tmp_path, "model-b", (0.5, 1.0), hidden_size=D)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CSA checkpoint"):
        GroupHead.load(tmp_path / "nowhere")
