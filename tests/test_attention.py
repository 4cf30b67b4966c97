"""The attention pieces on their own: the log-sum-exp attention (CPU kernel and the plain path
other devices take), and the cascade merge against one softmax over all keys."""

from __future__ import annotations

import torch

from model.attention import attention_with_lse, plain_attention_with_lse


def reference(q, k, v, mask=None, scale=0.125):
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def test_cpu_kernel_and_plain_path_agree_with_the_reference():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16)
    mask = torch.zeros(2, 1, 4, 9)
    mask[1, :, :, 6:] = float("-inf")
    expected_out, expected_lse = reference(q, k, v, mask)
    out, lse = attention_with_lse(q, k, v, mask, 0.125)
    assert torch.allclose(out, expected_out, atol=1e-5)
    assert torch.allclose(lse, expected_lse, atol=1e-5)
    plain_out, plain_lse = plain_attention_with_lse(q, k, v, mask, 0.125)  # CUDA's path
    assert torch.allclose(plain_out, expected_out, atol=1e-5)
    assert torch.allclose(plain_lse, expected_lse, atol=1e-5)


def test_merging_two_parts_by_log_sum_exp_is_one_softmax():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    whole, _ = reference(q, k, v)
    first, lse_first = attention_with_lse(q, k[:, :, :6], v[:, :, :6], None, 0.125)
    second, lse_second = attention_with_lse(q, k[:, :, 6:], v[:, :, 6:], None, 0.125)
    total = torch.logaddexp(lse_first, lse_second)
    merged = (torch.exp(lse_first - total)[..., None] * first
              + torch.exp(lse_second - total)[..., None] * second)
    assert torch.allclose(merged, whole, atol=1e-6)
