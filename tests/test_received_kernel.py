"""The received-attention kernel (DESIGN §4.4): the torch reference against a plain softmax of the
whole map, and the Triton kernels (run on CPU by the interpreter) against the reference."""

from __future__ import annotations

import os
import sys

if "triton" not in sys.modules:  # the interpreter must be chosen before Triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402

from vlmprune.kernels.received import received_attention, received_attention_ref  # noqa: E402

INTERPRETED = type(tl.sum).__name__ == "InterpretedFunction"


def full_map(q, k, heads, scale):
    """The whole [I, H, T, T] softmax, averaged over heads and queries."""
    qh = q.unflatten(-1, (heads, -1)).transpose(1, 2).double()
    kh = k.unflatten(-1, (heads, -1)).transpose(1, 2).double()
    return torch.softmax(qh @ kh.transpose(2, 3) * scale, -1).mean(dim=(1, 2)).float()


@pytest.mark.parametrize("t,chunk", [(7, 1024), (50, 16), (33, 8)])
def test_reference_equals_the_full_softmax(t, chunk):
    g = torch.Generator().manual_seed(t)
    q, k = torch.randn(2, t, 12, generator=g), torch.randn(2, t, 12, generator=g)
    got = received_attention_ref(q, k, 3, 0.4, chunk=chunk)
    torch.testing.assert_close(got, full_map(q, k, 3, 0.4), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(1), torch.ones(2), atol=1e-5, rtol=0)  # each query row sums to 1


@pytest.mark.skipif(not INTERPRETED, reason="run alone: TRITON_INTERPRET=1 pytest tests/test_received_kernel.py")
@pytest.mark.parametrize("t,heads,d", [(5, 2, 4), (40, 3, 20), (70, 2, 16)])
def test_triton_matches_reference(t, heads, d, monkeypatch):
    from vlmprune.kernels import received_triton

    assert received_triton.can_launch(torch.zeros(1))
    g = torch.Generator().manual_seed(t * heads)
    q, k = torch.randn(3, t, heads * d, generator=g), torch.randn(3, t, heads * d, generator=g)
    want = received_attention_ref(q, k, heads, d ** -0.5)
    got = received_triton.received_attention_triton(q, k, heads, d ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    assert torch.equal(got.topk(3).indices, want.topk(3).indices)
    monkeypatch.setenv("VLMPRUNE_KERNELS", "triton")
    torch.testing.assert_close(received_attention(q, k, heads, d ** -0.5), want, atol=1e-6, rtol=1e-4)


@pytest.mark.skipif(INTERPRETED, reason="the Triton tests run in this process")
def test_kernels_in_a_fresh_interpreter_process():
    from tests.test_kernels import run_interpreted

    run_interpreted([__file__], expect_at_least=3)
