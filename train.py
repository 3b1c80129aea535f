"""
autoresearch, the half the agent edits: a GPT trained with Muon for a fixed 5 minutes.

    uv run train.py

Read top to bottom: the formulas that have fused kernels, the kernels themselves (skip them unless
you change one), the model, the optimizer, the hyperparameters, setup, training loop, summary.
Anything goes here as long as the run ends with the summary block that program.md reads. Data,
tokenizer, metric and platform plumbing live in prepare.py, which is fixed.
"""

import gc
import hashlib
import inspect
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch._functorch.config
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import prepare
from prepare import Tokenizer, evaluate_bpb, make_dataloader

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (macOS, Windows): the formulas run in plain PyTorch
    triton = tl = None
triton_jit = triton.jit if triton else lambda fn: fn

# ---------------------------------------------------------------------------
# Formulas with fused kernels. Each is written twice, side by side: in PyTorch (what the model
# computes without the kernels, and what each kernel is checked against at start-up) and as a
# Triton function on a float32 tile (what the kernel calls). Edit both: a kernel that disagrees
# with its formula is not used, and the header says so (`mlp: plain (fused kernel disagrees ...)`).


def activation(h):  # the MLP's nonlinearity: ReLU²
    return torch.relu(h).square()


@triton_jit
def activation_tile(h):
    r = tl.maximum(h, 0.0)
    return r * r


@triton_jit
def activation_grad_tile(y):  # d activation / dh, here from the output: relu(h) = sqrt(relu(h)²)
    return 2.0 * tl.sqrt(y)


ACTIVATION_GRAD_FROM_OUTPUT = True  # False: activation_grad_tile gets h instead, and the kernel keeps h for it


def mlp(x, w_fc, w_proj):
    return F.linear(activation(F.linear(x, w_fc)), w_proj)


SOFTCAP = 15.0  # the logits are squashed into (-SOFTCAP, SOFTCAP)


def softcap(logits):
    return SOFTCAP * torch.tanh(logits / SOFTCAP)


@triton_jit
def softcap_tile(logits, cap):  # (the capped logits, their derivative)
    t = 1.0 - 2.0 / (tl.exp(logits * (2.0 / cap)) + 1.0)  # tanh; 2 / cap is one division, not one an element
    return cap * t, 1.0 - t * t


def token_losses(x, w_head, targets):
    """Each token's loss (float32, flattened; 0 where the target is -1): cross-entropy of the
    soft-capped logits x @ w_head.T."""
    logits = softcap(F.linear(x, w_head).float())
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-1, reduction="none")


@triton_jit
def token_loss_tile(lse, target_logit):  # from the log-sum-exp of the token's capped logits
    return lse - target_logit


@triton_jit
def token_loss_grad_tile(probs, is_target, lse):  # d loss / d capped logits; probs = their softmax
    return probs - is_target


# ---------------------------------------------------------------------------
# Fused kernels (Triton, CUDA from Ampere on): skip this section unless you change a kernel.
# MLP: a matmul that applies the activation in its epilogue (forward) or the activation's
# derivative (backward), so the hidden activation is written once and read once. Loss: one pass
# over each row of logits computes the token's loss and overwrites the row with its gradient.
# Both become torch.library ops at the end of this section, which torch.compile keeps whole.


