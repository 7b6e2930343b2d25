"""VMRNN in one file: Vision Mamba + LSTM for spatiotemporal forecasting. It implements
    Tang, Dong, Tang, Chu, Liang. "VMRNN: Integrating Vision Mamba and LSTM for Efficient and
    Accurate Spatiotemporal Forecasting", CVPR Workshops 2024.  https://arxiv.org/abs/2403.16536
built on VMamba's SS2D ("v0", Liu et al. 2024, https://arxiv.org/abs/2401.10166) and Mamba's
selective scan (S6, Gu & Dao 2023, https://arxiv.org/abs/2312.00752). It computes the same function
as the authors' code (github.com/yyyujintang/VMRNN-PyTorch) and loads their weights
(`load_official_state_dict`), but needs no CUDA extension: the scan is plain PyTorch, and the
mamba-ssm kernel is used only if it is installed and the tensors are on a GPU.

Contents, in the order the paper builds the model (bottom-up):
    1. Selective scan (S6)        Mamba Alg. 2, VMRNN Fig. 2(c), Eq. (8)   selective_scan
    2. Cross-scan / cross-merge   VMRNN Eqs. (7), (9)                      cross_scan, cross_merge
    3. SS2D                       VMRNN Fig. 2(c)                          SS2D
    4. VSS block                  VMRNN Fig. 2(b)                          VSSBlock
    5. VMRNN cell                 VMRNN Eqs. (4)-(6), Fig. 2(a)            VMRNNCell
    6. VMRNN-B and VMRNN-D        VMRNN Fig. 3, Table 1                    VMRNN_B, VMRNN_D, paper_model
    7. Loading the authors' weights                                         load_official_state_dict

Glossary of axis letters (used in every shape comment):
    b   batch                     t   frame index of a sequence
    H W patch grid (image / p)    l   = H*W tokens, the length of one scan
    c   model width (embed_dim)   d   inner width of SS2D (= 2c); in the scan, all k*d channels
    n   SSM state size (d_state)  k   = 4 scan directions
    r   rank of the step-size projection (dt_rank = ceil(c / 16))
    g   groups of channels that share the SSM's B and C (g = k in SS2D)

Letter clashes: the SSM's matrices A, B, C, D are always written as SSM parameters (`A`, `B`, `C`,
`D`) and never mean batch or channels; the LSTM-style cell state and hidden state are `c_state`,
`h_state` (paper: C_t, H_t), never the SSM state, which is `h` inside the scan only.

Where the paper and the authors' code differ, this file follows the code (it produced the published
numbers and checkpoint) and offers the paper's form; each place is marked `Note:`.
"""

import math
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # optional CUDA kernel (state-spaces/mamba); everything below also runs without it
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_scan_fn
except ImportError:
    _mamba_scan_fn = None


# 1. Selective scan (S6): Mamba Alg. 2, VMRNN Fig. 2(c), Eq. (8) -----------------------------------
# Tags refer to the Mamba paper (Gu & Dao 2023): eq (2a) h_t = A_bar h_{t-1} + B_bar x_t, eq (2b)
# y_t = C h_t, eq (4) A_bar = exp(delta A) (zero-order hold); Alg. 2 line 4: delta = softplus(
# parameter + s_delta(x)). As in Mamba's code, B_bar = delta B (Euler) and the SSM input x_t is
# called u (x is the state update). One signature, three implementations, which `selective_scan`
# picks from: the loop (the reference), the chunked parallel scan (default), the CUDA kernel.


def _prepare_scan(u, delta, A, B, C, delta_bias, delta_softplus):
    """What every scan does first: compute in float32 like the CUDA kernel (float64 if an input is,
    for the tests' oracle), delta = softplus(delta + bias), and B, C grouped (b, g, n, l)."""
    dtype = torch.float64 if torch.float64 in (t.dtype for t in (u, delta, A, B, C)) else torch.float32
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]                       # (b, d, l)
    if delta_softplus:
        delta = F.softplus(delta)                                           # Alg. 2 line 4
    B, C = (v[:, None] if v.dim() == 3 else v for v in (B, C))              # (b, g, n, l)
    return u, delta, A, B, C


