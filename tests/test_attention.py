"""prepare.py's attention backends and the start-up checks' helpers, against float64 math on the CPU."""

import re

import pytest
import torch

import prepare
from attention_reference import flash_backward, flash_forward, reference_attention

# (query heads, key/value heads): multi-head, grouped-query, one key/value head
HEADS = [(3, 3), (4, 2), (4, 1)]


def qkv(T, heads, head_dim, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    H, H_kv = heads
    return [torch.randn(2, T, h, head_dim, generator=g).requires_grad_(requires_grad) for h in (H, H_kv, H_kv)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # on purpose: the CPU path
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_backends_match_plain_math(backend, heads, head_dim):
    """Every window an agent can set, T - 2 and T - 1 included (where the plain causal shortcut
    starts), for grouped-query attention and the usual head sizes."""
    T = 64
    fn = prepare.make_attention(backend, torch.device("cpu"), T)
    for window in (1, 16, T - 2, T - 1, T, 200):
        q, k, v = qkv(T, heads, head_dim, window)
        ref = reference_attention(q, k, v, window)
        out = fn(q, k, v, window)
        assert out.shape == q.shape and out.dtype == torch.float32
        assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-5, window


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_sdpa_gradients_match_plain_math(heads):
    q, k, v = qkv(48, heads, 32, 0, requires_grad=True)
    dout = torch.randn_like(q)
    fn = prepare.make_attention("sdpa", torch.device("cpu"), 48)
    for window in (5, 46, 47):
        got = torch.autograd.grad(fn(q, k, v, window), (q, k, v), dout)
        ref = torch.autograd.grad(reference_attention(q, k, v, window), (q, k, v), dout.double())
        assert prepare.relative_error(got, ref) <= 1e-5, window


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("windows", [(32, 64), (16, 64)], ids=["default windows", "a new window"])
def test_attention_masks_do_not_recompile_a_compiled_model(backend, windows):
    """A mask cached from inside a compiled region changes what its guards saw: the whole model
    would compile twice (once in step 0's first micro-step, again in its second). Dynamo alone
    (backend="eager") shows it; flex runs forward only, as it has no CPU backward."""
    import torch._dynamo

    torch._dynamo.reset()
    attention = prepare.make_attention(backend, torch.device("cpu"), 64)
    q = torch.randn(1, 64, 2, 32, requires_grad=backend == "sdpa")
    model = torch.compile(lambda q: sum(attention(q, q, q, w) for w in windows), backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = [model(q) for _ in range(3)]
        if q.requires_grad:
            outs[-1].sum().backward()
    expected = sum(reference_attention(q.detach(), q.detach(), q.detach(), w) for w in windows)
    assert ((outs[-1].detach().double() - expected).norm() / expected.norm()).item() <= 1e-5


def test_flash_attention_op_matches_sdpa_and_stays_whole_under_compile():
    """The torch.library wrapper that carries flash-attn-4 into compiled graphs (fake, autograd
    rule, layout, grouped-query shapes), driven by float64 reference kernels since this machine
    has no GPU."""
    attention = prepare.flash_attention_op("reference", flash_forward, flash_backward)
    assert prepare.flash_attention_op("reference", flash_forward, flash_backward) is attention  # registered once
    sdpa = prepare.make_attention("sdpa", torch.device("cpu"), 64)
    compiled = torch.compile(attention, fullgraph=True)  # a graph break inside would raise here
    for heads in HEADS:
        for window in (1, 16, 63):
            q, k, v = qkv(64, heads, 32, window, requires_grad=True)
            dout = torch.randn_like(q)
            results = {}
            for name, fn in (("sdpa", sdpa), ("op", attention), ("compiled op", compiled)):
                out = fn(q, k, v, window)
                results[name] = [out, *torch.autograd.grad(out, (q, k, v), dout)]
            for name in ("op", "compiled op"):
                assert [t.shape for t in results[name]] == [t.shape for t in results["sdpa"]]
                assert prepare.relative_error(results[name], results["sdpa"]) <= 1e-5, (name, heads, window)
    torch.library.opcheck(torch.ops.autoresearch.reference_fwd.default, (q, k, v, 16))  # fake and autograd agree


def test_select_attention_on_cpu_is_sdpa(monkeypatch, capsys):
    name, fn = prepare.select_attention(torch.device("cpu"), 64)
    assert name == "sdpa" and capsys.readouterr().out == ""
    monkeypatch.setenv("AUTORESEARCH_ATTENTION", "fa4")  # asked for, but impossible here: said, then SDPA
    name, fn = prepare.select_attention(torch.device("cpu"), 64)
    assert name == "sdpa"
    assert "attention: fa4 unavailable (flash-attn-4 needs a Hopper or Blackwell" in capsys.readouterr().out
    # FlexAttention's forward runs on a CPU but its backward does not: the gradient check catches it
    monkeypatch.setenv("AUTORESEARCH_ATTENTION", "flex")
    name, fn = prepare.select_attention(torch.device("cpu"), 64, head_dim=32, n_head=4, n_kv_head=2)
    assert name == "sdpa"
    assert "attention: flex unavailable (FlexAttention does not support backward on CPU" in capsys.readouterr().out


def test_relative_error_takes_the_worst_pair_and_fails_on_nan():
    ref = [torch.ones(4, 8), torch.full((3,), 2.0)]
    assert prepare.relative_error([ref[0], ref[1] * 1.05], ref) == pytest.approx(0.05, rel=1e-5)
    assert prepare.relative_error([ref[0] * 1.01, ref[1] * 1.03], ref) == pytest.approx(0.03, rel=1e-5)
    err = prepare.relative_error([ref[0] * float("nan"), ref[1]], ref)
    assert not err < 1  # NaN: never within any tolerance
    assert prepare.first_line(RuntimeError("first line\nmore")) == "first line"
    assert prepare.first_line(MemoryError()) == "MemoryError"


def test_ops_called_names_what_ran():
    x = torch.randn(3, 4)
    names = prepare.ops_called(lambda: torch.relu(x @ x.T).sum())
    assert {"aten::mm", "aten::relu", "aten::sum"} <= names and not any(re.match("aten::(tanh|exp)", n) for n in names)


def test_ops_called_lets_an_error_surface_from_the_callers_code():
    """A model that fails in the probe (an agent's shape slip) shows one plain traceback ending in
    its own code, not a chain through the recorder."""

    def broken():
        return torch.ones(2, 3) @ torch.ones(2, 3)

    with pytest.raises(RuntimeError, match="cannot be multiplied") as info:
        prepare.ops_called(broken)
    assert [entry.name for entry in info.traceback][-2:] == ["ops_called", "broken"]
