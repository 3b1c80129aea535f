"""Attention written out in float64 math: the reference the tests and benchmarks/check_attention.py
compare every backend with. q is (B, T, H, D), k and v (B, T, H_kv, D); query head h reads key/value
head h // (H / H_kv), as torch's enable_gqa and flash-attn group them; a window w lets query i see
keys j with i - w <= j <= i.

flash_forward and flash_backward stand in for flash-attn-4's CUDA kernels on a machine without a GPU,
with the same contract: out and lse (B, H, T) forward; dq, dk, dv from lse backward."""

import math

import torch


def expand_heads(kv, n_head):  # each key/value head repeated for the query heads that share it
    return kv.repeat_interleave(n_head // kv.size(2), dim=2)


def band_scores(q, k, window):
    """Attention scores in float64, -inf outside the band j <= i, i - j <= window."""
    T, D = q.size(1), q.size(-1)
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    scores = torch.einsum("bthd,bshd->bhts", q.double(), expand_heads(k, q.size(2)).double()) / math.sqrt(D)
    return scores.masked_fill(~((j <= i) & (i - j <= window)), float("-inf"))


def reference_attention(q, k, v, window):
    return torch.einsum("bhts,bshd->bthd", band_scores(q, k, window).softmax(-1), expand_heads(v, q.size(2)).double())


def flash_forward(q, k, v, window):
    scores = band_scores(q, k, window)
    lse = scores.logsumexp(-1)
    out = torch.einsum("bhts,bshd->bthd", (scores - lse[..., None]).exp(), expand_heads(v, q.size(2)).double())
    return out.to(q.dtype), lse.float()


def flash_backward(q, k, v, out, dout, lse, window):
    B, T, H, D = q.shape
    p = (band_scores(q, k, window) - lse.double()[..., None]).exp()  # probabilities, rebuilt from lse
    dout, out = dout.double(), out.double()
    dv = torch.einsum("bhts,bthd->bshd", p, dout)
    dp = torch.einsum("bthd,bshd->bhts", dout, expand_heads(v, H).double())
    delta = (dout * out).sum(-1).transpose(1, 2)[..., None]  # rowsum(dO * O), per head and query
    ds = p * (dp - delta) / math.sqrt(D)
    dq = torch.einsum("bhts,bshd->bthd", ds, expand_heads(k, H).double())
    dk = torch.einsum("bhts,bthd->bshd", ds, q.double())
    group = (B, T, k.size(2), H // k.size(2), D)  # the query heads of a group add up on their key/value head
    return dq.to(q.dtype), dk.view(group).sum(3).to(k.dtype), dv.view(group).sum(3).to(v.dtype)
