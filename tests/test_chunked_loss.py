"""The chunked head + cross-entropy loss against the plain path (whole logits, then lm_loss_sum)."""

import pytest
import torch
import torch.nn.functional as F

from train.model.lm import lm_head_loss_sum, lm_loss_sum


def _case(dtype, seed=0, batch=3, seq=10, hidden=16, vocab=50):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.rand(batch, seq, generator=g) > 0.3
    labels[~mask] = -7  # junk where the mask is off must not matter
    return h, w, labels, mask


def _loss_and_grads(fn, h, w):
    h.grad = w.grad = None
    total, count = fn()
    (total * 0.37).backward()
    return total.detach(), count, h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk", [1, 7, 30, 1000])
def test_chunked_loss_equals_plain_path_fp32(chunk):
    h, w, labels, mask = _case(torch.float32)
    plain = _loss_and_grads(lambda: lm_loss_sum(F.linear(h, w), labels, mask), h, w)
    chunked = _loss_and_grads(lambda: lm_head_loss_sum(h, w, labels, mask, chunk), h, w)
    assert chunked[1] == plain[1]
    # fp32 round-off: the sums run in a different order (per chunk), nothing else differs.
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked[2], plain[2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(chunked[3], plain[3], rtol=1e-5, atol=1e-7)


def test_chunked_loss_bf16_follows_the_plain_bf16_path():
    """bf16 working dtype: matmuls in bf16, softmax in fp32 (as the plain path); the head's
    gradient is summed over chunks in fp32, so it differs from plain by bf16 rounding only."""
    h, w, labels, mask = _case(torch.bfloat16, seed=1)
    plain = _loss_and_grads(lambda: lm_loss_sum(F.linear(h, w), labels, mask), h, w)
    chunked = _loss_and_grads(lambda: lm_head_loss_sum(h, w, labels, mask, 4), h, w)
    assert chunked[2].dtype == chunked[3].dtype == torch.bfloat16
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(chunked[2], plain[2], rtol=0, atol=0)  # same per-row bf16 ops
    # Per chunk the head's gradient is rounded to bf16 once more before the fp32 sum.
    rel = (chunked[3].float() - plain[3].float()).norm() / plain[3].float().norm()
    assert rel < 2 ** -7, rel


def test_chunked_loss_rejects_a_bad_chunk():
    h, w, labels, mask = _case(torch.float32)
    with pytest.raises(ValueError, match="chunk_tokens"):
        lm_head_loss_sum(h, w, labels, mask, 0)