@triton_jit
def mlp_matmul_kernel(a_ptr, b_ptr, out_ptr, saved_ptr, post_ptr, M, N, K: tl.constexpr,
                      s_am, s_ak, s_bk, s_bn, s_om, s_on, BACKWARD: tl.constexpr, GRAD_FROM_OUTPUT: tl.constexpr,
                      PERSISTENT: tl.constexpr, TILES: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # h = a @ b, accumulated in float32 and rounded to the output's dtype (as a cuBLAS output is); then
    #   forward:  out = activation(h); saved = h, unless the derivative reads the output (out is kept then)
    #   backward: h is d loss / d activation; out = h * activation'(saved), and post = activation(saved)
    #             when saved holds the input (the backward's weight gradient needs the activation)
    # PERSISTENT: one program per SM walks TILES tiles in one flattened pipeline, so that a tile's epilogue
    # overlaps the next tile's loads. TILES is a constexpr: Triton's interpreter (CPU tests) cannot loop to
    # a runtime bound. PRECISION: float32 inputs in full float32 ("ieee", for the start-up check), not TF32.
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    for i in tl.range(0, TILES, flatten=PERSISTENT):
        tile = tl.program_id(0) + i * tl.num_programs(0)
        # tiles in groups of GROUP_M rows, so that the tiles running together share b's columns in L2
        first_m = (tile // (GROUP_M * grid_n)) * GROUP_M
        rows = max(min(grid_m - first_m, GROUP_M), 1)
        pid_m = first_m + (tile % (GROUP_M * grid_n)) % rows
        pid_n = (tile % (GROUP_M * grid_n)) // rows
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # tokens x hidden can pass 2^31 elements
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_inside = (rm < M) & (tile < grid_m * grid_n)  # a program's last tile may be past the end
        a_ptrs = a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak
        b_ptrs = b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=row_inside[:, None] & (rk[None, :] < K - k), other=0.0)
            b = tl.load(b_ptrs, mask=(rk[:, None] < K - k) & (rn[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * s_ak
            b_ptrs += BLOCK_K * s_bk
        dtype = out_ptr.dtype.element_ty
        h = acc.to(dtype).to(tl.float32)
        offsets = rm[:, None] * s_om + rn[None, :] * s_on
        inside = row_inside[:, None] & (rn[None, :] < N)
        if BACKWARD:
            z = tl.load(saved_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            tl.store(out_ptr + offsets, (h * activation_grad_tile(z)).to(dtype), mask=inside)
            if not GRAD_FROM_OUTPUT:
                tl.store(post_ptr + offsets, activation_tile(z).to(dtype), mask=inside)
        else:
            tl.store(out_ptr + offsets, activation_tile(h).to(dtype), mask=inside)
            if not GRAD_FROM_OUTPUT:
                tl.store(saved_ptr + offsets, h.to(dtype), mask=inside)


def mlp_matmul_blocks(device, dtype, backward):
    if device.type != "cuda" or dtype == torch.float32:  # Triton's interpreter (tests), the check's float32
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2, PERSISTENT=not backward)
    if torch.cuda.get_device_properties(device).shared_memory_per_block_optin >= 200 * 1024:  # Hopper, Blackwell
        if backward:  # at most 128 registers a thread: two programs an SM, one's matmul under the other's epilogue
            return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, PERSISTENT=False,
                        maxnreg=128)
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, PERSISTENT=True)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4, PERSISTENT=False)  # 64 KB


def mlp_matmul(a, b, saved=None):
    """Forward (saved None): (activation(a @ b), what the backward needs: h, or the output itself when
    the derivative reads the output). Backward: (a @ b times the activation's derivative at saved,
    the activation, which the weight gradient needs)."""
    backward = saved is not None
    M, K = a.shape
    N = b.shape[1]
    out = a.new_empty((M, N))
    if backward:  # the activation: the forward's output itself, or rebuilt from h by the kernel
        post = saved if ACTIVATION_GRAD_FROM_OUTPUT else a.new_empty((M, N))
    else:  # the kernel keeps h, unless the derivative reads the output
        saved = post = out if ACTIVATION_GRAD_FROM_OUTPUT else a.new_empty((M, N))
    cfg = mlp_matmul_blocks(a.device, a.dtype, backward)
    tiles = programs = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    if cfg["PERSISTENT"]:  # one program per SM (3 in the interpreter, so that the tests see programs walk tiles)
        programs = min(tiles, torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 3)
    mlp_matmul_kernel[(programs,)](a, b, out, saved, post, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                   out.stride(0), out.stride(1), BACKWARD=backward,
                                   GRAD_FROM_OUTPUT=ACTIVATION_GRAD_FROM_OUTPUT, TILES=triton.cdiv(tiles, programs),
                                   PRECISION="ieee" if a.dtype == torch.float32 else "tf32", **cfg)
    return out, post if backward else saved


def mlp_forward(x: Tensor, w_fc: Tensor, w_proj: Tensor) -> tuple[Tensor, Tensor]:
    """mlp() for 2-D x, all inputs in one dtype; also returns what its backward needs."""
    post, saved = mlp_matmul(x, w_fc.t())
    return post @ w_proj.t(), saved


def mlp_forward_shapes(x, w_fc, w_proj):  # what torch.compile traces in the kernel's place
    return x.new_empty((x.size(0), w_proj.size(0))), x.new_empty((x.size(0), w_fc.size(0)))


def mlp_backward(dout: Tensor, x: Tensor, w_fc: Tensor, w_proj: Tensor, saved: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dh, post = mlp_matmul(dout, w_proj, saved)
    return dh @ w_fc, dh.t() @ x, dout.t() @ post


def mlp_backward_shapes(dout, x, w_fc, w_proj, saved):
    return torch.empty_like(x), torch.empty_like(w_fc), torch.empty_like(w_proj)


def mlp_save_for_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])


def mlp_gradients(ctx, dout, dsaved):  # saved is a by-product: no gradient flows into it
    return mlp_backward_op(dout, *ctx.saved_tensors)