def _skip_and_gate(y, u, D, z):
    """What every scan does last: y + D u (the skip term), then y * silu(z) (the gate)."""
    y = y if D is None else y + D.to(y.dtype)[:, None] * u
    return y if z is None else y * F.silu(z.to(y.dtype))


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The selective scan as the literal loop over time: the readable reference the tests trust.

    For every channel d and state index n, from h_0 = 0, for t = 1..l:
        delta_t = softplus(delta_t + delta_bias)            (bias and softplus optional)
        h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t      eq (4), (2a)
        y_t = sum_n C_t h_t + D u_t, then y_t *= silu(z_t)  eq (2b); D and z optional
    Shapes follow `mamba_ssm.ops.selective_scan_interface.selective_scan_fn`:
        u, delta, z: (b, d, l); A: (d, n), real, negative; D, delta_bias: (d,)
        B, C: (b, g, n, l), group k shared by channels k*d/g .. (k+1)*d/g - 1; or (b, n, l), g = 1
    Returns y (b, d, l) [and h_l (b, d, n) if return_last_state], computed and returned in
    float32 whatever the input dtype (float64 if an input is float64)."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C = _prepare_scan(u, delta, A, B, C, delta_bias, delta_softplus)
    b, d, l = u.shape
    B, C = (v.repeat_interleave(d // v.shape[1], dim=1) for v in (B, C))    # (b, d, n, l)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))              # eq (4)
    deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)              # B_bar u = delta B u
    h, ys = u.new_zeros(b, d, A.shape[1]), []                               # (b, d, n)
    for dA_t, dBu_t, C_t in zip(deltaA.unbind(2), deltaB_u.unbind(2), C.unbind(3)):
        h = dA_t * h + dBu_t                                                # eq (2a)
        ys.append((h * C_t).sum(-1))                                        # eq (2b), (b, d)
    y = _skip_and_gate(torch.stack(ys, dim=-1), u, D, z)                    # (b, d, l)
    return (y, h) if return_last_state else y


_CHUNK, _SLAB_ELEMENTS = 8, 2 ** 21             # CPU: T, and state elements in a slab (8 MB)
_GPU_CHUNK, _GPU_SLAB_ELEMENTS = 32, 2 ** 23    # elsewhere: T, and elements per slab and sample
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


def _slab_sizes(device, b, dn, l):
    """(T, S): time steps per chunk and per slab of the parallel scan, for b samples of d*n states.
    A CPU gets cache-sized slabs. On a GPU each op is a kernel launch, so chunks are long and slabs
    few: 2^23 state elements per sample (256 MB per slab temporary at b = 8, d*n = 16384; forward
    holds two, backward three), independent of b, so the batch size never changes S or a graph."""
    T, chunks = ((_CHUNK, _SLAB_ELEMENTS // (_CHUNK * b * dn)) if device.type == "cpu" else
                 (_GPU_CHUNK, _GPU_SLAB_ELEMENTS // (_GPU_CHUNK * dn)))
    return T, T * max(1, min(chunks, math.ceil(l / T)))


def _chunked_linear_scan(a, x, h0, chunk, reverse=False):
    """Scan h_t = a_t h_{t-1} + x_t along dim 0 from h_{-1} = h0, in place: x becomes h.

    a, x: (S, ...) with S a multiple of `chunk`, a_t in [0, 1]; h0: (...). With reverse=True time
    runs backwards, h_t = a_t h_{t+1} + x_t from h_S = h0. Returns the last state computed.

    Why this equals the loop: T steps of the recurrence compose to the affine map
    h -> (a_T ... a_1) h + e, where e is what the T steps produce from a zero state. So
    (1) scan all S/T chunks at once from zero (one op per position in the chunk), which gives
    every chunk's e and, as a product, its decay; (2) chain these maps chunk after chunk to get
    each chunk's true start state; (3) rescan all chunks at once from their start states. Only
    products of numbers in [0, 1] are formed, never a division by a cumulative decay nor the
    exponential of a cumulative sum, so it is exact at any step size (underflow to 0 is the limit).
    """
    nc = x.shape[0] // chunk
    a, x = a.view(nc, chunk, *a.shape[1:]), x.view(nc, chunk, *x.shape[1:])  # (nc, T, ...)
    at, xt = a.unbind(1), x.unbind(1)                                       # T views (nc, ...)
    steps, chunks = (range(chunk)[::-1], range(nc)[::-1]) if reverse else (range(chunk), range(nc))
    start = torch.empty_like(xt[0])                                         # (nc, ...)
    start[chunks[0]] = h0
    if nc > 1:  # (1) every chunk from a zero state, all at once: its end state e and its decay
        end = xt[steps[0]].clone()                                          # (nc, ...)
        for t in steps[1:]:
            torch.addcmul(xt[t], at[t], end, out=end)                       # eq (2a)
        e, decay = end.unbind(0), a.prod(dim=1).unbind(0)                   # nc views (...) each
        # (2) chain the chunks: start_c = decay_{c-1} start_{c-1} + e_{c-1}
        for prev, c in zip(chunks, chunks[1:]):
            torch.addcmul(e[prev], decay[prev], start[prev], out=start[c])  # eq (2a), per chunk
    # (3) rescan every chunk from its start state, all at once, in place. Note: compiled, new
    # tensors stacked into x once instead: Inductor fuses those, not step-by-step writes into x.
    h, hs = start, [None] * chunk
    for t in steps:
        h = hs[t] = torch.addcmul(xt[t], at[t], h) if _compiling() else xt[t].addcmul_(at[t], h)
    if _compiling():
        x.copy_(torch.stack(hs, 1))
    return h[chunks[-1]].clone()


def _time_major(v, L, *shape):
    """(b, ..., l) -> (L, *shape): time first, zero-padded to L steps."""
    v = v.reshape(-1, v.shape[-1])                                          # (b ..., l)
    v = F.pad(v, (0, L - v.shape[-1])) if L > v.shape[-1] else v            # (b ..., L)
    return v.t().contiguous().view(L, *shape)                               # (L, b, ...)


def _scan_slab(dt, dtu, A, Bt, Ct, h0, T, work=(None, None)):
    """The forward over one slab of S steps from the state h0 (b, g, d/g, n) before it. dt, dtu:
    delta, delta*u (S, b, g, d/g, 1); A (g, d/g, n); Bt, Ct (S, b, g, 1, n) -> y (S, b, g, d/g),
    h at the slab's end (b, g, d/g, n). `work`: two (S, b, g, d/g, n) buffers, or new ones."""
    a = torch.mul(dt, A, out=work[0]).exp_()                                # eq (4)
    h = torch.mul(dtu, Bt, out=work[1])                                     # x_t = delta_t B_t u_t
    last = _chunked_linear_scan(a, h, h0, T)                                # eq (2a), x -> h
    return h.mul_(Ct).sum(-1), last                                         # eq (2b)


def _adjoint_slab(dt, dtu, A, Bt, Ct, gyt, h0, carry, T, work=(None, None, None)):
    """The backward over one slab (`_SelectiveScanFn.backward`) from the state h0 before it and
    the adjoint `carry` after it; dt has S + 1 steps (a_{t+1}), gyt is like dtu, the rest as in
    `_scan_slab`. -> the adjoint before the slab, d(delta u) and sum_n q A (S, b, g, d/g), dB and
    dC (S, b, g, n), and this slab's part of dA (g, d/g, n). `work`: a, h, gh buffers, or new."""
    (S, b, g, e, _), n = dtu.shape, h0.shape[-1]
    a = torch.mul(dt, A, out=work[0]).exp_()                                # a_t, s0 <= t <= s0+S
    h = h0.new_empty(S + 1, b, g, e, n) if work[1] is None else work[1]     # h_t, s0-1 <= t < s0+S
    h[0] = h0
    torch.mul(dtu, Bt, out=h[1:])                                           # x_t = delta_t B_t u_t
    _chunked_linear_scan(a[:S], h[1:], h0, T)                               # eq (2a), recomputed
    gh = torch.mul(gyt, Ct, out=work[2])                                    # C_t gy_t
    carry = _chunked_linear_scan(a[1:], gh, carry, T, reverse=True)         # adjoint of eq (2a)
    gC = torch.bmm(gyt.view(-1, 1, e), h[1:].view(-1, e, n)).view(S, b, g, n)      # dC
    gB = torch.bmm(dtu.view(-1, 1, e), gh.view(-1, e, n)).view(S, b, g, n)         # dB
    ah = a[:S].mul_(h[:S])                                                  # a_t h_{t-1}
    scratch = h[1:]                                                         # h_t is used up
    g_dtu = torch.mul(gh, Bt, out=scratch).sum(4)                           # d(delta u)
    q = gh.mul_(ah)                                                         # q_t = gh_t a_t h_{t-1}
    g_dtA = torch.mul(q, A, out=scratch).sum(4)                             # via a_t = exp(dt_t A)
    return carry, g_dtu, g_dtA, gB, gC, torch.mul(q, dt[:S], out=scratch).sum((0, 1))  # ..., dA


class _SelectiveScanFn(torch.autograd.Function):
    """(y, h_l) of eq (4), (2a), (2b) from h_0 = 0. u, delta (b, d, l), delta after softplus; A
    (d, n); B, C (b, g, n, l). Time is padded with delta = 0 (a = 1, x = 0) to whole slabs of S
    steps, each cut into chunks of T steps (`_slab_sizes`, `_chunked_linear_scan`). Saved: the
    inputs and the state at each slab start; backward recomputes the states slab by slab, so
    memory is O(b d l) plus one slab's (S, b, g, d/g, n) temporaries, never (b, d, l, n) states."""
    @staticmethod
    def layouts(u, delta, B, C, L):
        """delta (L+1, b, g, d/g, 1) (one step more: backward needs a_{t+1}), delta*u
        (L, b, g, d/g, 1), B and C (L, b, g, 1, n): time-major, channels in their B/C groups."""
        (b, d, _), (g, n) = u.shape, B.shape[1:3]
        return (_time_major(delta, L + 1, b, g, d // g, 1), _time_major(delta * u, L, b, g, d // g, 1),
                _time_major(B, L, b, g, 1, n), _time_major(C, L, b, g, 1, n))

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        (b, d, l), (g, n) = u.shape, B.shape[1:3]
        T, S = _slab_sizes(u.device, b, d * n, l)
        L = S * math.ceil(l / S)                                            # padded length
        A = A.reshape(g, d // g, n)                                         # (g, d/g, n)
        dt, dtu, Bt, Ct = _SelectiveScanFn.layouts(u, delta, B, C, L)       # time-major
        states, ys = [u.new_zeros(b, g, d // g, n)], []                     # h before each slab
        work = _workspace(u, [S, S], b, g, d // g, n)                       # (S, b, g, d/g, n) x 2
        for sl in (slice(s0, s0 + S) for s0 in range(0, L, S)):
            y, last = _run_slab(_scan_slab, work, dt[sl], dtu[sl], A, Bt[sl], Ct[sl], states[-1], T)
            ys.append(y)
            states.append(last)
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(states[:-1]))
        ctx.sizes = T, S, L
        y = torch.cat(ys)[:l].flatten(1).t().contiguous().view(b, d, l)     # (b, d, l)
        return y, states[-1].view(b, d, n)

    @staticmethod
    def backward(ctx, gy, g_last):
        """The adjoint gh_t = dLoss/dh_t runs the same recurrence backwards in time,
            gh_t = a_{t+1} gh_{t+1} + C_t gy_t,  gh_l = g_last,
        and with q_t = gh_t a_t h_{t-1} (a_t = exp(delta_t A), x_t = delta_t B_t u_t):
            dC_t = sum_(d in group) gy_t h_t          dB_t = sum_(d in group) gh_t delta_t u_t
            du_t = delta_t sum_n gh_t B_t             ddelta_t = u_t sum_n gh_t B_t + sum_n q_t A
            dA = sum_(b, t) q_t delta_t"""
        u, delta, A, B, C, states = ctx.saved_tensors
        (T, S, L), (b, d, l), (g, n) = ctx.sizes, u.shape, B.shape[1:3]
        dt, dtu, Bt, Ct = _SelectiveScanFn.layouts(u, delta, B, C, L)       # time-major
        gyt = _time_major(gy, L, b, g, d // g, 1)                           # (L, b, g, d/g, 1)
        carry, grads = g_last.reshape(b, g, d // g, n), []                  # gh just after a slab
        work = _workspace(u, [S + 1, S + 1, S], b, g, d // g, n)            # a, h, gh
        for k, s0 in reversed(list(enumerate(range(0, L, S)))):
            sl = slice(s0, s0 + S)
            carry, *g_slab = _run_slab(_adjoint_slab, work, dt[s0:s0 + S + 1], dtu[sl], A,
                                       Bt[sl], Ct[sl], gyt[sl], states[k], carry, T)
            grads.insert(0, g_slab)
        g_dtu, g_dtA, gB, gC = (torch.cat(v)[:l].flatten(1).t().contiguous().view(shape) for
                                v, shape in zip(zip(*grads), [u.shape] * 2 + [B.shape] * 2))
        gA = sum(g_slab[4] for g_slab in grads).view(d, n)                  # (d, n)
        return g_dtu * delta, g_dtu * u + g_dtA, gA, gB, gC     # (b, d, l) x 2, (b, g, n, l) x 2


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """The selective scan in pure PyTorch, parallel over chunks of time: the default backend.
    Same signature, shapes and result as `selective_scan_ref` (up to float32 rounding); any
    device, eager or compiled (`set_scan_compile`). Returns float32 even under autocast; gradients
    reach the inputs in their own dtype, and from the last state too (`_SelectiveScanFn`)."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    with torch.autocast(u.device.type, enabled=False):
        u, delta, A, B, C = _prepare_scan(u, delta, A, B, C, delta_bias, delta_softplus)
        y, last_state = _SelectiveScanFn.apply(u, delta, A, B, C)           # eq (4), (2a), (2b)
        y = _skip_and_gate(y, u, D, z)                                      # (b, d, l)
    return (y, last_state) if return_last_state else y


# Backend choice: the kernel and torch.compile are each tried once; a failure warns, falls back.
_KERNEL_DEVICE_TYPE = "cuda"    # the only device type the mamba-ssm kernel runs on
_mamba_works = None             # None until probed, then True or False
_last_backend = None            # what the last selective_scan ran (see last_scan_backend)
_scan_compile = "off"           # see set_scan_compile
_compiled, _compile_error = {}, None  # slab function -> its torch.compile'd form; why it failed


def last_scan_backend():
    """Which backend ran the last `selective_scan`: "mamba", "torch-compiled", "torch" or "ref"."""
    return _last_backend


def set_scan_compile(mode):
    """Whether the PyTorch scan runs its slab functions through torch.compile: "off" (default)
    never, "auto" for CUDA tensors, "on" on any device (a CPU needs a C++ compiler). Off by
    default: on a 2-core CPU a new scan shape took 12-37 s to compile forward, 29-127 s backward;
    not measured on a GPU yet. Where it cannot compile (no Triton or C++ compiler, MPS, an old
    torch) the scan runs eager."""
    global _scan_compile
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"set_scan_compile: mode must be 'auto', 'on' or 'off', not {mode!r}")
    _scan_compile = mode


def _workspace(u, steps, *shape):
    """Buffers the eager scan reuses slab after slab, or None to compile (`set_scan_compile`)."""
    mode = "on" if _scan_compile == "auto" and u.device.type == "cuda" else _scan_compile
    return None if mode == "on" and not _compile_error else [u.new_empty(S, *shape) for S in steps]


def _run_slab(fn, work, *args):
    """fn(*args, work) eagerly, or fn(*args) through torch.compile if `work` is None."""
    global _last_backend, _compile_error
    if work is None and not _compile_error:
        try:  # a graph per (S, T, shapes but b): copies at offset 0, b dynamic (dim 1, states 0)
            if fn not in _compiled:
                _compiled[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
            args = [t.clone() for t in args[:-1]] + [args[-1]]
            for t in (t for t in args[:-1] if t.dim() != 3):  # not A (g, d/g, n): no batch axis
                torch._dynamo.maybe_mark_dynamic(t, 1 if t.dim() == 5 else 0)
            with torch._dynamo.config.patch(recompile_limit=64):  # a graph per scan shape, not 8
                out = _compiled[fn](*args)
            _last_backend = "torch-compiled"
            return out
        except Exception as error:  # torch, Triton or the C++ compiler: any failure means eager
            if isinstance(error, torch.cuda.OutOfMemoryError):          # not a compile failure
                raise
            _compile_error = f"{type(error).__name__}: {(str(error) or '?').splitlines()[0]}"
            warnings.warn(f"torch.compile cannot compile the selective scan on {args[0].device} "
                          f"({_compile_error}); using the eager scan", RuntimeWarning, stacklevel=2)
    return fn(*args, work or (None,) * 3)


def _mamba_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                return_last_state=False):
    """mamba-ssm's `selective_scan_fn` on float32 copies, so it returns float32 like the others."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    f32 = [t if t is None else t.float() for t in (u, delta, A, B, C, D, z, delta_bias)]
    with torch.autocast(u.device.type, enabled=False):
        return _mamba_scan_fn(*f32, delta_softplus, return_last_state)


def _mamba_kernel_works(device):
    """Whether the mamba-ssm kernel runs: tried once on a tiny scan on `device`, then remembered."""
    global _mamba_works
    if _mamba_works is None and _mamba_scan_fn is not None:
        u, BC = torch.ones(1, 2, 8, device=device), torch.ones(1, 1, 4, 8, device=device)
        try:
            _mamba_scan(u, u, -torch.ones(2, 4, device=device), BC, BC)     # (b, d, l), (b, g, n, l)
            _mamba_works = True
        except (AttributeError, RuntimeError, NotImplementedError) as error:
            warnings.warn(f"mamba-ssm is installed but its selective-scan kernel fails on {device} "
                          f"({type(error).__name__}: {error}); using the PyTorch scan",
                          RuntimeWarning, stacklevel=3)
    _mamba_works = bool(_mamba_works)
    return _mamba_works


def _describe(x):
    """Shape and dtype of a tensor (lists of those for lists/tuples), for error messages."""
    return (f"shape {tuple(x.shape)} ({x.dtype})" if isinstance(x, torch.Tensor) else
            f"[{', '.join(map(_describe, x))}]" if isinstance(x, (list, tuple)) else type(x).__name__)


def _fits(t, *shape):
    """Whether t is a real floating-point tensor of this shape (None: any size)."""
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == len(shape)
            and all(s in (None, size) for s, size in zip(shape, t.shape)))


def _require(ok, message):
    """The one-line ValueError for bad input: `message` names the argument, what it got, the fix."""
    if not ok:
        raise ValueError(message)


def _check_scan_args(u, delta, A, B, C, D, z, delta_bias):
    """Shapes and dtypes only (no data is read); every backend starts with it."""
    def fail(name, t, expected):
        raise ValueError(f"selective_scan: {name} has {_describe(t)}, expected {expected}")
    if not _fits(u, None, None, None) or min(u.shape) < 1:
        fail("u", u, "a floating-point (b, d, l) tensor with b, d, l >= 1")
    b, d, l = u.shape
    if not _fits(A, d, None) or A.shape[1] < 1:
        fail("A", A, f"a real floating-point (d, n) tensor with d = {d}, n >= 1")
    n = A.shape[1]
    g = B.shape[1] if _fits(B, b, None, n, l) else 1
    for name, t, shape in [("delta", delta, (b, d, l)), ("z", z, (b, d, l)), ("D", D, (d,)),
                           ("delta_bias", delta_bias, (d,))]:
        if (name == "delta" or t is not None) and not _fits(t, *shape):
            fail(name, t, f"a floating-point tensor of shape {shape}")
    if not (_fits(B, b, n, l) or _fits(B, b, g, n, l) and g and d % g == 0):
        fail("B", B, f"(b, n, l) = {(b, n, l)} or (b, g, n, l) with g dividing d = {d}")
    if not _fits(C, *B.shape):
        fail("C", C, f"the shape of B, {tuple(B.shape)}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, backend="auto"):
    """The selective scan, eq (4), (2a), (2b): arguments, shapes and result as `selective_scan_ref`.

    backend: "auto" runs the mamba-ssm CUDA kernel for CUDA tensors when it is installed and
    works, else the PyTorch parallel scan; "torch" the parallel scan (any device); "ref" the loop;
    "mamba" the kernel, or a RuntimeError when it cannot run. `last_scan_backend()` tells which
    ran. The kernel does not back-propagate into the returned last state; the others do."""
    global _last_backend
    if backend in ("auto", "mamba"):
        kernel_ok = u.device.type == _KERNEL_DEVICE_TYPE and _mamba_kernel_works(u.device)
        if backend == "mamba" and not kernel_ok:
            raise RuntimeError("backend='mamba' needs CUDA tensors and mamba-ssm with a working "
                               "kernel (pip install mamba-ssm)")
        backend = "mamba" if kernel_ok else "torch"
    scans = {"mamba": _mamba_scan, "torch": selective_scan_torch, "ref": selective_scan_ref}
    if backend not in scans:
        raise ValueError(f"backend must be 'auto', 'torch', 'ref' or 'mamba', not {backend!r}")
    _last_backend = backend
    return scans[backend](u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


# 2. Cross-scan and cross-merge: VMRNN Eqs. (7) and (9) --------------------------------------------

def cross_scan(x):
    """Unfold a feature map into the four scan orders of SS2D ("scan expand", Eq. 7): x (b, d, H, W)
    -> (b, k=4, d, l): row-major (h, w), column-major (w, h), and both reversed."""
    rows = x.flatten(2)                                  # (b, d, l)  order (h, w)
    cols = x.transpose(2, 3).flatten(2)                  # (b, d, l)  order (w, h)
    xs = torch.stack([rows, cols], dim=1)                # (b, 2, d, l)
    return torch.cat([xs, xs.flip(-1)], dim=1)           # (b, 4, d, l)           eq (7)


def cross_merge(ys, H, W):
    """Fold the four scanned sequences back onto the grid and sum them ("scan merge", Eq. 9):
    ys (b, k=4, d, l) -> (b, d, l) in row-major order. cross_merge(cross_scan(x)) == 4 * x."""
    b, _, d, l = ys.shape
    ys = ys[:, :2] + ys[:, 2:].flip(-1)                  # (b, 2, d, l)  undo the reversals
    rows, cols = ys.unbind(1)                            # (b, d, l) each
    cols = cols.view(b, d, W, H).transpose(2, 3)         # (b, d, H, W)  undo the transposition
    return rows + cols.flatten(2)                        # (b, d, l)              eq (9)


# 3. SS2D: VMRNN Fig. 2(c) (VMamba's 2D selective scan, "v0") --------------------------------------

class SS2D(nn.Module):
    """2D selective scan: in_proj -> depthwise conv -> 4-direction S6 -> merge -> norm, gate, out_proj.
    x (b, H, W, c) -> (b, H, W, c). Parameter names are VMamba's (x_proj_weight, dt_projs_weight,
    dt_projs_bias, A_logs, Ds, ...), so the authors' checkpoints load without renaming them. The
    per-direction projections are stacked along a leading k axis instead of four modules."""
    def __init__(self, d_model, d_state=16, d_conv=3, expand=2, dropout=0.0, scan_backend="auto"):
        super().__init__()
        k, self.d_state, self.scan_backend = 4, d_state, scan_backend
        self.d_inner = d_inner = expand * d_model
        self.dt_rank = dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner)
        # Per direction: x -> (dt, B, C), then dt (rank r) -> delta (d channels).
        self.x_proj_weight = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))   # A = -exp(A_logs)
        self.Ds = nn.Parameter(torch.empty(k * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4):
        """Mamba's initialisation (SPEC §2): S4D-real A, D = 1, dt log-uniform in [dt_min, dt_max]."""
        # x_proj_weight: what nn.Linear(d_inner, r + 2n) would draw, U(-1/sqrt(d), 1/sqrt(d)).
        nn.init.uniform_(self.x_proj_weight, -self.d_inner ** -0.5, self.d_inner ** -0.5)
        nn.init.uniform_(self.dt_projs_weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        log_dt = torch.empty_like(self.dt_projs_bias).uniform_(math.log(dt_min), math.log(dt_max))
        dt = log_dt.exp().clamp(min=dt_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))     # softplus^-1(dt)
        n = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_logs.copy_(torch.log(n).expand_as(self.A_logs))          # A[:, n] = -(n + 1)
        self.Ds.fill_(1.0)

    def forward(self, x):
        b, H, W, _ = x.shape
        k, d, n, r = 4, self.d_inner, self.d_state, self.dt_rank
        x, z = self.in_proj(x).chunk(2, dim=-1)          # (b, H, W, d) each
        x = x.permute(0, 3, 1, 2)                        # (b, d, H, W)
        x = F.silu(self.conv2d(x))                       # (b, d, H, W)
        xs = cross_scan(x)                               # (b, k, d, l)           eq (7)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)    # (b, k, r + 2n, l)
        dts, Bs, Cs = torch.split(x_dbl, [r, n, n], dim=2)               # (b, k, r|n|n, l)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)  # (b, k, d, l)
        y = selective_scan(                              # (b, k*d, l) float32    eq (8)
            xs.flatten(1, 2), dts.flatten(1, 2), -torch.exp(self.A_logs.float()), Bs, Cs,
            self.Ds.float(), delta_bias=self.dt_projs_bias.float().flatten(), delta_softplus=True,
            backend=self.scan_backend)
        y = cross_merge(y.view(b, k, d, H * W), H, W)    # (b, d, l)              eq (9)
        y = y.transpose(1, 2).reshape(b, H, W, d)        # (b, H, W, d)
        y = self.out_norm(y).to(x.dtype) * F.silu(z)     # (b, H, W, d)
        return self.dropout(self.out_proj(y))            # (b, H, W, c)


# 4. VSS block as used inside the VMRNN cell: VMRNN Fig. 2(b) --------------------------------------

def drop_path(x, p, training):
    """Stochastic depth: zero the whole residual branch of a sample with probability p."""
    if p == 0.0 or not training:
        return x
    return x * x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p) / (1 - p)


class VSSBlock(nn.Module):
    """x + DropPath(SS2D(LN(x))); the first block of a cell also mixes in the hidden state.
    x, h_state (b, l, c) -> (b, l, c). With h_state the SS2D input is LP([LN(x); LN(h_state)]),
    LP = Linear(2c -> c) (Fig. 2(b)), one LayerNorm shared by both; the residual is x alone.

    Note: the authors allocate LP in every block and use it only in the first; here only the
    block that takes the hidden state has it (`takes_hidden=True`), so no parameter is dead."""
    def __init__(self, dim, grid, takes_hidden, drop_path_rate=0.0, d_state=16, dropout=0.0,
                 scan_backend="auto"):
        super().__init__()
        self.grid, self.drop_path_rate = grid, drop_path_rate
        self.norm = nn.LayerNorm(dim)                    # PyTorch's eps 1e-5, as the authors'
        self.lp = nn.Linear(2 * dim, dim) if takes_hidden else None
        self.ss2d = SS2D(dim, d_state=d_state, dropout=dropout, scan_backend=scan_backend)

    def forward(self, x, h_state=None):
        if (h_state is None) != (self.lp is None):
            raise ValueError("the hidden state goes to the first block of a cell, and only there")
        b, l, c = x.shape
        y = self.norm(x)                                 # (b, l, c)
        if h_state is not None:
            y = self.lp(torch.cat([y, self.norm(h_state)], dim=-1))      # (b, l, 2c) -> (b, l, c)
        y = self.ss2d(y.view(b, *self.grid, c))          # (b, H, W, c)
        return x + drop_path(y.view(b, l, c), self.drop_path_rate, self.training)


# 5. VMRNN cell: VMRNN Eqs. (4)-(6), Fig. 2(a) -----------------------------------------------------

class VMRNNCell(nn.Module):
    """One recurrent step: O_t from a stack of VSS blocks, then an LSTM-style state update.
    x (b, l, c), state None or (h_state, c_state) each (b, l, c) -> (h_state, (h_state, c_state)).
    A state of None means zeros. `cell_update` picks the cell-state update:
      "code"  (default) C_t = F_t * (C_{t-1} + tanh(O_t)), the authors' code, published numbers;
      "paper" C_t = F_t * tanh(O_t) + C_{t-1}, the paper's Eq. (5)."""
    def __init__(self, dim, grid, depth, drop_path_rates, d_state=16, dropout=0.0,
                 cell_update="code", scan_backend="auto"):
        super().__init__()
        _require(cell_update in ("code", "paper"), f"cell_update must be 'code' or 'paper', got "
                 f"{cell_update!r}")
        _require(depth >= 1, f"a VMRNN cell needs at least one VSS block, got depth={depth}")
        self.cell_update = cell_update
        self.state_shape = (grid[0] * grid[1], dim)      # (l, c) of h_state and c_state
        self.blocks = nn.ModuleList(VSSBlock(dim, grid, i == 0, drop_path_rates[i], d_state,
                                             dropout, scan_backend) for i in range(depth))

    def forward(self, x, state=None):
        h_state, c_state = (torch.zeros_like(x), torch.zeros_like(x)) if state is None else state
        o = self.blocks[0](x, h_state)
        for block in self.blocks[1:]:
            o = block(o)                                 # O_t = VSB(...VSB(X_t, H_{t-1}))  eq (4)
        f = torch.sigmoid(o)                             # F_t = sigmoid(O_t)               eq (4)
        if self.cell_update == "paper":
            c_state = f * torch.tanh(o) + c_state        # paper                            eq (5)
        else:
            # Note: the authors' code (and checkpoint) gates the previous cell state too.
            c_state = f * (c_state + torch.tanh(o))      # authors' code, in place of       eq (5)
        h_state = f * torch.tanh(c_state)                # H_t = F_t * tanh(C_t)            eq (6)
        return h_state, (h_state, c_state)


# 6. VMRNN-B and VMRNN-D: VMRNN Fig. 3, Table 1 ----------------------------------------------------

class PatchEmbed(nn.Module):
    """Frame -> tokens: Conv2d(kernel = stride = p), flatten, LayerNorm. (b, C, h, w) -> (b, l, c)."""
    def __init__(self, patch_size, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, frame):
        return self.norm(self.proj(frame).flatten(2).transpose(1, 2))   # (b, l, c)


class PatchInflate(nn.Module):
    """Tokens -> frame ("patch inflated" in the authors' code): transposed convolutions, x2 each.
    (b, l, c) -> (b, C, h, w) logits. For p > 2 the authors first apply p // 4 stages of
    [ConvTranspose2d(c -> c), GroupNorm(16, c), LeakyReLU(0.2)], then ConvTranspose2d(c -> C)."""
    def __init__(self, patch_size, in_chans, dim, grid):
        super().__init__()
        self.grid = grid
        up = dict(kernel_size=3, stride=2, padding=1, output_padding=1)
        self.up = nn.Sequential(*[m for _ in range(patch_size // 4) for m in (
            nn.ConvTranspose2d(dim, dim, **up), nn.GroupNorm(16, dim), nn.LeakyReLU(0.2))])
        self.out = nn.ConvTranspose2d(dim, in_chans, **up)

    def forward(self, x):
        x = x.transpose(1, 2).reshape(x.shape[0], -1, *self.grid)       # (b, c, H, W)
        return self.out(self.up(x))                      # (b, C, h, w)


class PatchMerging(nn.Module):
    """Halve the grid, double the width (Swin): 2x2 neighbours -> LayerNorm(4w) -> Linear(4w -> 2w)."""
    def __init__(self, dim, grid):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        x = x.view(x.shape[0], *self.grid, -1)           # (b, H, W, w)
        # Neighbour order (0,0), (1,0), (0,1), (1,1) as (row, column), the authors' (Swin's) order.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.flatten(1, 2)))                # (b, l/4, 2w)


class PatchExpanding(nn.Module):
    """Double the grid, halve the width (Swin-Unet): Linear(w -> 2w), each token -> 2x2 of w/2."""
    def __init__(self, dim, grid):
        super().__init__()
        self.grid = grid
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x):
        (b, _, _), (H, W) = x.shape, self.grid
        x = self.expand(x).view(b, H, W, 2, 2, -1)       # (b, H, W, p1, p2, w/2)
        return self.norm(x.permute(0, 1, 3, 2, 4, 5).reshape(b, 4 * H * W, -1))  # (b, 2H*2W, w/2)


class _Forecaster(nn.Module):
    """What VMRNN-B and VMRNN-D share: input checks, the patch embedding, and the rollout.
    Set `checkpoint_steps = True` to trade compute for memory in training: each frame step of the
    rollout then keeps only its inputs, and backward recomputes it (same result, same drop path)."""
    def __init__(self, img_size, patch_size, in_chans, embed_dim, d_state, drop_path_rate, dropout):
        super().__init__()
        for name, value in [("in_chans", in_chans), ("embed_dim", embed_dim), ("d_state", d_state)]:
            _require(value >= 1, f"{name} must be >= 1, got {value!r}")
        for name, value in [("drop_path_rate", drop_path_rate), ("dropout", dropout)]:
            _require(0 <= value < 1, f"{name} is a probability in [0, 1), got {value!r}")
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        _require(patch_size in (2, 4, 8), f"patch_size must be 2, 4 or 8 (the reconstruction head "
                 f"upsamples by 2 * 2**(p // 4), which equals p only for those), got {patch_size}")
        _require(h % patch_size == w % patch_size == 0, f"image size {h}x{w} is not divisible by "
                 f"patch_size {patch_size}: crop or pad frames to a multiple of {patch_size}")
        _require(patch_size == 2 or embed_dim % 16 == 0, f"embed_dim {embed_dim} must be divisible "
                 f"by 16, the GroupNorm groups of the reconstruction head used when patch_size > 2")
        self.img_size, self.in_chans = (h, w), in_chans
        self.grid = H, W = (h // patch_size, w // patch_size)
        _require(H % 2 == W % 2 == 0, f"the patch grid {H}x{W} must be even: use an image size "
                 f"that is a multiple of {2 * patch_size}")
        self.embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.head = PatchInflate(patch_size, in_chans, embed_dim, self.grid)
        self.checkpoint_steps = False

    def _check_step(self, frame, state, cells):
        """A ValueError unless frame is a floating-point (b, C, h, w) and state is None or, per
        cell of `cells`, (h_state, c_state) each (b, l, c) as that cell expects."""
        (C, h, w), many = (self.in_chans, *self.img_size), len(cells) > 1
        _require(_fits(frame, None, C, h, w), f"expected a floating-point frame of shape (b, {C}, "
                 f"{h}, {w}), got {_describe(frame)}")
        pairs, shapes = state if many else [state], [(len(frame), *c.state_shape) for c in cells]
        if state is not None and not (isinstance(pairs, (list, tuple)) and len(pairs) == len(cells)
                                      and all(isinstance(p, (list, tuple)) and len(p) == 2 and
                                              _fits(p[0], *s) and _fits(p[1], *s)
                                              for p, s in zip(pairs, shapes))):
            raise ValueError(f"state must be None or {'per cell ' if many else ''}(h_state, "
                             f"c_state) of shapes {shapes if many else shapes[0]} (b, l, c), got "
                             f"{_describe(state)}")

    def forward(self, frames, pred_len):
        """The authors' rollout (SPEC §5), identical in training and test:
        frames (b, t_in, C, h, w) in [0, 1] -> (b, t_in - 1 + pred_len, C, h, w): the next-frame
        predictions for frames 1..t_in-1 (teacher-forced), then pred_len closed-loop predictions
        that start from the last observed frame and feed each prediction back in."""
        C, h, w = self.in_chans, *self.img_size
        _require(_fits(frames, None, None, C, h, w) and frames.shape[1] >= 1, f"expected frames of "
                 f"shape (b, t, {C}, {h}, {w}), floating point, t >= 1, got {_describe(frames)}")
        _require(isinstance(pred_len, int) and pred_len >= 0,
                 f"pred_len must be an integer >= 0, got {pred_len!r}")
        step = self.step          # with checkpoint_steps, backward recomputes each frame step:
        if self.checkpoint_steps and torch.is_grad_enabled():
            step = lambda *args: checkpoint(self.step, *args, use_reentrant=False)
        state, preds, t_in = None, [], frames.shape[1]
        for t in range(t_in - 1 + pred_len):             # input: frame t, then the last prediction
            pred, state = step(frames[:, t] if t < t_in else preds[-1], state)
            preds.append(pred)
        return torch.stack(preds, dim=1)                 # (b, t_in - 1 + pred_len, C, h, w)


class VMRNN_B(_Forecaster):
    """VMRNN-B (Fig. 3, left): patch embedding -> one VMRNN cell -> reconstruction.
    `step(frame, state)` advances one frame: frame (b, C, h, w), state None or (h_state, c_state)
    -> (prediction of the next frame (b, C, h, w) in (0, 1), new state).
    Stochastic depth uses the same rate in every block, as the authors' code does."""
    def __init__(self, img_size, patch_size, in_chans, embed_dim=128, depth=6, d_state=16,
                 drop_path_rate=0.1, dropout=0.0, cell_update="code", scan_backend="auto"):
        super().__init__(img_size, patch_size, in_chans, embed_dim, d_state, drop_path_rate, dropout)
        self.cell = VMRNNCell(embed_dim, self.grid, depth, [drop_path_rate] * depth, d_state,
                              dropout, cell_update, scan_backend)

    def step(self, frame, state=None):
        self._check_step(frame, state, [self.cell])
        h_state, state = self.cell(self.embed(frame), state)
        return torch.sigmoid(self.head(h_state)), state


class VMRNN_D(_Forecaster):
    """VMRNN-D (Fig. 3, right): a Swin-Unet-like stack of cells, down then up, each with its state.
    Down level i: a cell of width c*2^i on the grid / 2^i with depths_down[i] blocks, then patch
    merging. Up level i: a cell of width c*2^(L-i) on the grid / 2^(L-i), then patch expanding.
    depths_up[j] is the depth of the up cell of width c*2^(j+1) (the authors' indexing, checked on
    their checkpoint), so the paper's (2, 6, 6, 2) is depths_down=(2, 6), depths_up=(6, 2).
    `step(frame, state)` takes and returns state as a list of (h_state, c_state), one per cell.

    Note: the authors' up path builds a second patch embedding that is never used; not here."""
    def __init__(self, img_size, patch_size, in_chans, embed_dim=128, depths_down=(2, 6),
                 depths_up=(6, 2), d_state=16, drop_path_rate=0.1, dropout=0.0, cell_update="code",
                 scan_backend="auto"):
        super().__init__(img_size, patch_size, in_chans, embed_dim, d_state, drop_path_rate, dropout)
        L, (H, W) = len(depths_down), self.grid
        _require(len(depths_up) == L >= 1, f"depths_down and depths_up need the same number (>= 1)"
                 f" of levels, got {tuple(depths_down)} and {tuple(depths_up)}")
        _require(H % 2 ** L == W % 2 ** L == 0, f"the patch grid {H}x{W} cannot be halved {L} "
                 f"times (len(depths_down)): use an image size that is a multiple of "
                 f"{patch_size * 2 ** L}, or fewer levels")
        cell = dict(d_state=d_state, dropout=dropout, cell_update=cell_update,
                    scan_backend=scan_backend)
        self.down, self.merge, self.up, self.expand = (nn.ModuleList() for _ in range(4))
        for cells, resample, depths, shift, Resample in [
                (self.down, self.merge, depths_down, 0, PatchMerging),
                (self.up, self.expand, depths_up, 1, PatchExpanding)]:
            # Stochastic depth: 0 -> drop_path_rate over the path's blocks, in order of width.
            rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
            for j in range(L) if shift == 0 else reversed(range(L)):  # j indexes depths (by width)
                level, first = j + shift, sum(depths[:j])
                dim, grid = embed_dim * 2 ** level, (H // 2 ** level, W // 2 ** level)
                cells.append(VMRNNCell(dim, grid, depths[j], rates[first:][:depths[j]], **cell))
                resample.append(Resample(dim, grid))

    def step(self, frame, state=None):
        self._check_step(frame, state, [*self.down, *self.up])
        state = state or [None] * (2 * len(self.down))
        x, new_state = self.embed(frame), []             # (b, l, c)
        for cell, resample, s in zip([*self.down, *self.up], [*self.merge, *self.expand], state):
            x, s = cell(x, s)
            new_state.append(s)
            x = resample(x)                              # merge: (b, l/4, 2w); expand: (b, 4l, w/2)
        return torch.sigmoid(self.head(x)), new_state


def paper_model(name, **overrides):
    """The Table 1 model for "mmnist", "kth" or "taxibj" (embed 128, d_state 16, drop path 0.1;
    VMRNN-D's default depths are the paper's (2, 6, 6, 2))."""
    configs = {"mmnist": (VMRNN_D, dict(img_size=64, patch_size=2, in_chans=1)),
               "kth": (VMRNN_B, dict(img_size=128, patch_size=2, in_chans=1, depth=6)),
               "taxibj": (VMRNN_B, dict(img_size=32, patch_size=4, in_chans=2, depth=12))}
    if name not in configs:
        raise ValueError(f"unknown paper model {name!r}: choose one of {sorted(configs)}")
    cls, kwargs = configs[name]
    return cls(**{**kwargs, **overrides})


# 7. Loading the authors' weights ------------------------------------------------------------------
# Official key prefix -> ours. Applied in order, first match wins; None = a weight the authors'
# model never uses (ignored). Covers their Moving-MNIST B (`ST.layers.0`), OpenSTL B (`ST.layer`)
# and Moving-MNIST / OpenSTL D (`Downsample` / `Upsample`) models.
_OFFICIAL_PREFIXES = [
    (r"^ST\.patch_embed\.", "embed."), (r"^ST\.(?:layer|layers\.0)\.VSBs\.", "cell.blocks."),
    (r"^ST\.patch_inflated\.Conv_\.", "head.up."), (r"^ST\.patch_inflated\.Conv\.", "head.out."),
    (r"^Downsample\.patch_embed\.", "embed."), (r"^Downsample\.downsample\.", "merge."),
    (r"^Downsample\.layers\.(\d+)\.VSBs\.", r"down.\1.blocks."), (r"^Upsample\.patch_embed\.", None),
    (r"^Upsample\.Unembed\.Conv_\.", "head.up."), (r"^Upsample\.Unembed\.Conv\.", "head.out."),
    (r"^Upsample\.layers\.(\d+)\.VSBs\.", r"up.\1.blocks."), (r"^Upsample\.upsample\.", "expand.")]
_OFFICIAL_BLOCK_NAMES = [(r"\.self_attention\.", ".ss2d."), (r"\.ln_1\.", ".norm."),
                         (r"\.linear\.", ".lp.")]


def check_state_dict(model, state_dict):
    """Raise a one-line ValueError unless `state_dict` fits `model` key for key and shape for shape,
    naming the first key (in the model's order) that is missing or of another shape (with both
    shapes), else the first unexpected key. Returns None."""
    ours = model.state_dict()
    extra = [key for key in state_dict if key not in ours]
    bad = next((k for k in ours if getattr(state_dict.get(k), "shape", 0) != ours[k].shape), None)
    unexpected = f" ({len(extra)} unexpected, the first {extra[0]!r})" if extra else ""
    problem = (f"{bad!r} has {_describe(state_dict[bad])}, the model's {tuple(ours[bad].shape)}"
               if bad in state_dict else f"key {bad!r} is missing{unexpected}" if bad else
               f"key {extra[0]!r} is unexpected" if extra else None)
    if problem:
        raise ValueError(f"the state dict does not fit this {type(model).__name__}: {problem}; "
                         f"check the model class and its config (embed_dim, depths, patch_size)")


def load_official_state_dict(model, state_dict):
    """Load weights saved by the authors' code into `model`; returns the keys it ignored.
    Ignored keys are the weights the authors' models allocate but never use (the 2c -> c Linear of
    every block after the first in a cell, and VMRNN-D's second patch embedding). Any other key
    that does not fit raises `check_state_dict`'s ValueError (keys named as ours)."""
    ours, loaded, ignored = model.state_dict(), {}, []
    for key, value in state_dict.items():
        name = key.removeprefix("module.")               # saved from DistributedDataParallel
        rule = next(((p, r) for p, r in _OFFICIAL_PREFIXES if re.match(p, name)), None)
        if rule is None:
            loaded[key] = value                          # unknown: check_state_dict names it
            continue
        name = rule[1] and re.sub(*rule, name)
        for pattern, replacement in _OFFICIAL_BLOCK_NAMES if name else []:
            name = re.sub(pattern, replacement, name)
        if name is None or (name not in ours and name.endswith((".lp.weight", ".lp.bias"))):
            ignored.append(key)                          # never used by the authors' forward pass
        else:
            loaded[name] = value
    check_state_dict(model, loaded)
    model.load_state_dict(loaded)
    return ignored
