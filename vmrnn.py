"""VMRNN in one file: Vision Mamba + LSTM for spatiotemporal forecasting. It implements Tang, Dong,
Tang, Chu, Liang, "VMRNN: Integrating Vision Mamba and LSTM for Efficient and Accurate Spatiotemporal
Forecasting", CVPR Workshops 2024 (https://arxiv.org/abs/2403.16536), built on VMamba's SS2D ("v0",
https://arxiv.org/abs/2401.10166) and Mamba's selective scan (S6, https://arxiv.org/abs/2312.00752).
It computes the same function as the authors' code (github.com/yyyujintang/VMRNN-PyTorch) and loads
their weights, but needs no CUDA extension: the scan is plain PyTorch (torch >= 2.4); the mamba-ssm
kernel is used only if it is installed and the tensors are on a GPU.

Contents, in the order the paper builds the model (bottom-up), then how the scan is made fast:
    1. Selective scan (S6)        Mamba Alg. 2, VMRNN Fig. 2(c), Eq. (8)   selective_scan
    2. Cross-scan / cross-merge   VMRNN Eqs. (7), (9)                      cross_scan, cross_merge
    3. SS2D                       VMRNN Fig. 2(c)                          SS2D
    4. VSS block                  VMRNN Fig. 2(b)                          VSSBlock
    5. VMRNN cell                 VMRNN Eqs. (4)-(6), Fig. 2(a)            VMRNNCell
    6. VMRNN-B and VMRNN-D        VMRNN Fig. 3, Table 1                    VMRNN_B, VMRNN_D, paper_model
    7. Loading the authors' weights                                         load_official_state_dict
    8. The fast scan (chunks, slabs, backward, one op)                      scan_forward/backward

Glossary of axis letters (used in every shape comment):
    b   batch                     t   frame index of a sequence
    H W patch grid (image / p)    l   = H*W tokens, the length of one scan
    c   model width (embed_dim)   d   inner width of SS2D (= 2c); in the scan, all k*d channels
    n   SSM state size (d_state)  k   = 4 scan directions
    r   rank of the step-size projection (dt_rank = ceil(c / 16))
    g   groups of channels that share the SSM's B and C (g = k in SS2D)
    S T the scan's slab and chunk lengths, in time steps (section 8)

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
from torch import Tensor
from torch.utils.checkpoint import checkpoint

try:  # optional CUDA kernel (state-spaces/mamba); everything below also runs without it
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_scan_fn
except ImportError:
    _mamba_scan_fn = None


# 1. Selective scan (S6): Mamba Alg. 2, VMRNN Fig. 2(c), Eq. (8) -----------------------------------
# Tags refer to the Mamba paper: eq (2a) h_t = A_bar h_{t-1} + B_bar x_t, eq (2b) y_t = C h_t,
# eq (4) A_bar = exp(delta A) (zero-order hold); Alg. 2 line 4: delta = softplus(parameter +
# s_delta(x)). As in Mamba's code, B_bar = delta B (Euler) and the SSM input x_t is called u. Three
# implementations of one signature: the loop (the reference), the parallel scan (default, section
# 8), the mamba-ssm kernel; like its `selective_scan_fn`, each computes in float32 and returns y in
# the dtype of u, the last state in float32.
def _prepare_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """What every scan does first: check the inputs, cast to float32 like the CUDA kernel (float64 if
    an input is, for the tests' oracle), delta = softplus(delta + bias), B, C grouped (b, g, n, l)."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
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
    Returns y (b, d, l) in the dtype of u [and h_l (b, d, n) in float32 if return_last_state],
    computed in float32 whatever the inputs' dtype (float64 if an input is float64)."""
    dtype = u.dtype
    u, delta, A, B, C = _prepare_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    b, d, l = u.shape
    B, C = (v.repeat_interleave(d // v.shape[1], dim=1) for v in (B, C))    # (b, d, n, l)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))              # eq (4)
    deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)              # B_bar u = delta B u
    h, ys = u.new_zeros(b, d, A.shape[1]), []                               # (b, d, n)
    for dA_t, dBu_t, C_t in zip(deltaA.unbind(2), deltaB_u.unbind(2), C.unbind(3)):
        h = dA_t * h + dBu_t                                                # eq (2a)
        ys.append((h * C_t).sum(-1))                                        # eq (2b), (b, d)
    y = _skip_and_gate(torch.stack(ys, dim=-1), u, D, z).to(dtype)          # (b, d, l)
    return (y, h) if return_last_state else y


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """The selective scan in pure PyTorch, parallel over chunks of time: the default backend, on any
    device. Same signature, shapes, dtypes and result as `selective_scan_ref` (up to rounding); the
    scan is one op, `vmrnn::selective_scan` (section 8), with a hand-written backward."""
    x = _prepare_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    y, last_state, _ = _scan_op(*x)                                         # eq (4), (2a), (2b)
    y = _skip_and_gate(y, x[0], D, z).to(u.dtype)                           # (b, d, l)
    return (y, last_state) if return_last_state else y


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, backend="auto"):
    """The selective scan, eq (4), (2a), (2b): arguments, shapes and result as `selective_scan_ref`.

    backend: "auto" the mamba-ssm kernel for CUDA tensors if it is installed (a failing first call
    warns once, then never again) and not under torch.compile (it cannot trace the kernel), else the
    parallel scan; "torch" the parallel scan; "ref" the loop; "mamba" the kernel, or its error.
    `last_scan_backend()` tells which ran. The kernel gives no gradient through the last state."""
    global _last_backend, _mamba_works
    if backend not in ("auto", "torch", "ref", "mamba"):
        raise ValueError(f"backend must be 'auto', 'torch', 'ref' or 'mamba', not {backend!r}")
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    kernel = backend == "auto" and _mamba_scan_fn is not None and u.device.type == _KERNEL_DEVICE_TYPE
    if backend == "mamba" or kernel and _mamba_works is not False and not torch.compiler.is_compiling():
        try:
            out = _mamba_scan(*args)
            _mamba_works, _last_backend = True, "mamba"
            return out
        except (AttributeError, RuntimeError, NotImplementedError) as error:
            if backend == "mamba" or _mamba_works or isinstance(error, torch.cuda.OutOfMemoryError):
                raise                                    # asked for, or it worked before: not broken
            _mamba_works = False
            warnings.warn(f"mamba-ssm is installed but its selective-scan kernel fails on {u.device} "
                          f"({type(error).__name__}: {error}); using the PyTorch scan",
                          RuntimeWarning, stacklevel=2)
    if backend == "ref":
        _last_backend = "ref"
        return selective_scan_ref(*args)
    return selective_scan_torch(*args)                  # it records "torch" or "torch-compiled"


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
        """Mamba's init (mamba-ssm's Mamba, VMamba's dt_init): S4D-real A, D = 1, log-uniform dt."""
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

        # Four directions, each with its own data-dependent delta, B and C.
        xs = cross_scan(x)                               # (b, k, d, l)           eq (7)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)    # (b, k, r + 2n, l)
        dts, Bs, Cs = torch.split(x_dbl, [r, n, n], dim=2)               # (b, k, r|n|n, l)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)  # (b, k, d, l)

        # S6 over the k*d channels in float32, as the authors' SS2D (VMamba's forward_core) does.
        As = -torch.exp(self.A_logs.float())             # (k*d, n)
        Ds, dt_bias = self.Ds.float(), self.dt_projs_bias.float().flatten()     # (k*d,) each
        y = selective_scan(xs.flatten(1, 2).float(), dts.flatten(1, 2).float(), As, Bs.float(),
                           Cs.float(), Ds, delta_bias=dt_bias, delta_softplus=True,
                           backend=self.scan_backend)    # (b, k*d, l)            eq (8)

        y = cross_merge(y.view(b, k, d, H * W), H, W)    # (b, d, l)              eq (9)
        y = y.transpose(1, 2).contiguous().view(b, H, W, d)              # (b, H, W, d)
        y = self.out_norm(y).to(x.dtype) * F.silu(z)     # (b, H, W, d)
        return self.dropout(self.out_proj(y))            # (b, H, W, c)


# 4. VSS block as used inside the VMRNN cell: VMRNN Fig. 2(b) --------------------------------------
class VSSBlock(nn.Module):
    """x + DropPath(SS2D(LN(x))); the first block of a cell also mixes in the hidden state.
    x, h_state (b, l, c) -> (b, l, c). With h_state the SS2D input is LP([LN(x); LN(h_state)]),
    LP = Linear(2c -> c) (Fig. 2(b)), one LayerNorm shared by both; the residual is x alone.
    DropPath (stochastic depth) zeroes a sample's whole branch with probability drop_path_rate.

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
        y = self.ss2d(y.view(b, *self.grid, c)).view(b, l, c)            # (b, l, c)
        if self.training and self.drop_path_rate > 0:    # DropPath, one draw per sample
            keep = 1 - self.drop_path_rate
            y = y * x.new_empty(b, 1, 1).bernoulli_(keep) / keep
        return x + y


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
        x = x.permute(0, 1, 3, 2, 4, 5)                  # (b, H, p1, W, p2, w/2)
        return self.norm(x.reshape(b, 4 * H * W, -1))    # (b, 2H*2W, w/2)


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
        C, h, w = self.in_chans, *self.img_size
        _require(_fits(frame, None, C, h, w), f"expected a floating-point frame of shape (b, {C}, "
                 f"{h}, {w}), got {_describe(frame)}")
        per_cell = len(cells) > 1                        # VMRNN-D: a list, one pair per cell
        shapes = [(len(frame), *cell.state_shape) for cell in cells]
        pairs = state if per_cell else [state]
        fits = isinstance(pairs, (list, tuple)) and len(pairs) == len(cells)
        _require(state is None or fits and all(map(_is_state_pair, pairs, shapes)),
                 f"state must be None or {'per cell ' if per_cell else ''}(h_state, c_state) of shapes "
                 f"{shapes if per_cell else shapes[0]} (b, l, c), got {_describe(state)}")

    def forward(self, frames, pred_len):
        """The authors' rollout (`model_forward_*`, OpenSTL's `forward`), the same in training and
        test: frames (b, t_in, C, h, w) in [0, 1] -> (b, t_in - 1 + pred_len, C, h, w): predictions
        of frames 1..t_in-1 (teacher-forced), then pred_len closed-loop predictions that start from
        the last observed frame and feed each prediction back in."""
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


def _linear_rates(rate, depths):
    """Stochastic depth spaced linearly from 0 to `rate` over all blocks: one list per depth."""
    rates = torch.linspace(0, rate, sum(depths)).tolist()
    return [rates[sum(depths[:j]):sum(depths[:j + 1])] for j in range(len(depths))]


class VMRNN_D(_Forecaster):
    """VMRNN-D (Fig. 3, right): a Swin-Unet-like stack of cells, down then up, each with its state.
    Down level i: a cell of width c*2^i on the grid / 2^i with depths_down[i] blocks, then patch
    merging. Up level i: a cell of width c*2^(L-i) on the grid / 2^(L-i), then patch expanding.
    depths_up[j] is the depth of the up cell of width c*2^(j+1) (the authors' indexing, checked on
    their checkpoint), so the paper's (2, 6, 6, 2) is depths_down=(2, 6), depths_up=(6, 2).
    `step(frame, state)` takes and returns state as a list of (h_state, c_state), one per cell.
    Stochastic depth rises from 0 to drop_path_rate over the down path, and again over the up path.

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
        rates = _linear_rates(drop_path_rate, depths_down)
        for i in range(L):                               # width c*2^i, grid / 2^i
            dim, grid = embed_dim * 2 ** i, (H // 2 ** i, W // 2 ** i)
            self.down.append(VMRNNCell(dim, grid, depths_down[i], rates[i], **cell))
            self.merge.append(PatchMerging(dim, grid))
        rates = _linear_rates(drop_path_rate, depths_up)
        for j in reversed(range(L)):                     # width c*2^(j+1), grid / 2^(j+1)
            dim, grid = embed_dim * 2 ** (j + 1), (H // 2 ** (j + 1), W // 2 ** (j + 1))
            self.up.append(VMRNNCell(dim, grid, depths_up[j], rates[j], **cell))
            self.expand.append(PatchExpanding(dim, grid))

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
    _require(name in configs, f"unknown paper model {name!r}: choose one of {sorted(configs)}")
    cls, kwargs = configs[name]
    return cls(**{**kwargs, **overrides})


# 7. Loading the authors' weights ------------------------------------------------------------------
# Official key prefix -> ours, in order, first match wins; None = a weight their model never uses.
# Covers Moving-MNIST B (`ST.layers.0`), OpenSTL B (`ST.layer`) and D (`Downsample` / `Upsample`).
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
    """A one-line ValueError unless `state_dict` fits `model` key for key and shape for shape: it names
    the first key (in the model's order) missing or of another shape (both shapes), or unexpected."""
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
    """Load weights saved by the authors' code (or ours: their keys pass as they are) into `model`;
    returns the keys it ignored: weights the authors' models allocate but never use (the 2c -> c
    Linear of every block after the first in a cell, VMRNN-D's second patch embedding). A key that
    does not fit raises `check_state_dict`'s ValueError (keys named as ours)."""
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


# 8. The fast scan: what `selective_scan_torch` runs -----------------------------------------------
# Chunks of T steps run in parallel; slabs of S steps bound the memory (one slab's states at a time,
# recomputed from its start state by the hand-written backward); all of it is one registered op.
def _chunked_linear_scan(a, x, h0, chunk, reverse=False):
    """Scan h_t = a_t h_{t-1} + x_t along dim 0 from h_{-1} = h0 -> (h, the last state).
    a, x: (S, ...) with S a multiple of `chunk`, a_t in [0, 1]; h0: (...). With reverse=True time
    runs backwards, h_t = a_t h_{t+1} + x_t from h_S = h0, and the last state is h_0.

    Why this equals the loop: T = `chunk` steps of the recurrence compose to the affine map
    h -> (a_T ... a_1) h + e, where e is what the T steps produce from a zero state. So (1) scan
    all S/T chunks at once from zero (one op per position in the chunk): every chunk's e and, as a
    product, its decay; (2) chain these maps chunk after chunk: each chunk's true start state;
    (3) rescan all chunks at once from their start states. Only products of numbers in [0, 1] are
    formed, never a division by a cumulative decay nor the exponential of a cumulative sum, so it
    is exact at any step size. Eagerly, (3) writes h over x (no copy); traced by torch.compile it
    stacks new tensors once, which Inductor fuses into one kernel (unlike step-by-step writes)."""
    nc = x.shape[0] // chunk
    a, x = a.view(nc, chunk, *a.shape[1:]), x.view(nc, chunk, *x.shape[1:])  # (nc, T, ...)
    at, xt = a.unbind(1), x.unbind(1)                                       # T views (nc, ...)
    steps, chunks = (range(chunk)[::-1], range(nc)[::-1]) if reverse else (range(chunk), range(nc))
    starts = [h0]                                                           # in scan order
    if nc > 1:
        e = xt[steps[0]]                                                    # (1) from zero
        for t in steps[1:]:
            e = torch.addcmul(xt[t], at[t], e)                              # eq (2a)
        e, decay = e.unbind(0), a.prod(dim=1).unbind(0)                     # nc of (...) each
        for c in chunks[:-1]:                                               # (2) chain the chunks
            starts.append(torch.addcmul(e[c], decay[c], starts[-1]))        # eq (2a), per chunk
    h = torch.stack(starts[::-1] if reverse else starts)                    # (nc, ...)
    if torch.compiler.is_compiling():                                       # (3) new tensors
        hs = [None] * chunk
        for t in steps:
            h = hs[t] = torch.addcmul(xt[t], at[t], h)                      # eq (2a)
        h = torch.stack(hs, dim=1)                                          # (nc, T, ...)
    else:                                                                   # (3) in place
        for t in steps:
            h = xt[t].addcmul_(at[t], h)                                    # eq (2a)
        h = x
    return h.flatten(0, 1), h[chunks[-1], steps[-1]].clone()


def _slab_forward(dt, dtu, A, Bt, Ct, h0, T, a=None, x=None):
    """The forward over one slab of S steps from the state h0 (b, g, d/g, n) before it, inputs
    as from `_slab_layouts` -> y (S, b, g, d/g) and the state at the slab's end. a, x: (S, b, g,
    d/g, n) buffers to write a_t and x_t into (the eager scan reuses them), or None."""
    a = torch.mul(dt, A, out=a).exp_()                                      # eq (4)
    x = torch.mul(dtu, Bt, out=x)                                           # x_t = delta_t B_t u_t
    h, last = _chunked_linear_scan(a, x, h0, T)                             # eq (2a)
    return h.mul_(Ct).sum(-1), last                                         # eq (2b), h used up


def _slab_backward(dt, dtu, A, Bt, Ct, gyt, h0, carry, T, a=None, x=None, gx=None, tmp=None):
    """The backward over one slab (see `scan_backward`) from the state h0 before it and the adjoint
    `carry` after it; dt has S + 1 steps (a_{t+1} enters), gyt is like dtu, buffers a (S + 1 steps),
    x, gx, tmp or None -> the adjoint before the slab, d(delta u) and sum_n q A (S, b, g, d/g), dB
    and dC (S, b, g, n), and this slab's part of dA (g, d/g, n)."""
    (S, b, g, e, _), n = dtu.shape, A.shape[-1]
    a = torch.mul(dt, A, out=a).exp_()                                      # a_t, S + 1 steps
    x = torch.mul(dtu, Bt, out=x)                                           # x_t = delta_t B_t u_t
    h, _ = _chunked_linear_scan(a[:S], x, h0, T)                            # eq (2a), recomputed
    gx = torch.mul(gyt, Ct, out=gx)                                         # C_t gy_t
    gh, carry = _chunked_linear_scan(a[1:], gx, carry, T, reverse=True)     # adjoint of eq (2a)
    gC = torch.bmm(gyt.view(-1, 1, e), h.view(-1, e, n)).view(S, b, g, n)          # dC
    gB = torch.bmm(dtu.view(-1, 1, e), gh.view(-1, e, n)).view(S, b, g, n)         # dB
    g_dtu = torch.mul(gh, Bt, out=tmp).sum(4)                               # sum_n gh B
    ah = a[:S]                                                              # a used up:
    ah[1:].mul_(h[:-1])                                                     # a_t h_{t-1}, with
    ah[0].mul_(h0)                                                          # h_{-1} = h0
    q = gh.mul_(ah)                                                         # q_t = gh_t a_t h_{t-1}
    g_dtA = torch.mul(q, A, out=tmp).sum(4)                                 # sum_n q A
    gA = torch.mul(q, dt[:S], out=tmp).sum((0, 1))                          # dA, this slab's part
    return carry, g_dtu, g_dtA, gB, gC, gA


_CHUNK, _SLAB_ELEMENTS = 8, 2 ** 21             # CPU: T, and state elements in a slab (8 MB)
_GPU_CHUNK, _GPU_SLAB_ELEMENTS = 32, 2 ** 23    # elsewhere: T, and elements per slab and sample


def _slab_sizes(device, b, dn, l):
    """(T, S): time steps per chunk and per slab of the parallel scan, for b samples of d*n states.
    A CPU gets cache-sized slabs. On a GPU each op is a kernel launch, so chunks are long and slabs
    few: 2^23 state elements per sample (256 MB per slab buffer at b = 8, d*n = 16384; forward
    holds two, backward four), independent of b, so the batch size never changes S or a graph."""
    T, chunks = ((_CHUNK, _SLAB_ELEMENTS // (_CHUNK * b * dn)) if device.type == "cpu" else
                 (_GPU_CHUNK, _GPU_SLAB_ELEMENTS // (_GPU_CHUNK * dn)))
    return T, T * torch.sym_max(1, torch.sym_min(chunks, -(-l // T)))     # ints, or symbolic sizes


def _time_major(v, L, *shape):
    """(b, ..., l) -> (L, *shape): time first, zero-padded to L steps."""
    v = v.reshape(-1, v.shape[-1])                                          # (b ..., l)
    v = F.pad(v, (0, L - v.shape[-1])) if L > v.shape[-1] else v            # (b ..., L)
    return v.t().contiguous().view(L, *shape)                               # (L, b, ...)


def _batch_major(v, *shape):
    """(L, ...) -> shape = (b, ..., l): the inverse of `_time_major`, padding cut off."""
    return v[:shape[-1]].flatten(1).t().contiguous().view(shape)


def _slab_layouts(u, delta, A, B, C):
    """Sizes T, S and the inputs time-major, channels in their B/C groups: delta (L + 1, b, g,
    d/g, 1) (one step more: the backward needs a_{t+1}), delta*u (L, b, g, d/g, 1), A (g, d/g, n),
    B and C (L, b, g, 1, n), where L is l padded with delta = 0 (a = 1, x = 0) to whole slabs."""
    (b, d, l), (g, n) = u.shape, B.shape[1:3]
    T, S = _slab_sizes(u.device, b, d * n, l)
    L = S * math.ceil(l / S)                                                # padded length
    dt, dtu = _time_major(delta, L + 1, b, g, d // g, 1), _time_major(delta * u, L, b, g, d // g, 1)
    Bt, Ct = _time_major(B, L, b, g, 1, n), _time_major(C, L, b, g, 1, n)
    return T, S, dt, dtu, A.reshape(g, d // g, n), Bt, Ct


def scan_forward(u, delta, A, B, C):
    """The parallel scan, eq (4), (2a), (2b) from h_0 = 0: what the op `vmrnn::selective_scan` runs.
    u, delta (b, d, l), delta after bias and softplus; A (d, n); B, C (b, g, n, l); one floating
    dtype (float32; float64 for the tests) -> y (b, d, l), the last state h_l (b, d, n) and the
    state before each slab (slabs, b, g, d/g, n), from which `scan_backward` recomputes the rest."""
    (b, d, l), (g, n) = u.shape, B.shape[1:3]
    T, S, dt, dtu, A, Bt, Ct = _slab_layouts(u, delta, A, B, C)              # time-major
    states, ys = [u.new_zeros(b, g, d // g, n)], []                         # h before each slab
    buffers = [] if _compiles(u.device) else [u.new_empty(S, b, g, d // g, n) for _ in range(2)]
    for s in range(0, dtu.shape[0], S):
        y, last = _run_slab(_slab_forward, dt[s:s + S], dtu[s:s + S], A, Bt[s:s + S],
                            Ct[s:s + S], states[-1], T, *buffers)
        ys.append(y)
        states.append(last)
    y = _batch_major(torch.cat(ys), b, d, l)                                # (b, d, l)
    return y, states[-1].view(b, d, n), torch.stack(states[:-1])


def scan_backward(u, delta, A, B, C, states, gy, g_last):
    """The hand-written backward of `scan_forward` (what `vmrnn::selective_scan_backward` runs):
    its inputs and slab start states, and the gradients gy (b, d, l) of y and g_last (b, d, n) of
    h_l -> the gradients of u, delta, A, B, C. The adjoint gh_t = dLoss/dh_t runs the recurrence
    backwards in time, slab by slab, each slab's states recomputed from its start:
        gh_t = a_{t+1} gh_{t+1} + C_t gy_t,  gh_l = g_last,
    and with q_t = gh_t a_t h_{t-1} (a_t = exp(delta_t A), x_t = delta_t B_t u_t):
        dC_t = sum_(d in group) gy_t h_t          dB_t = sum_(d in group) gh_t delta_t u_t
        du_t = delta_t sum_n gh_t B_t             ddelta_t = u_t sum_n gh_t B_t + sum_n q_t A
        dA = sum_(b, t) q_t delta_t"""
    (b, d, l), (g, n) = u.shape, B.shape[1:3]
    T, S, dt, dtu, A, Bt, Ct = _slab_layouts(u, delta, A, B, C)              # time-major
    gyt = _time_major(gy, dtu.shape[0], *dtu.shape[1:])                     # (L, b, g, d/g, 1)
    carry = g_last.reshape(b, g, d // g, n).contiguous()                    # gh just after a slab
    grads, steps = [], [S + 1, S, S, S]                                     # buffers a, x, gx, tmp
    buffers = [] if _compiles(u.device) else [u.new_empty(t, b, g, d // g, n) for t in steps]
    for k in reversed(range(len(states))):
        s = k * S
        carry, *g_slab = _run_slab(_slab_backward, dt[s:s + S + 1], dtu[s:s + S], A, Bt[s:s + S],
                                   Ct[s:s + S], gyt[s:s + S], states[k], carry, T, *buffers)
        grads.insert(0, g_slab)
    g_dtu, g_dtA, gB, gC, gA = zip(*grads)                                  # per slab
    g_dtu, g_dtA = (_batch_major(torch.cat(v), b, d, l) for v in (g_dtu, g_dtA))
    gB, gC = (_batch_major(torch.cat(v), b, g, n, l) for v in (gB, gC))
    gA = sum(gA).view(d, n)                                                 # (d, n)
    return g_dtu * delta, g_dtu * u + g_dtA, gA, gB, gC


# The op: torch.compile sees the scan as this one node (the fake gives its shapes), and autograd
# runs `scan_backward` as one node too, with autocast off (its bmm would otherwise run in bf16).
@torch.library.custom_op("vmrnn::selective_scan_backward", mutates_args=())
def _scan_backward_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, states: Tensor,
                      gy: Tensor, g_last: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with torch.autocast(u.device.type, enabled=False):
        return scan_backward(u, delta, A, B, C, states, gy, g_last)


@_scan_backward_op.register_fake
def _(u, delta, A, B, C, states, gy, g_last):
    return tuple(t.new_empty(t.shape) for t in (u, delta, A, B, C))         # contiguous


@torch.library.custom_op("vmrnn::selective_scan", mutates_args=())
def _scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
             C: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return scan_forward(u, delta, A, B, C)              # no op of autocast's lists: no guard


@_scan_op.register_fake
def _(u, delta, A, B, C):
    (b, d, l), (g, n) = u.shape, B.shape[1:3]
    slabs = -(-l // _slab_sizes(u.device, b, d * n, l)[1])                  # ceil, also symbolic
    return u.new_empty(b, d, l), u.new_empty(b, d, n), u.new_empty(slabs, b, g, d // g, n)


def _save_for_scan_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[2])
    ctx.mark_non_differentiable(output[2])


def _scan_op_backward(ctx, gy, g_last, _):
    return _scan_backward_op(*ctx.saved_tensors, gy, g_last)


_scan_op.register_autograd(_scan_op_backward, setup_context=_save_for_scan_backward)


_scan_compile = "off"           # see set_scan_compile
_compiled = {}                  # slab function -> its torch.compile'd form
_KERNEL_DEVICE_TYPE = "cuda"    # the only device type the mamba-ssm kernel runs on
_mamba_works = None             # None until its first call, then whether that worked
_last_backend = None            # what the last selective_scan ran (see last_scan_backend)


def set_scan_compile(mode):
    """Whether the scan op runs its slab functions through torch.compile: "off" (default) never,
    "auto" for CUDA tensors, "on" on any device (a CPU needs a C++ compiler, a GPU Triton). A
    model's torch.compile sees the scan as one op either way. Off until measured on a GPU."""
    global _scan_compile
    _require(mode in ("auto", "on", "off"), f"set_scan_compile: mode must be 'auto', 'on' or 'off', "
             f"not {mode!r}")
    _scan_compile = mode


def last_scan_backend():
    """Which backend ran the last `selective_scan`: "mamba", "torch-compiled", "torch" or "ref"."""
    return _last_backend


def _compiles(device):
    """Whether the slab functions run through torch.compile on this device (`set_scan_compile`)."""
    return _scan_compile == "on" or _scan_compile == "auto" and device.type == "cuda"


def _run_slab(fn, *args):
    """fn(*args), through torch.compile where `_compiles` (no buffers then): a graph per chunk count
    and length, none per batch size, on copies of the slab's views (offset 0, one graph for all)."""
    global _last_backend
    if not _compiles(args[0].device):
        _last_backend = "torch"
        return fn(*args)
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=True)
    _last_backend = "torch-compiled"
    return _compiled[fn](*(a.clone() if isinstance(a, Tensor) else a for a in args))


def _mamba_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                return_last_state=False):
    """mamba-ssm's `selective_scan_fn` on float32 copies; y in the dtype of u, like the others."""
    if _mamba_scan_fn is None or u.device.type != _KERNEL_DEVICE_TYPE:
        raise RuntimeError("backend='mamba' needs CUDA tensors and mamba-ssm with a working kernel "
                           "(pip install mamba-ssm)")
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    f32 = [t if t is None else t.float() for t in (u, delta, A, B, C, D, z, delta_bias)]
    with torch.autocast(u.device.type, enabled=False):
        out = _mamba_scan_fn(*f32, delta_softplus, return_last_state)
    return (out[0].to(u.dtype), out[1]) if return_last_state else out.to(u.dtype)


# Input checks: one-line ValueErrors that name the argument, what it got and what was expected.
def _describe(x):
    """Shape and dtype of a tensor (lists of those for lists/tuples), for error messages."""
    return (f"shape {tuple(x.shape)} ({x.dtype})" if isinstance(x, torch.Tensor) else
            f"[{', '.join(map(_describe, x))}]" if isinstance(x, (list, tuple)) else type(x).__name__)


def _fits(t, *shape):
    """Whether t is a real floating-point tensor of this shape (None: any size)."""
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == len(shape)
            and all(s in (None, size) for s, size in zip(shape, t.shape)))


def _is_state_pair(pair, shape):
    """Whether pair is (h_state, c_state), two floating-point tensors of this shape."""
    return isinstance(pair, (list, tuple)) and len(pair) == 2 and all(_fits(t, *shape) for t in pair)


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