@triton_jit
def token_losses_kernel(logits_ptr, targets_ptr, losses_ptr, V: tl.constexpr, stride, cap, WITH_GRAD: tl.constexpr,
                        BLOCK_V: tl.constexpr):
    # One row of logits per program, in two sweeps over the row: the first caps it and accumulates its
    # log-sum-exp (online, chunk by chunk) and the target's logit, then stores the token's loss; for
    # training the second reads the row again (from L2) and overwrites it with d loss / d logits.
    row = logits_ptr + tl.program_id(0).to(tl.int64) * stride
    target = tl.load(targets_ptr + tl.program_id(0))
    m, s, target_logit = -float("inf"), 0.0, 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z, _ = softcap_tile(tl.load(row + cols, mask=cols < V, other=0.0).to(tl.float32), cap)
        z = tl.where(cols < V, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        target_logit += tl.sum(tl.where(cols == target, z, 0.0), 0)
    lse = m + tl.log(s)
    valid = target != -1
    tl.store(losses_ptr + tl.program_id(0), tl.where(valid, token_loss_tile(lse, target_logit), 0.0))
    if WITH_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z, dz = softcap_tile(tl.load(row + cols, mask=cols < V, other=0.0).to(tl.float32), cap)
            grad = token_loss_grad_tile(tl.exp(z - lse), tl.where(cols == target, 1.0, 0.0), lse) * dz
            tl.store(row + cols, tl.where(valid, grad, 0.0).to(logits_ptr.dtype.element_ty), mask=cols < V)


def token_losses_forward(x: Tensor, w_head: Tensor, targets: Tensor, with_grad: bool) -> tuple[Tensor, Tensor]:
    """token_losses() for 2-D x: cuBLAS makes the logits, the kernel the losses and, with_grad, the
    logits' gradient in their place (returned for the backward, which is two matmuls)."""
    logits = x @ w_head.t()
    losses = torch.empty(x.size(0), device=x.device, dtype=torch.float32)
    launch = dict(BLOCK_V=2048, num_warps=4) if x.is_cuda else dict(BLOCK_V=128)
    token_losses_kernel[(x.size(0),)](logits, targets.contiguous(), losses, logits.size(1), logits.stride(0), SOFTCAP,
                                      WITH_GRAD=with_grad, **launch)
    return losses, logits if with_grad else logits.new_empty(0)


def token_losses_shapes(x, w_head, targets, with_grad):
    return x.new_empty(x.size(0), dtype=torch.float32), x.new_empty((x.size(0), w_head.size(0)) if with_grad else 0)


def token_losses_save_for_backward(ctx, inputs, output):
    x, w_head, _, ctx.with_grad = inputs
    ctx.save_for_backward(x, w_head, output[1])


def token_losses_gradients(ctx, dlosses, _):
    if not ctx.with_grad:
        raise RuntimeError("token_losses_op ran with with_grad=False: it kept no gradient")
    x, w_head, dlogits = ctx.saved_tensors
    scale = dlosses[:, None]  # each token's incoming gradient, applied to the smaller operands
    dx = ((dlogits @ w_head).float() * scale).to(x.dtype)
    dw = dlogits.t() @ (x.float() * scale).to(x.dtype)
    return dx, dw, None, None


def source_hash(namespace):
    """A short hash of the source of every function (Triton's included) and the value of every
    CAPS constant defined in namespace."""
    parts = []
    for name, value in namespace.items():
        fn = getattr(value, "fn", value)  # a Triton kernel's Python function
        if inspect.isfunction(fn) and fn.__module__ == namespace["__name__"]:
            parts.append(inspect.getsource(fn))
        elif name.isupper() and isinstance(value, (bool, int, float, str)):
            parts.append(f"{name} = {value!r}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


# Inductor's on-disk caches know a custom op by its name alone, so the names carry a hash of every
# function and constant defined above: an edited formula, kernel or backward is compiled afresh.
OPS_VERSION = source_hash(globals())
MLP_OP, LOSS_OP = f"autoresearch::mlp_{OPS_VERSION}", f"autoresearch::token_losses_{OPS_VERSION}"
mlp_op = torch.library.custom_op(MLP_OP, mlp_forward, mutates_args=())
mlp_op.register_fake(mlp_forward_shapes)
mlp_backward_op = torch.library.custom_op(MLP_OP + "_backward", mlp_backward, mutates_args=())
mlp_backward_op.register_fake(mlp_backward_shapes)
mlp_op.register_autograd(mlp_gradients, setup_context=mlp_save_for_backward)
token_losses_op = torch.library.custom_op(LOSS_OP, token_losses_forward, mutates_args=())
token_losses_op.register_fake(token_losses_shapes)
token_losses_op.register_autograd(token_losses_gradients, setup_context=token_losses_save_for_backward)


def autocast_dtype(x):
    """The dtype autocast computes x's matmuls in (x's own outside autocast): the ops take all their
    inputs in it, cast as autocast casts them."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def fused_mlp(x, w_fc, w_proj):
    dtype = autocast_dtype(x)
    out = mlp_op(x.reshape(-1, x.size(-1)).to(dtype), w_fc.to(dtype), w_proj.to(dtype))[0]
    return out.view(*x.shape[:-1], out.size(-1))


def fused_token_losses(x, w_head, targets):
    dtype = autocast_dtype(x)
    with_grad = torch.is_grad_enabled() and (x.requires_grad or w_head.requires_grad)
    return token_losses_op(x.reshape(-1, x.size(-1)).to(dtype), w_head.to(dtype), targets.reshape(-1), with_grad)[0]


def check_fused(fused, plain, args, leaves, grad_output, bf16=True):
    """'' when fused computes what plain does, else why not: output and gradients agree to 1e-4 in
    float32 (so that a change to one formula shows) and to 2% in bf16 autocast, as in training
    (relative norms of the differences)."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # float32 matmuls in float32, not TF32
    try:
        for dtype, tolerance in [(torch.float32, 1e-4)] + [(torch.bfloat16, 2e-2)] * bf16:
            results = []
            for fn in (fused, plain):
                with torch.autocast(args[0].device.type, dtype=dtype, enabled=dtype != torch.float32):
                    out = fn(*args)
                results.append([out, *torch.autograd.grad(out, leaves, grad_output)])
            err = prepare.relative_error(*results)
            if not err < tolerance:
                return f"fused kernel disagrees with the formula: max err {err:.1e} in {str(dtype)[6:]}"
    except Exception as e:
        return f"fused kernel failed: {prepare.first_line(e)}"
    finally:
        torch.set_float32_matmul_precision(precision)
    return ""


def check_fused_kernels(device, config, bf16=True):
    """(mlp, loss): '' for each fused kernel that agrees with its formula on a few random tokens at the
    model's sizes, else why it is not used."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return ("needs an Ampere or newer GPU",) * 2
    g = torch.Generator(device=device).manual_seed(0)
    C, V = config.n_embd, config.vocab_size

    def randn(*shape, scale=1.0):
        return torch.randn(shape, device=device, generator=g) * scale

    x, w_fc, w_proj = randn(3, 100, C), randn(4 * C, C, scale=C**-0.5), randn(C, 4 * C, scale=C**-0.5)
    x, w_fc, w_proj = (t.requires_grad_() for t in (x, w_fc, w_proj))
    mlp_note = check_fused(fused_mlp, mlp, (x, w_fc, w_proj), (x, w_fc, w_proj), randn(3, 100, C), bf16)
    w_head = randn(V, C, scale=4 * C**-0.5).requires_grad_()  # logits of a few units, some past the cap's linear part
    targets = torch.randint(-1, V, (3, 100), device=device, generator=g)  # some -1: ignored
    dlosses = torch.rand(300, device=device, generator=g)  # a weight per token, as a mean or a sum gives
    loss_note = check_fused(fused_token_losses, token_losses, (x, w_head, targets), (x, w_head), dlosses, bf16)
    return mlp_note, loss_note


def kernel_status(op, note, ran):
    """The header's word on a fused kernel: 'fused' if the model ran its op, else 'plain (why not)'."""
    return "fused" if op in ran else f"plain ({note or 'the model does not call it'})"


# ---------------------------------------------------------------------------
# Model


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int = 4  # fewer than n_head: grouped-query attention
    n_embd: int = 512
    window_pattern: str = "SSSL"
    fused_mlp: bool = False  # mlp() through its fused kernel (Setup turns these on where the kernels pass their check)
    fused_loss: bool = False  # token_losses() through its fused kernel


class RMSNorm(torch.autograd.Function):
    """RMSNorm without a learned weight, as torch.nn.functional.rms_norm, but it keeps its output for
    the backward instead of its input: the matmul or attention that reads the output keeps it anyway,
    so the norms keep nothing extra."""

    @staticmethod
    def forward(ctx, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 in float32, with float32's eps: as F.rms_norm
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + torch.finfo(xf.dtype).eps)
        y = xf * rstd
        y = y if y.dtype == x.dtype else y.to(x.dtype)  # (under torch.compile a no-op .to() loses the gradient)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):  # dx = rstd * (dy - y * mean(dy * y)), exact with y = x * rstd
        y, rstd = ctx.saved_tensors
        dyf, yf = dy.to(rstd.dtype), y.to(rstd.dtype)
        return ((dyf - yf * (dyf * yf).mean(-1, keepdim=True)) * rstd).to(dy.dtype)


norm = RMSNorm.apply
# torch.compile's cache leaves out graphs with an autograd.Function unless told (each run would trace
# them again); it keys on the Function's traced code, so an edited backward is compiled afresh
torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True


def has_value_embedding(layer_idx, n_layer):
    return layer_idx % 2 == (n_layer - 1) % 2  # alternating layers, always including the last


def apply_rotary(x, cos, sin):
    """Rotates the halves: y1 = x1*cos + x2*sin, y2 = -x1*sin + x2*cos, with cos = [cos, cos] and
    sin = [sin, -sin] over the full head size (swapping the halves with roll fuses better than
    slicing and concatenating them)."""
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx, attention):
        super().__init__()
        self.attention = attention  # attention(q, k, v, window), from prepare.select_attention
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        # value embedding gate: how much of this layer's value embedding to mix in, per head
        has_ve = has_value_embedding(layer_idx, config.n_layer)
        self.ve_gate = nn.Linear(32, self.n_kv_head, bias=False) if has_ve else None

    def forward(self, x, ve, cos, sin, window):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :32]))  # (B, T, n_kv_head)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        y = self.attention(q, k, v, window)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fused = config.fused_mlp
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return (fused_mlp if self.fused else mlp)(x, self.c_fc.weight, self.c_proj.weight)


class Block(nn.Module):
    def __init__(self, config, layer_idx, attention):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, attention)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window):
        x = x + self.attn(norm(x), ve, cos, sin, window)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config, attention):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                h=nn.ModuleList([Block(config, i, attention) for i in range(config.n_layer)]),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))  # scales the residual stream
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))  # mixes the embedding back in
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                           for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)})
        # sliding windows: 'L' sees the whole context, 'S' half of it; the last layer is always 'L'
        pattern = config.window_pattern * config.n_layer
        T = config.sequence_len
        self.windows = [T if c == "L" else T // 2 for c in pattern[: config.n_layer]]
        self.windows[-1] = config.sequence_len
        # rotary embeddings, cached for 10x the context so longer inputs still work
        head_dim = config.n_embd // config.n_head
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(10 * config.sequence_len, dtype=torch.float32), inv_freq)
        cos, sin = freqs.cos().bfloat16(), freqs.sin().bfloat16()
        self.register_buffer("cos", torch.cat([cos, cos], dim=-1)[None, :, None, :], persistent=False)
        self.register_buffer("sin", torch.cat([sin, -sin], dim=-1)[None, :, None, :], persistent=False)

    @torch.no_grad()
    def init_weights(self):
        s = 3**0.5 / self.config.n_embd**0.5  # uniform in [-s, s] has std 1/sqrt(n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for w in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(w.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)  # every block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)

    def num_flops_per_token(self):
        """6 x (matmul parameters) + attention's 12 x heads x head_dim x effective window, per layer."""
        excluded = self.transformer.wte.weight.numel() + self.resid_lambdas.numel() + self.x0_lambdas.numel()
        excluded += sum(p.numel() for p in self.value_embeds.parameters())
        n = sum(p.numel() for p in self.parameters()) - excluded
        c = self.config
        head_dim = c.n_embd // c.n_head
        return 6 * n + sum(12 * c.n_head * head_dim * min(w, c.sequence_len) for w in self.windows)

    def forward(self, idx, targets=None, reduction="mean"):
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.windows[i])
        x = norm(x)
        if targets is None:
            return softcap(self.lm_head(x).float())
        losses = (fused_token_losses if self.config.fused_loss else token_losses)(x, self.lm_head.weight, targets)
        return losses if reduction == "none" else losses.sum() / (targets != -1).sum()


# ---------------------------------------------------------------------------
# Optimizer: AdamW for embeddings, lm_head and scalars; Muon for the matrices inside the blocks

POLAR_EXPRESS = [  # (a, b, c) of the five orthogonalization steps
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_update(p, g, m, v, step, lr, beta1, beta2, eps, wd):
    """AdamW: decoupled weight decay, moments by lerp, bias correction (as torch.optim.AdamW)."""
    p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - beta1)
    v.lerp_(g.square(), 1 - beta2)
    denom = (v / (1 - beta2**step)).sqrt() + eps
    p.sub_(lr / (1 - beta1**step) * (m / denom))


def polar_express(g, steps=5):
    """Approximately orthogonalize each matrix of g (..., rows, cols), in bf16 on GPUs (CPUs
    emulate bf16 matmuls slowly, so they use float32)."""
    X = g.bfloat16() if g.is_cuda else g.float()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    for a, b, c in POLAR_EXPRESS[:steps]:
        if tall:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * A @ A) @ X
    return X


def muon_update(params, grads, momentum_buf, second_buf, lr, momentum, beta2, wd):
    """One Muon step for a group of same-shape matrices, stacked: Nesterov momentum, Polar
    Express, NorMuon per-row (or per-column) normalization, cautious weight decay."""
    g = torch.stack(grads)
    momentum_buf.lerp_(g, 1 - momentum)
    g = g.lerp_(momentum_buf, momentum)
    X = polar_express(g).float()
    row_wise = X.size(-2) >= X.size(-1)
    second_buf.lerp_(X.square().mean(dim=-1 if row_wise else -2, keepdim=True), 1 - beta2)
    before = X.norm(dim=(-2, -1), keepdim=True)
    X = X * second_buf.clamp_min(1e-10).rsqrt()
    X = X * (before / X.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))
    P = torch.stack(params)
    mask = (X * P >= 0).to(P.dtype)  # decay only where the update and the weight agree in sign
    P = P - lr * X - lr * wd * P * mask
    for p, new in zip(params, P.unbind(0)):
        p.copy_(new)


def update_all(adamw_jobs, muon_jobs):
    """All the math of one optimizer step; compiled as a whole, it is one graph (a graph per group
    and shape would each cost start-up time)."""
    for p, g, m, v, step, *hyperparameters in adamw_jobs:
        step += 1
        adamw_update(p, g, m, v, step, *hyperparameters)
    for job in muon_jobs:
        muon_update(*job)


class MuonAdamW(torch.optim.Optimizer):
    """Groups with kind='adamw' take AdamW steps; kind='muon' groups hold same-shape matrices.
    step() gathers the work, update_all does the math. Hyperparameters that change every step
    reach the compiled math as device tensors (_scalar): a Python number that changes would
    recompile it at every step."""

    def __init__(self, groups, compile_math):
        super().__init__(groups, {})
        self.update = torch.compile(update_all, dynamic=False) if compile_math else update_all
        for group in self.param_groups:
            group["initial_lr"] = group["lr"]

    def _scalar(self, group, name, value, device):
        t = group.setdefault("_" + name, torch.zeros((), device=device))
        return t.fill_(value)

    @torch.no_grad()
    def step(self):
        adamw_jobs, muon_jobs = [], []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            dev = params[0].device
            if group["kind"] == "adamw":
                lr = self._scalar(group, "lr", group["lr"], dev)
                for p in params:
                    state = self.state[p]
                    if not state:
                        state.update(step=torch.zeros((), device=dev), m=torch.zeros_like(p), v=torch.zeros_like(p))
                    adamw_jobs.append((p, p.grad, state["m"], state["v"], state["step"], lr, *group["betas"],
                                       group["eps"], group["weight_decay"]))
            else:
                state = self.state[params[0]]
                if not state:
                    stacked = torch.stack(params).float()
                    state["momentum"] = torch.zeros_like(stacked)
                    row_wise = stacked.size(-2) >= stacked.size(-1)
                    state["second"] = torch.zeros_like(stacked.mean(dim=-1 if row_wise else -2, keepdim=True))
                rows, cols = params[0].shape
                lr = self._scalar(group, "lr", group["lr"] * max(1.0, rows / cols) ** 0.5, dev)
                momentum = self._scalar(group, "momentum", group["momentum"], dev)
                wd = self._scalar(group, "wd", group["weight_decay"], dev)
                muon_jobs.append((params, [p.grad for p in params], state["momentum"], state["second"], lr, momentum,
                                  group["beta2"], wd))
        self.update(adamw_jobs, muon_jobs)


def build_optimizer(model, compile_math):
    c = model.config
    scale = (c.n_embd / 768) ** -0.5  # AdamW learning rates were tuned at width 768
    block_params = list(model.transformer.h.parameters())
    by_shape = {}
    for p in block_params:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    adamw = dict(kind="adamw", eps=1e-10, weight_decay=0.0, betas=ADAM_BETAS)
    groups = [
        dict(adamw, params=[model.lm_head.weight], lr=UNEMBEDDING_LR * scale),
        dict(adamw, params=[model.transformer.wte.weight, *model.value_embeds.parameters()], lr=EMBEDDING_LR * scale),
        dict(adamw, params=[model.resid_lambdas], lr=SCALAR_LR * 0.01),
        dict(adamw, params=[model.x0_lambdas], lr=SCALAR_LR, betas=(0.96, 0.95)),
    ]
    for shape, params in sorted(by_shape.items()):
        groups.append(dict(kind="muon", params=params, lr=MATRIX_LR, momentum=0.95, beta2=0.95,
                           weight_decay=WEIGHT_DECAY))
    return MuonAdamW(groups, compile_math)


# ---------------------------------------------------------------------------
# Hyperparameters (edit these)

DEPTH = 8  # transformer layers; the width follows from it
ASPECT_RATIO = 64  # model_dim ~ DEPTH x ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128
WINDOW_PATTERN = "SSSL"  # per layer, repeating: S = half-context sliding window, L = full context
TOTAL_BATCH_SIZE = 2**19  # tokens per optimizer step
DEVICE_BATCH_SIZE = 128  # sequences per micro-step; halved by itself if the first step runs out of memory
EMBEDDING_LR = 0.6
UNEMBEDDING_LR = 0.004
MATRIX_LR = 0.04
SCALAR_LR = 0.5
WEIGHT_DECAY = 0.2  # Muon's cautious weight decay, ramped down to 0 with progress
ADAM_BETAS = (0.8, 0.95)
WARMUP_RATIO = 0.0
WARMDOWN_RATIO = 0.5
FINAL_LR_FRAC = 0.0

# ---------------------------------------------------------------------------
# Setup: from here on the script runs. The tests load the definitions above by running this file up
# to its call of prepare.parse_command_line: keep that call first.

t_start = time.time()
prepare.parse_command_line(__doc__)  # --help, unknown arguments, AUTORESEARCH_* values, Ctrl-C: before anything runs
device = prepare.get_device()
SEQ_LEN, TIME_BUDGET, notes = prepare.run_settings(device)
if device.type != "cuda":  # small-machine settings: the GPU ones would take hours per step here
    DEPTH, DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE = 4, 8, 2**13
tokens_per_micro = DEVICE_BATCH_SIZE * SEQ_LEN
if TOTAL_BATCH_SIZE % tokens_per_micro:
    sys.exit(f"TOTAL_BATCH_SIZE={TOTAL_BATCH_SIZE} is not a multiple of DEVICE_BATCH_SIZE x SEQ_LEN "
             f"= {tokens_per_micro}")
grad_accum = TOTAL_BATCH_SIZE // tokens_per_micro
torch.manual_seed(42)
torch.set_float32_matmul_precision("high")
tokenizer = Tokenizer.from_directory()
prepare.check_ready(tokenizer, device)  # what evaluation needs, checked now: a problem costs seconds, not a run

model_dim = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
config = GPTConfig(
    sequence_len=SEQ_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=DEPTH,
    n_head=model_dim // HEAD_DIM, n_kv_head=model_dim // HEAD_DIM, n_embd=model_dim, window_pattern=WINDOW_PATTERN,
)
attention_name, attention = prepare.select_attention(device, SEQ_LEN, HEAD_DIM, config.n_head, config.n_kv_head)
if device.type == "cuda" and triton is not None:  # '' for each fused kernel that agrees with its formula
    mlp_note, loss_note = check_fused_kernels(device, config)
else:
    mlp_note = loss_note = "no Triton" if device.type == "cuda" else "no CUDA"
config.fused_mlp, config.fused_loss = not mlp_note, not loss_note
with torch.device(device):
    model = GPT(config, attention)
model.init_weights()
if device.type == "cuda":  # embedding tables in bf16, like the activations that read them
    model.transformer.wte.to(torch.bfloat16)
    model.value_embeds.to(torch.bfloat16)
ran = set()  # the fused kernels the model really calls, for the header: one short forward shows them
if config.fused_mlp or config.fused_loss:
    tokens = torch.zeros((3, 100), dtype=torch.long, device=device)  # the check's shape: its kernels are compiled
    with torch.no_grad(), prepare.autocast(device):
        ran = prepare.ops_called(lambda: model(tokens, tokens))
num_params = sum(p.numel() for p in model.parameters())
flops_per_token = model.num_flops_per_token()
use_compile = device.type == "cuda"
optimizer = build_optimizer(model, compile_math=use_compile)
run_model = torch.compile(model, dynamic=False) if use_compile else model
untimed_steps = 11 if use_compile else 1  # compiling takes the first steps; without it one step warms up
peak = prepare.peak_flops(device)
gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type

print(f"device: {gpu} | attention: {attention_name} | mlp: {kernel_status(MLP_OP, mlp_note, ran)} | "
      f"loss: {kernel_status(LOSS_OP, loss_note, ran)} | compile: {use_compile}")
print(f"model: {DEPTH} layers, width {model_dim}, {config.n_head} heads, {num_params / 1e6:.1f}M params, "
      f"{flops_per_token / 1e6:.0f} MFLOP/token")
print(f"batch: {TOTAL_BATCH_SIZE:,} tokens = {grad_accum} x {DEVICE_BATCH_SIZE} x {SEQ_LEN} | "
      f"time budget: {TIME_BUDGET}s")
for note in notes:
    print(f"NOTE: {note}")

def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress <= 1 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


def muon_momentum(step):
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def train_step(loader, x, y):
    """Forward and backward over grad_accum micro-batches; fetches the next batch while the GPU
    works. Returns (loss of the last micro-batch, next x, next y, epoch)."""
    for _ in range(grad_accum):
        with prepare.autocast(device):
            loss = run_model(x, y)
        (loss / grad_accum).backward()
        x, y, epoch = next(loader)
    return loss.detach(), x, y, epoch


# ---------------------------------------------------------------------------
# Training loop: the first untimed_steps compile and warm up; then train until TIME_BUDGET is spent

train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, SEQ_LEN, "train")
x, y, epoch = next(train_loader)
startup_seconds = time.time() - t_start
step, training_time, smooth_loss = 0, 0.0, 0.0
interactive = sys.stdout.isatty()
while True:
    prepare.synchronize(device)
    t0 = time.time()
    progress = min(training_time / TIME_BUDGET, 1.0)
    lrm = lr_multiplier(progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = muon_momentum(step)
            group["weight_decay"] = WEIGHT_DECAY * (1 - progress)
    try:
        loss, x, y, epoch = train_step(train_loader, x, y)
    except torch.OutOfMemoryError:
        if step > 0 or DEVICE_BATCH_SIZE == 1:
            sys.exit(f"FAIL: out of memory at DEVICE_BATCH_SIZE={DEVICE_BATCH_SIZE}: make the model or batch smaller")
        loss = None
    if loss is None:  # out of memory in the first step (handled here, once the exception has let go of its tensors)
        model.zero_grad(set_to_none=True)
        x = y = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()  # peak_vram_mb should describe the run that happened
        DEVICE_BATCH_SIZE //= 2
        grad_accum *= 2
        print(f"out of memory in the first step: retrying with DEVICE_BATCH_SIZE={DEVICE_BATCH_SIZE} "
              f"({grad_accum} micro-steps)")
        train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, SEQ_LEN, "train")
        x, y, epoch = next(train_loader)
        continue
    optimizer.step()
    model.zero_grad(set_to_none=True)
    train_loss = loss.item()  # waits for the GPU
    if not math.isfinite(train_loss) or train_loss > 100:
        print(f"\nFAIL: loss is {train_loss} at step {step}")
        sys.exit(1)
    prepare.synchronize(device)
    dt = time.time() - t0
    if step >= untimed_steps:
        training_time += dt
    elif step == 0:
        first_step_seconds = dt  # mostly compilation
    smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
    debiased = smooth_loss / (1 - 0.9 ** (step + 1))
    tok_per_sec = TOTAL_BATCH_SIZE / dt
    mfu = f"{100 * flops_per_token * tok_per_sec / peak:.1f}%" if peak else "n/a"
    remaining = max(0.0, TIME_BUDGET - training_time)
    status = (f"step {step:05d} ({100 * progress:.1f}%) | loss {debiased:.4f} | lrm {lrm:.2f} | {1000 * dt:.0f} ms | "
              f"{tok_per_sec:,.0f} tok/s | mfu {mfu} | epoch {epoch} | {remaining:.0f}s left")
    # rewritten in place on a terminal; in a log file one line per step, each starting with "step"
    print(f"\r{status}   " if interactive else status, end="" if interactive else "\n", flush=True)
    if step == 0:  # the garbage collector's pauses cost ~500 ms; nothing here needs it
        gc.collect()
        gc.freeze()
        gc.disable()
    elif step % 5000 == 0:
        gc.collect()
    step += 1
    if step >= untimed_steps and training_time >= TIME_BUDGET:
        break
if interactive:
    print()

# ---------------------------------------------------------------------------
# Evaluation and summary (program.md reads these lines: keep keys, order and format)

model.eval()
t_eval = time.time()
val_bpb = evaluate_bpb(run_model, tokenizer, DEVICE_BATCH_SIZE)
print(f"time outside training: start-up {startup_seconds:.1f}s, step 0 {first_step_seconds:.1f}s, "
      f"evaluation {time.time() - t_eval:.1f}s")
timed_steps = max(step - untimed_steps, 0)
timed_flops = flops_per_token * TOTAL_BATCH_SIZE * timed_steps
mfu_percent = f"{100 * timed_flops / training_time / peak:.2f}" if peak and training_time > 0 else "n/a"
print("---")
print(f"{'val_bpb:':<18}{val_bpb:.6f}")
print(f"{'training_seconds:':<18}{training_time:.1f}")
print(f"{'total_seconds:':<18}{time.time() - t_start:.1f}")
print(f"{'peak_vram_mb:':<18}{prepare.peak_memory_mb(device):.1f}")
print(f"{'mfu_percent:':<18}{mfu_percent}")
print(f"{'total_tokens_M:':<18}{step * TOTAL_BATCH_SIZE / 1e6:.1f}")
print(f"{'num_steps:':<18}{step}")
print(f"{'num_params_M:':<18}{num_params / 1e6:.1f}")
print(f"{'depth:':<18}{DEPTH}")
