"""Tests for vmrnn: the scan, the model (against the authors' fixtures), data, training, README.

Run: python -m pytest -q test_vmrnn.py   (CPU, offline; about 50 s on 2 cores, 80 s with a cold compile cache)
Tests that need ../shared (the authors' fixtures, real MNIST digits) skip with a reason without it.
"""

import csv
import gzip
import hashlib
import http.server
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.utils._python_dispatch
from PIL import Image
from skimage.metrics import structural_similarity

import bench
import data
import train
import vmrnn
from data import DataError
from vmrnn import (VMRNN_B, VMRNN_D, check_state_dict, cross_merge, cross_scan, load_official_state_dict,
                   paper_model, selective_scan, selective_scan_ref, selective_scan_torch)

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"
T10K = SHARED / "data" / "t10k-images-idx3-ubyte.gz"
FIXTURES = SHARED / "fixtures"
FIXTURE_NAMES = ["mmnist_b_small", "mmnist_d_small", "openstl_b_small"]


@pytest.fixture(autouse=True)
def _restore_global_settings():
    """train.py and bench.py set vmrnn's scan-compile mode and torch's thread count: put both back."""
    mode, threads = vmrnn._scan_compile, torch.get_num_threads()
    yield
    vmrnn.set_scan_compile(mode)
    torch.set_num_threads(threads)


# ==================================================================================================
# Selective scan: the parallel PyTorch scan against the float64 loop, the kernel, the dispatcher
# ==================================================================================================

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_inputs(b, d, l, n, g, *, init="random", seed=0):
    """float64 scan inputs. g = 0 gives B, C in the ungrouped (b, n, l) form.
    init="mamba": A = -(1..n), dt bias = softplus^-1(dt), dt log-uniform in [1e-3, 1e-1].
    init="large": softplus(delta) in [1, 3] and |A| up to 64: sum_t delta |A| in the thousands."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    bc_shape = (b, g, n, l) if g else (b, n, l)
    x = dict(u=randn(b, d, l), delta=0.5 * randn(b, d, l), A=-0.5 - 4 * rand(d, n),
             B=randn(*bc_shape), C=randn(*bc_shape), D=randn(d), z=randn(b, d, l),
             delta_bias=0.1 * randn(d))
    if init == "mamba":
        dt = torch.exp(math.log(1e-3) + rand(d) * math.log(100))
        x.update(A=-torch.arange(1, n + 1, dtype=torch.float64).repeat(d, 1),
                 delta=0.1 * randn(b, d, l), delta_bias=dt + torch.log(-torch.expm1(-dt)),
                 D=torch.ones(d))
    elif init == "large":
        step = 1 + 2 * rand(b, d, l)                                        # softplus(delta)
        x.update(A=-torch.exp(math.log(64) * rand(d, n)), delta_bias=torch.zeros(d),
                 delta=step + torch.log(-torch.expm1(-step)))
    return x


def rel_err(actual, expected):
    """max |actual - expected| / max |expected| (0 when both are exactly zero)."""
    diff = (actual.double() - expected).abs().max()
    return (diff / expected.abs().max()).item() if diff > 0 else 0.0


def run(scan, x, dtype, names):
    """y, last state and the gradients of a random projection of both w.r.t. the named inputs."""
    inputs = {k: v if v is None else v.to(dtype).requires_grad_(k in names) for k, v in x.items()}
    y, last = scan(**inputs, delta_softplus=True, return_last_state=True)
    gen = torch.Generator().manual_seed(1)
    wy, wl = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (y, last))
    loss = (y * wy.to(y.dtype)).sum() + (last * wl.to(last.dtype)).sum()
    grads = torch.autograd.grad(loss, [inputs[k] for k in names])
    return y, last, dict(zip(names, grads))


def check_against_loop(x, names, y_tol=1e-5, g_tol=1e-4):
    """The float32 parallel scan against the float64 loop: y, last state and every gradient."""
    y_ref, last_ref, g_ref = run(selective_scan_ref, x, torch.float64, names)
    y, last, g = run(selective_scan_torch, x, torch.float32, names)
    assert y.dtype == last.dtype == torch.float32
    assert torch.isfinite(y).all() and all(torch.isfinite(v).all() for v in g.values())
    assert rel_err(y, y_ref) < y_tol
    assert rel_err(last, last_ref) < y_tol
    for k in names:
        assert g[k].shape == x[k].shape
        assert rel_err(g[k], g_ref[k]) < g_tol, k


@pytest.mark.parametrize("slab_steps", [None, 32], ids=["one-slab", "slabs-of-32"])
@pytest.mark.parametrize("gated", [True, False], ids=["D-z", "no-D-z"])
@pytest.mark.parametrize("g", [4, 0], ids=["grouped", "ungrouped"])
@pytest.mark.parametrize("l", [1, 7, 64, 300, 1031])
def test_parallel_scan_matches_loop(l, g, gated, slab_steps, monkeypatch):
    b, d, n = 2, 8, 4
    if slab_steps:  # force many slabs so the state and adjoint carries between slabs are exercised
        monkeypatch.setattr(vmrnn, "_SLAB_ELEMENTS", slab_steps * b * d * n)
    x = scan_inputs(b, d, l, n, g)
    if not gated:
        x.update(D=None, z=None)
    check_against_loop(x, [k for k in NAMES if x[k] is not None])


@pytest.mark.parametrize("init", ["mamba", "large"])
def test_parallel_scan_matches_loop_at_mamba_init_and_large_steps(init):
    x = scan_inputs(1, 8, 1031, 16, 4, init=init)
    if init == "large":
        steps = F.softplus(x["delta"])
        assert (steps * x["A"].abs().amax(1)[:, None]).sum(-1).max() > 1000  # exp(sum) overflows
    check_against_loop(x, list(NAMES))


def test_gradcheck_float64(monkeypatch):
    monkeypatch.setattr(vmrnn, "_SLAB_ELEMENTS", 8 * 2 * 4 * 3)             # slabs of 8 steps
    x = scan_inputs(2, 4, 21, 3, 2)
    inputs = [x[k].requires_grad_() for k in NAMES]
    f = lambda *args: selective_scan_torch(*args, delta_softplus=True, return_last_state=True)
    assert torch.autograd.gradcheck(f, inputs)


def test_chunked_linear_scan_both_directions():
    gen = torch.Generator().manual_seed(0)
    a, x = torch.rand(24, 3, generator=gen), torch.randn(24, 3, generator=gen)
    h0 = torch.randn(3, generator=gen)
    for reverse in (False, True):
        h, expected = h0, torch.empty_like(x)
        for t in (range(23, -1, -1) if reverse else range(24)):
            h = expected[t] = a[t] * h + x[t]
        out = x.clone()
        last = vmrnn._chunked_linear_scan(a, out, h0, chunk=4, reverse=reverse)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(last, expected[0] if reverse else expected[-1])


def test_return_last_state():
    x = scan_inputs(2, 8, 50, 4, 4)
    y, last = selective_scan_torch(**x, return_last_state=True)
    y_ref, last_ref = selective_scan_ref(**x, return_last_state=True)
    assert last.shape == (2, 8, 4)
    assert rel_err(last, last_ref) < 1e-5
    assert rel_err(y, y_ref) < 1e-5
    torch.testing.assert_close(selective_scan_torch(**x), y)                # y alone by default


def test_autocast_bf16_computes_and_returns_float32():
    x = scan_inputs(2, 8, 300, 4, 4)
    low = {k: v.to(torch.bfloat16).requires_grad_() for k, v in x.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan_torch(**low, delta_softplus=True)
    assert y.dtype == torch.float32
    ref = {k: v.detach().double().requires_grad_() for k, v in low.items()}  # same rounded inputs
    y_ref = selective_scan_ref(**ref, delta_softplus=True)
    assert rel_err(y, y_ref) < 1e-5
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y * w.float()).sum().backward()
    (y_ref * w).sum().backward()
    for k in NAMES:
        assert low[k].grad.dtype == torch.bfloat16
        assert rel_err(low[k].grad, ref[k].grad) < 1e-2, k                 # grad rounded to bf16


def test_output_dtype_follows_the_kernel():
    x = scan_inputs(1, 4, 9, 2, 1)
    assert selective_scan_torch(**x).dtype == torch.float64                 # float64 stays float64
    x32 = {k: v.float() for k, v in x.items()}
    assert selective_scan_torch(**x32).dtype == torch.float32
    assert selective_scan_ref(**{k: v.half() for k, v in x.items()}).dtype == torch.float32


def test_backward_keeps_no_state_sized_tensor():
    b, d, l, n, g = 1, 64, 512, 64, 4
    x = {k: v.float().requires_grad_() for k, v in scan_inputs(b, d, l, n, g).items()}
    saved = {}
    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = selective_scan_torch(**x, delta_softplus=True)
    state_bytes = b * d * l * n * 4                                         # one (b, d, l, n) state
    assert max(saved.values()) < state_bytes / 8
    assert sum(saved.values()) < state_bytes / 4
    y.sum().backward()                                                      # backward still works
    assert all(v.grad is not None for v in x.values())


@pytest.mark.skipif(vmrnn._mamba_scan_fn is None or not torch.cuda.is_available(),
                    reason="needs mamba-ssm and a CUDA device")
@pytest.mark.parametrize("g", [4, 0], ids=["grouped", "ungrouped"])
def test_kernel_matches_parallel_scan(g):
    x = {k: v.float().cuda() for k, v in scan_inputs(2, 64, 300, 16, g, init="mamba").items()}
    results = []
    for backend in ("mamba", "torch"):
        inputs = {k: v.clone().requires_grad_() for k, v in x.items()}
        y = selective_scan(**inputs, delta_softplus=True, backend=backend)
        assert vmrnn.last_scan_backend() == backend
        y.backward(torch.ones_like(y) + torch.arange(y.numel(), device=y.device).view(y.shape) % 3)
        results.append((y, {k: v.grad for k, v in inputs.items()}))
    (y_k, g_k), (y_t, g_t) = results
    assert rel_err(y_k, y_t.double()) < 1e-4
    for k in NAMES:
        assert rel_err(g_k[k], g_t[k].double()) < 1e-3, k


def test_dispatcher_falls_back_once_when_the_kernel_fails(monkeypatch):
    calls = []
    def broken_kernel(*args):  # what a mamba-ssm build without its compiled extension does
        calls.append(args)
        raise AttributeError("'NoneType' object has no attribute 'fwd'")
    monkeypatch.setattr(vmrnn, "_KERNEL_DEVICE_TYPE", "cpu")                # CPU tensors may try it
    monkeypatch.setattr(vmrnn, "_mamba_scan_fn", broken_kernel)
    monkeypatch.setattr(vmrnn, "_mamba_works", None)
    x = {k: v.float() for k, v in scan_inputs(1, 8, 20, 4, 4).items()}
    with pytest.warns(RuntimeWarning, match="using the PyTorch scan"):
        y = selective_scan(**x, delta_softplus=True)
    assert vmrnn.last_scan_backend() == "torch"
    torch.testing.assert_close(y, selective_scan_torch(**x, delta_softplus=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                      # no second warning
        selective_scan(**x, delta_softplus=True)
    assert vmrnn.last_scan_backend() == "torch"
    assert len(calls) == 1                                                  # probed once only
    with pytest.raises(RuntimeError, match="backend='mamba'"):
        selective_scan(**x, backend="mamba")


def test_dispatcher_uses_a_working_kernel(monkeypatch):
    calls = []
    def kernel(*args):  # a stand-in with the kernel's signature
        calls.append(args)
        return selective_scan_ref(*args)
    monkeypatch.setattr(vmrnn, "_KERNEL_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(vmrnn, "_mamba_scan_fn", kernel)
    monkeypatch.setattr(vmrnn, "_mamba_works", None)
    x = {k: v.float() for k, v in scan_inputs(1, 8, 20, 4, 4).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = selective_scan(**x, delta_softplus=True)
    assert vmrnn.last_scan_backend() == "mamba"
    assert len(calls) == 2                                                  # the probe, the call
    torch.testing.assert_close(y, selective_scan_ref(**x, delta_softplus=True))
    selective_scan(**x, backend="torch")
    assert vmrnn.last_scan_backend() == "torch"


def test_dispatcher_backends_on_cpu(monkeypatch):
    monkeypatch.setattr(vmrnn, "_mamba_scan_fn", None)
    monkeypatch.setattr(vmrnn, "_mamba_works", None)
    x = {k: v.float() for k, v in scan_inputs(2, 8, 40, 4, 4).items()}
    y_auto = selective_scan(**x, delta_softplus=True)
    assert vmrnn.last_scan_backend() == "torch"                             # CPU: never the kernel
    torch.testing.assert_close(y_auto, selective_scan_torch(**x, delta_softplus=True))
    y_ref = selective_scan(**x, delta_softplus=True, backend="ref")
    assert vmrnn.last_scan_backend() == "ref"
    torch.testing.assert_close(y_auto, y_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        selective_scan(**x, backend="mamba")
    with pytest.raises(ValueError, match="backend"):
        selective_scan(**x, backend="cuda")


# --------------------------------------------------------------------------------------------------
# Model: equivalence with the authors' code (../shared/fixtures)
# --------------------------------------------------------------------------------------------------

def load_fixture(name):
    path = FIXTURES / f"{name}.pt"
    if not path.exists():
        pytest.skip(f"{path} not found: the official fixtures live in ../shared beside the checkout")
    return torch.load(path, weights_only=True)


def model_from_fixture(fixture):
    """Build our model from a fixture's official constructor arguments."""
    cfg, variant = fixture["config"], fixture["variant"]
    if variant == "mmnist-B":
        (depth,) = cfg["depths"]
        return VMRNN_B(cfg["img_size"], cfg["patch_size"], cfg["in_chans"], cfg["embed_dim"],
                       depth=depth, drop_path_rate=cfg["drop_path_rate"])
    if variant == "mmnist-D":
        return VMRNN_D(cfg["img_size"], cfg["patch_size"], cfg["in_chans"], cfg["embed_dim"],
                       depths_down=cfg["depths_down"], depths_up=cfg["depths_up"])
    assert variant == "openstl-B"
    _, chans, h, w = cfg["in_shape"]
    return VMRNN_B((h, w), cfg["patch_size"], chans, cfg["embed_dim"], depth=cfg["depths"],
                   drop_path_rate=cfg["drop_path_rate"])


def first_cell(model):
    return model.cell if isinstance(model, VMRNN_B) else model.down[0]


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def official(request):
    fixture = load_fixture(request.param)
    model = model_from_fixture(fixture).eval()
    ignored = load_official_state_dict(model, fixture["state_dict"])
    return fixture, model, ignored


def test_official_rollout_matches(official):
    fixture, model, _ = official
    with torch.no_grad():
        out = model(fixture["inputs"], fixture["T_out"])
    assert out.shape == fixture["outputs"].shape
    assert (out - fixture["outputs"]).abs().max().item() <= 1e-5


def test_official_intermediates_match(official):
    """Each captured layer (frame step 1, non-zero state) matches, so a mismatch names its layer."""
    fixture, model, _ = official
    mods, cell = fixture["modules"], first_cell(model)
    grid = model.grid
    with torch.no_grad():
        ss2d = mods["first_ss2d"]
        out = cell.blocks[0].ss2d(ss2d["x"])
        assert out.shape == (ss2d["x"].shape[0], *grid, ss2d["x"].shape[-1])
        torch.testing.assert_close(out, ss2d["out"], rtol=0, atol=1e-5)

        vsb = mods["first_vsb"]
        torch.testing.assert_close(cell.blocks[0](vsb["x"], vsb["hx"]), vsb["out"], rtol=0, atol=1e-5)

        c = mods["first_cell"]
        h_state, (h_again, c_state) = cell(c["xt"], (c["hx"], c["cx"]))
        torch.testing.assert_close(h_state, c["Ht"], rtol=0, atol=1e-5)
        torch.testing.assert_close(c_state, c["Ct"], rtol=0, atol=1e-5)
        assert h_again is h_state


def test_official_ignored_keys_are_the_dead_weights(official):
    fixture, model, ignored = official
    assert ignored, "the authors' models always carry unused weights"
    for key in ignored:
        dead_linear = ".linear." in key and ".VSBs.0." not in key
        assert dead_linear or key.startswith("Upsample.patch_embed."), key
    # Everything else was loaded: one official weight per parameter of ours.
    assert len(fixture["state_dict"]) - len(ignored) == len(model.state_dict())


def test_official_loader_rejects_what_does_not_fit():
    fixture = load_fixture("mmnist_b_small")
    model = model_from_fixture(fixture)
    state = dict(fixture["state_dict"])
    with pytest.raises(ValueError, match="'ST.extra.weight' is unexpected"):
        load_official_state_dict(model, {**state, "ST.extra.weight": torch.zeros(1)})
    key = "ST.patch_embed.proj.weight"
    with pytest.raises(ValueError, match="'embed.proj.weight' is missing"):
        load_official_state_dict(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match=r"'embed.proj.weight' has shape \(3, 3\).*\(32, 1, 2, 2\)"):
        load_official_state_dict(model, {**state, key: torch.zeros(3, 3)})
    wrong_depth = VMRNN_B(16, 2, 1, 32, depth=3)       # the fixture has 2 blocks
    with pytest.raises(ValueError, match="'cell.blocks.2.norm.weight' is missing"):
        load_official_state_dict(wrong_depth, state)
    ddp_saved = {f"module.{k}": v for k, v in state.items()}
    assert len(load_official_state_dict(model, ddp_saved)) == 2


# --------------------------------------------------------------------------------------------------
# Model: invariants, shapes, parameters
# --------------------------------------------------------------------------------------------------

def test_cross_merge_undoes_cross_scan():
    x = torch.randn(2, 3, 4, 6)                            # (b, d, H, W), rectangular
    xs = cross_scan(x)                                     # (b, k, d, l)
    assert xs.shape == (2, 4, 3, 24)
    torch.testing.assert_close(xs[:, 0], x.flatten(2))                      # row-major
    torch.testing.assert_close(xs[:, 1, :, 5], x[:, :, 1, 1])               # column-major: l = w*H + h
    torch.testing.assert_close(xs[:, 2], xs[:, 0].flip(-1))
    torch.testing.assert_close(xs[:, 3], xs[:, 1].flip(-1))
    torch.testing.assert_close(cross_merge(xs, 4, 6), 4 * x.flatten(2))


@pytest.mark.parametrize("name, count", [("taxibj", 2_218_114), ("kth", 1_050_241),
                                         ("mmnist", 13_395_329)])
def test_paper_model_parameter_counts(name, count):
    """The authors' counts minus the weights their code never uses (SPEC §6)."""
    assert sum(p.numel() for p in paper_model(name).parameters()) == count


@pytest.mark.parametrize("make, size", [
    (lambda: VMRNN_B((16, 24), 2, 3, 16, depth=2), (16, 24)),
    (lambda: VMRNN_B(32, 4, 2, 16, depth=1), (32, 32)),
    (lambda: VMRNN_D((16, 32), 2, 1, 16, depths_down=(1, 1), depths_up=(1, 1)), (16, 32)),
])
def test_rollout_shapes(make, size):
    model = make().eval()
    frames = torch.rand(2, 3, model.in_chans, *size)
    with torch.no_grad():
        out = model(frames, pred_len=4)
    assert out.shape == (2, 3 - 1 + 4, model.in_chans, *size)
    assert out.min() > 0 and out.max() < 1


def test_step_by_step_equals_rollout():
    """Streaming frames through `step` with explicit state is the rollout, step for step."""
    model = VMRNN_D(16, 2, 1, 16, depths_down=(1, 1), depths_up=(1, 1)).eval()
    frames = torch.rand(1, 3, 1, 16, 16)
    with torch.no_grad():
        out = model(frames, pred_len=2)
        state, preds = None, []
        for t in range(3):
            pred, state = model.step(frames[:, t], state)
            preds.append(pred)
        assert len(state) == 4 and all(len(s) == 2 for s in state)
        preds.append(model.step(preds[-1], state)[0])
    torch.testing.assert_close(out, torch.stack(preds, 1))


@pytest.mark.parametrize("make", [
    lambda: VMRNN_B(16, 4, 2, 16, depth=2, drop_path_rate=0.0),
    lambda: VMRNN_D(16, 2, 1, 8, depths_down=(2, 1), depths_up=(1, 2), drop_path_rate=0.0),
])
def test_every_parameter_gets_a_gradient(make):
    model = make().train()
    frames = torch.rand(2, 4, model.in_chans, 16, 16)
    out = model(frames[:, :2], pred_len=2)
    torch.nn.functional.mse_loss(out, frames[:, 1:]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_paper_cell_differs_only_in_the_cell_update():
    torch.manual_seed(0)
    code = VMRNN_B(16, 2, 1, 16, depth=2, cell_update="code").eval()
    paper = VMRNN_B(16, 2, 1, 16, depth=2, cell_update="paper").eval()
    paper.load_state_dict(code.state_dict())              # same parameters, same names
    x, h, c = (torch.randn(2, 64, 16) for _ in range(3))
    with torch.no_grad():
        o = code.cell.blocks[1](code.cell.blocks[0](x, h))
        f = torch.sigmoid(o)
        _, (h_code, c_code) = code.cell(x, (h, c))
        _, (h_paper, c_paper) = paper.cell(x, (h, c))
    torch.testing.assert_close(c_code, f * (c + torch.tanh(o)))
    torch.testing.assert_close(c_paper, f * torch.tanh(o) + c)
    torch.testing.assert_close(h_code, f * torch.tanh(c_code))
    torch.testing.assert_close(h_paper, f * torch.tanh(c_paper))
    assert not torch.allclose(c_code, c_paper)


def test_drop_path_is_random_in_training_only():
    model = VMRNN_B(16, 2, 1, 16, depth=2, drop_path_rate=0.5)
    frames = torch.rand(4, 2, 1, 16, 16)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(frames, 1), model(frames, 1))
        model.train()
        torch.manual_seed(0)
        a = model(frames, 1)
        torch.manual_seed(1)
        assert not torch.allclose(a, model(frames, 1))


def test_runs_under_bf16_autocast():
    torch.manual_seed(0)
    model = VMRNN_B(16, 2, 1, 16, depth=1).eval()
    frames = torch.rand(2, 2, 1, 16, 16)
    with torch.no_grad():
        ref = model(frames, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(frames, 2)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05


@pytest.mark.parametrize("make, match", [
    (lambda: VMRNN_B(30, 4, 1, 16), "not divisible by patch_size 4"),
    (lambda: VMRNN_B(16, 3, 1, 16), "patch_size must be 2, 4 or 8"),
    (lambda: VMRNN_B(14, 2, 1, 16), "must be even"),
    (lambda: VMRNN_B(32, 4, 1, 24), "divisible by 16"),
    (lambda: VMRNN_D(24, 2, 1, 16, depths_down=(1, 1, 1), depths_up=(1, 1, 1)), "cannot be halved 3"),
    (lambda: VMRNN_D(32, 2, 1, 16, depths_down=(1, 1), depths_up=(1,)), "same number"),
    (lambda: VMRNN_B(16, 2, 1, 16, cell_update="eq5"), "cell_update"),
    (lambda: paper_model("moving-mnist"), "unknown paper model"),
])
def test_bad_configs_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("shape", [(2, 3, 2, 16, 16), (2, 3, 1, 16, 24), (3, 1, 16, 16)])
def test_bad_frames_raise_clear_errors(shape):
    model = VMRNN_B(16, 2, 1, 16, depth=1)
    with pytest.raises(ValueError, match=r"expected frames of shape \(b, t, 1, 16, 16\)"):
        model(torch.rand(*shape), 1)


def test_unknown_keyword_raises():
    """No **kwargs pass-through: a misspelt argument is an error, not a silent default."""
    with pytest.raises(TypeError):
        VMRNN_B(16, 2, 1, 16, dept=2)

def _bad_scan_inputs(change):
    x = {k: v.float() for k, v in scan_inputs(2, 8, 33, 4, 4).items()}
    x.update(change(x))
    return x


BAD_SCAN_INPUTS = {  # what the issue found accepted (the first two silently wrong), and the rest
    "B-length-32": (lambda x: dict(B=x["B"][..., :32]), r"B has shape \(2, 4, 4, 32\)"),
    "C-length-40": (lambda x: dict(C=torch.randn(2, 4, 4, 40)), r"C has shape \(2, 4, 4, 40\)"),
    "C-grouped-unlike-B": (lambda x: dict(C=x["C"][:, :2]), r"C has .*the shape of B, \(2, 4, 4, 33"),
    "B-ungrouped-wrong-n": (lambda x: dict(B=torch.randn(2, 5, 33)), r"B has shape \(2, 5, 33\)"),
    "B-batch-1": (lambda x: dict(B=x["B"][:1]), r"B has shape \(1, 4, 4, 33\)"),
    "B-groups-not-dividing-d": (lambda x: dict(B=torch.randn(2, 3, 4, 33)), r"B has shape \(2, 3, 4, 33\).*g dividing d = 8"),
    "A-wrong-d": (lambda x: dict(A=x["A"][:6]), r"A has shape \(6, 4\)"),
    "A-complex": (lambda x: dict(A=x["A"].to(torch.complex64)), r"A has .*complex64.* real"),
    "u-2d": (lambda x: dict(u=x["u"][0]), r"u has shape \(8, 33\)"),
    "u-l-0": (lambda x: dict(u=x["u"][..., :0]), r"u has shape \(2, 8, 0\).*l >= 1"),
    "u-b-0": (lambda x: dict(u=x["u"][:0]), r"u has shape \(0, 8, 33\).*b, d, l >= 1"),
    "A-n-0": (lambda x: dict(A=x["A"][:, :0]), r"A has shape \(8, 0\).*n >= 1"),
    "u-int64": (lambda x: dict(u=x["u"].long()), r"u has .*torch.int64"),
    "delta-shape": (lambda x: dict(delta=x["delta"][..., :32]), r"delta has shape \(2, 8, 32\)"),
    "z-shape": (lambda x: dict(z=x["z"][:1]), r"z has shape \(1, 8, 33\)"),
    "D-shape": (lambda x: dict(D=x["D"][:4]), r"D has shape \(4,\)"),
    "delta_bias-shape": (lambda x: dict(delta_bias=x["delta_bias"][None]),
                         r"delta_bias has shape \(1, 8\)"),
    "delta-missing": (lambda x: dict(delta=None), "delta has NoneType"),
}


@pytest.mark.parametrize("scan", ["auto", "torch", "ref", selective_scan_torch, selective_scan_ref],
                         ids=["auto", "torch", "ref", "selective_scan_torch", "selective_scan_ref"])
@pytest.mark.parametrize("case", BAD_SCAN_INPUTS, ids=list(BAD_SCAN_INPUTS))
def test_scan_rejects_bad_inputs_naming_the_argument(case, scan):
    """Through the dispatcher (every backend) and calling each backend directly."""
    change, match = BAD_SCAN_INPUTS[case]
    scan = partial(selective_scan, backend=scan) if isinstance(scan, str) else scan
    with pytest.raises(ValueError, match="selective_scan: " + match):
        scan(**_bad_scan_inputs(change), delta_softplus=True)


def test_scan_accepts_every_documented_form():
    x = {k: v.float() for k, v in scan_inputs(2, 8, 33, 4, 0).items()}    # B, C (b, n, l)
    selective_scan(**x)
    selective_scan(**{**x, "D": None, "z": None, "delta_bias": None})
    selective_scan(**{k: v.half() for k, v in x.items()})                 # low precision inputs
    grouped = x["B"][:, None].expand(2, 2, 4, 33)                           # g = 2 divides d = 8
    selective_scan(**{**x, "B": grouped, "C": grouped})


# --------------------------------------------------------------------------------------------------
# Bad input: the models' constructors, forward and step
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: VMRNN_B(16, 2, 1, 16, drop_path_rate=1.5), r"drop_path_rate .*\[0, 1\), got 1.5"),
    (lambda: VMRNN_B(16, 2, 1, 16, drop_path_rate=-0.5), r"drop_path_rate .*got -0.5"),
    (lambda: VMRNN_D(16, 2, 1, 16, drop_path_rate=1.0), r"drop_path_rate .*got 1.0"),
    (lambda: VMRNN_B(16, 2, 1, 16, dropout=1.0), r"dropout .*\[0, 1\), got 1.0"),
    (lambda: VMRNN_D(16, 2, 1, 16, dropout=-0.1), r"dropout .*got -0.1"),
    (lambda: VMRNN_B(16, 2, 1, 16, d_state=0), "d_state must be >= 1, got 0"),
    (lambda: VMRNN_B(16, 4, 1, 0), "embed_dim must be >= 1, got 0"),
    (lambda: VMRNN_B(16, 2, 0, 16), "in_chans must be >= 1, got 0"),
    (lambda: VMRNN_B(16, 2, 1, 16, depth=0), "at least one VSS block, got depth=0"),
    (lambda: VMRNN_D(16, 2, 1, 16, depths_down=(1, 0), depths_up=(1, 1)), "got depth=0"),
])
def test_out_of_range_options_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _small_models():
    torch.manual_seed(0)
    return [VMRNN_B(16, 2, 1, 16, depth=1), VMRNN_D(16, 2, 1, 16, depths_down=(1, 1),
                                                   depths_up=(1, 1))]


@pytest.mark.parametrize("frame, match", [
    (torch.rand(2, 1, 16, 8), r"frame of shape \(b, 1, 16, 16\), got shape \(2, 1, 16, 8\)"),
    (torch.rand(1, 16, 16), r"got shape \(1, 16, 16\)"),
    (torch.zeros(2, 1, 16, 16, dtype=torch.uint8), r"floating-point frame .*torch.uint8"),
])
def test_step_rejects_bad_frames(frame, match):
    for model in _small_models():
        with pytest.raises(ValueError, match=match):
            model.step(frame)


def test_forward_rejects_int_frames_and_bad_pred_len():
    model = _small_models()[0]
    with pytest.raises(ValueError, match=r"expected frames .*torch.int64"):
        model(torch.zeros(2, 3, 1, 16, 16, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"t >= 1, got shape \(2, 0, 1, 16, 16\)"):
        model(torch.rand(2, 0, 1, 16, 16), 1)
    for pred_len in (-1, 1.5):
        with pytest.raises(ValueError, match=f"pred_len must be an integer >= 0, got {pred_len}"):
            model(torch.rand(2, 3, 1, 16, 16), pred_len)


def test_step_rejects_bad_states():
    model_b, model_d = _small_models()
    frame = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        _, state_b = model_b.step(frame)
        _, state_d = model_d.step(frame)
        model_b.step(frame, state_b)                                        # good states pass
        model_d.step(frame, state_d)
    h, c = state_b
    bad_b = [(h,), (h, c[:1]), (h, c, c), [h[:, :8], c], None]
    for bad in bad_b[:-1]:
        with pytest.raises(ValueError, match=r"state must be None or \(h_state, c_state\) of "
                                             r"shapes \(2, 64, 16\) \(b, l, c\), got "):
            model_b.step(frame, bad)
    with pytest.raises(ValueError, match=r"of shapes \(2, 64, 16\) \(b, l, c\), got \[\[shape"):
        model_b.step(frame, [state_b])                                      # VMRNN_D's form
    assert len(state_d) == 4
    for bad in (state_d[:3], state_d[::-1], [*state_d[:3], state_b], state_b):
        with pytest.raises(ValueError, match=r"state must be None or per cell .*\(2, 64, 16\), "
                                             r"\(2, 16, 32\), \(2, 4, 64\), \(2, 16, 32\)"):
            model_d.step(frame, bad)
    with pytest.raises(ValueError, match=r"shapes \[\(1, 64, 16\), .* got \[\[shape \(2, 64, 16\)"):
        model_d.step(torch.rand(1, 1, 16, 16), state_d)                     # batch changed


# --------------------------------------------------------------------------------------------------
# Checkpoints that do not fit: the first mismatching key and both shapes
# --------------------------------------------------------------------------------------------------

def test_check_state_dict_names_the_first_mismatch():
    model = VMRNN_B(16, 2, 1, 16, depth=2)
    state = model.state_dict()
    assert check_state_dict(model, state) is None
    first = next(iter(state))
    with pytest.raises(ValueError, match=f"VMRNN_B: key '{first}' is missing; check the model"):
        check_state_dict(model, {k: v for k, v in state.items() if k != first})
    with pytest.raises(ValueError, match=r"key 'extra' is unexpected"):
        check_state_dict(model, {**state, "extra": torch.zeros(1)})
    wider = VMRNN_B(16, 2, 1, 32, depth=2).state_dict()
    with pytest.raises(ValueError, match=rf"'{first}' has shape \(32, 1, 2, 2\) \(torch.float32\), "
                                         rf"the model's \(16, 1, 2, 2\); check the model class"):
        check_state_dict(model, wider)
    deeper = VMRNN_B(16, 2, 1, 16, depth=3)
    with pytest.raises(ValueError, match=r"key 'cell.blocks.2.norm.weight' is missing"):
        check_state_dict(deeper, state)
    compiled_keys = {f"_orig_mod.{k}": v for k, v in state.items()}
    with pytest.raises(ValueError, match=f"'{first}' is missing \\({len(state)} unexpected, "
                                         f"the first '_orig_mod.{first}'\\)"):
        check_state_dict(model, compiled_keys)


def test_official_loader_names_the_official_key_that_is_unknown():
    fixture = load_fixture("mmnist_b_small")
    model = model_from_fixture(fixture)
    with pytest.raises(ValueError, match=r"key 'Foo.bar' is unexpected"):
        vmrnn.load_official_state_dict(model, {**fixture["state_dict"], "Foo.bar": torch.zeros(1)})


# --------------------------------------------------------------------------------------------------
# Activation checkpointing per frame step
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: VMRNN_B(16, 2, 1, 16, depth=2, drop_path_rate=0.5),
    lambda: VMRNN_D(16, 2, 1, 16, depths_down=(1, 2), depths_up=(2, 1), drop_path_rate=0.5),
])
def test_checkpoint_steps_gives_the_same_outputs_and_gradients(make):
    torch.manual_seed(0)
    model = make().train()
    frames = torch.rand(2, 4, 1, 16, 16)
    results = []
    for checkpoint_steps in (False, True):
        model.checkpoint_steps = checkpoint_steps
        model.zero_grad()
        torch.manual_seed(1)                                                # same drop-path draws
        out = model(frames[:, :2], pred_len=2)
        (out * torch.linspace(0, 1, out.numel()).view(out.shape)).sum().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (out, grads), (out_ckpt, grads_ckpt) = results
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    for k in grads:
        torch.testing.assert_close(grads_ckpt[k], grads[k], rtol=1e-5, atol=1e-6, msg=k)
    torch.manual_seed(2)
    assert not torch.equal(model(frames[:, :2], 2), out)                    # drop path is random


def test_checkpoint_steps_saves_only_step_inputs():
    """With checkpointing, autograd keeps no scan-sized tensor per step: fewer saved bytes."""
    model = VMRNN_B(16, 2, 1, 16, depth=2, drop_path_rate=0.0).train()
    frames = torch.rand(2, 4, 1, 16, 16)
    saved = []
    for checkpoint_steps in (False, True):
        model.checkpoint_steps = checkpoint_steps
        total = [0]
        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(frames, pred_len=2)
        saved.append(total[0])
    assert saved[1] < saved[0] / 4
    with torch.no_grad():                                                   # no-op without grad
        model(frames, pred_len=2)


# --------------------------------------------------------------------------------------------------
# The scan with GPU sizing and through torch.compile, on CPU
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def gpu_sizing(monkeypatch):
    """Size the eager scan as on a GPU (chunks of 32, long slabs) although the tensors are on CPU;
    returns a function that sets the slab length (in steps) for d*n state elements per sample."""
    sizes = vmrnn._slab_sizes
    monkeypatch.setattr(vmrnn, "_slab_sizes", lambda device, *a: sizes(torch.device("cuda"), *a))
    return lambda steps, dn: monkeypatch.setattr(vmrnn, "_GPU_SLAB_ELEMENTS", steps * dn)


@pytest.mark.parametrize("slab_steps", [None, 64], ids=["one-slab", "slabs-of-64"])
@pytest.mark.parametrize("g", [4, 0], ids=["grouped", "ungrouped"])
@pytest.mark.parametrize("l", [1, 45, 300])
def test_gpu_sized_scan_matches_loop(l, g, slab_steps, gpu_sizing):
    b, d, n = 2, 8, 4
    if slab_steps:
        gpu_sizing(slab_steps, d * n)
    assert vmrnn._slab_sizes(torch.device("cpu"), b, d * n, l)[0] == 32
    check_against_loop(scan_inputs(b, d, l, n, g), list(NAMES))


@pytest.mark.parametrize("init", ["mamba", "large"])
def test_gpu_sized_scan_at_mamba_init_and_large_steps(init, gpu_sizing):
    gpu_sizing(256, 8 * 16)
    check_against_loop(scan_inputs(1, 8, 1031, 16, 4, init=init), list(NAMES))


def test_gpu_sized_gradcheck_float64(gpu_sizing):
    gpu_sizing(32, 4 * 3)                                                   # slabs of one chunk
    x = scan_inputs(1, 4, 40, 3, 2)
    inputs = [x[k].requires_grad_() for k in NAMES]
    f = lambda *args: vmrnn.selective_scan_torch(*args, delta_softplus=True, return_last_state=True)
    assert torch.autograd.gradcheck(f, inputs)


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _count_scan_ops(b, d, l, n, g):
    """aten ops of one scan call, forward and backward, on "meta" tensors (no data, same ops)."""
    shapes = [(b, d, l), (b, d, l), (d, n), (b, g, n, l), (b, g, n, l)]
    u, delta, A, B, C = (torch.empty(s, device="meta", requires_grad=True) for s in shapes)
    with _CountOps() as forward:
        y, last = vmrnn._SelectiveScanFn.apply(u, delta, A, B, C)
    with _CountOps() as backward:
        torch.autograd.backward([y, last], [torch.ones_like(y), torch.ones_like(last)])
    return forward.count, backward.count


def test_gpu_sized_scan_dispatches_few_ops(monkeypatch):
    """One scan call at Moving MNIST's top level, batch 8: (b, d, l, n, g) = (8, 1024, 1024, 16, 4).
    Every aten op is a kernel launch on a GPU, so CPU-sized slabs would be launch-bound there."""
    sizes, shape = vmrnn._slab_sizes, (8, 1024, 1024, 16, 4)
    for device in ("cpu", "cuda"):
        monkeypatch.setattr(vmrnn, "_slab_sizes", lambda _, *a: sizes(torch.device(device), *a))
        counts = _count_scan_ops(*shape)
        if device == "cpu":
            cpu_counts = counts
    assert sizes(torch.device("cuda"), 8, 1024 * 16, 1024) == (32, 512)    # two slabs
    assert counts[0] <= 330 and counts[1] <= 720                            # measured: 290, 621
    assert cpu_counts[0] > 5 * counts[0] and cpu_counts[1] > 5 * counts[1]  # 2,590 and 6,461


def test_set_scan_compile_modes(monkeypatch):
    with pytest.raises(ValueError, match="mode must be 'auto', 'on' or 'off', not 'yes'"):
        vmrnn.set_scan_compile("yes")
    x = {k: v.float() for k, v in scan_inputs(2, 8, 40, 4, 4).items()}
    monkeypatch.setattr(vmrnn, "_scan_compile", "auto")                     # on CUDA only
    selective_scan(**x, backend="torch")
    assert vmrnn.last_scan_backend() == "torch"                             # CPU: eager under auto


def test_compile_failure_falls_back_to_eager_and_warns_once(monkeypatch):
    def no_compiler(fn, **kwargs):  # what torch.compile does without Triton / a C++ compiler
        raise RuntimeError("Cannot find a working triton installation")
    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(vmrnn, "_compiled", {})
    monkeypatch.setattr(vmrnn, "_compile_error", None)
    monkeypatch.setattr(vmrnn, "_scan_compile", "on")
    x = {k: v.float().requires_grad_() for k, v in scan_inputs(2, 8, 40, 4, 4).items()}
    with pytest.warns(RuntimeWarning, match="cannot compile the selective scan on cpu "
                                            r"\(RuntimeError: Cannot find a working triton"):
        y = selective_scan(**x, delta_softplus=True, backend="torch")
    assert vmrnn.last_scan_backend() == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                      # warned once only
        y.sum().backward()
        selective_scan(**x, delta_softplus=True, backend="torch")
    monkeypatch.setattr(vmrnn, "_scan_compile", "off")
    torch.testing.assert_close(y, selective_scan(**x, delta_softplus=True, backend="torch"))


@pytest.fixture
def compiled(monkeypatch, gpu_sizing):
    """Run the scan's slab functions through torch.compile (Inductor's C++ backend on CPU), sized
    as on a GPU (slab length independent of b) but with chunks of 8 and slabs of 16 steps, to keep
    the graphs small. Skips with the reason where compiling cannot work."""
    monkeypatch.setattr(vmrnn, "_compile_error", None)
    monkeypatch.setattr(vmrnn, "_scan_compile", "on")
    monkeypatch.setattr(vmrnn, "_GPU_CHUNK", 8)
    gpu_sizing(16, 8 * 4)
    yield
    if vmrnn._compile_error:
        pytest.skip(f"torch.compile cannot compile the scan here: {vmrnn._compile_error}")


@pytest.mark.filterwarnings("ignore:torch.compile cannot compile")
@pytest.mark.parametrize("init", ["random", "large"])
def test_compiled_scan_matches_loop(init, compiled):
    """The compiled path: float64 oracle (large steps too), every input's gradient and the last
    state, across three slabs, the last one padded."""
    check_against_loop(scan_inputs(2, 8, 40, 4, 4, init=init), list(NAMES))
    assert vmrnn.last_scan_backend() == "torch-compiled" or vmrnn._compile_error


@pytest.mark.filterwarnings("ignore:torch.compile cannot compile")
def test_compiled_scan_does_not_recompile_for_a_new_batch_size(compiled):
    stats = torch._dynamo.utils.counters["stats"]
    check_against_loop(scan_inputs(2, 8, 40, 4, 4), list(NAMES))          # compiled (or cached)
    graphs = stats["unique_graphs"]
    for b in (3, 5):                                                        # a last partial batch
        check_against_loop(scan_inputs(b, 8, 40, 4, 4), list(NAMES))
    assert vmrnn.last_scan_backend() == "torch-compiled" or vmrnn._compile_error
    assert stats["unique_graphs"] == graphs


@pytest.mark.parametrize("sizing", ["cpu", "gpu"])
def test_scan_output_and_gradients_are_contiguous(sizing, gpu_sizing):
    """A transposed (non-contiguous) result is correct but makes every later op slower."""
    if sizing == "gpu":
        gpu_sizing(32, 8 * 4)
    x = {k: v.float().requires_grad_() for k, v in scan_inputs(2, 8, 70, 4, 4).items()}
    y, last = vmrnn._SelectiveScanFn.apply(x["u"], x["delta"], x["A"], x["B"], x["C"])
    grads = torch.autograd.grad((y * y).sum() + last.sum(), [x[k] for k in "u delta A B C".split()])
    assert y.is_contiguous() and all(g.is_contiguous() for g in grads)


# ==================================================================================================
# data.py: generators, file readers, downloads (against a local HTTP server on 127.0.0.1)
# ==================================================================================================



def needs_t10k():
    if not T10K.is_file():
        pytest.skip(f"real MNIST digits not available ({T10K} missing)")


# ---- helpers --------------------------------------------------------------------------------------------------

def idx_bytes(images: np.ndarray, magic: int = data.IDX_IMAGES_MAGIC) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">4I", magic, n, rows, cols) + images.astype(np.uint8).tobytes()


def random_digits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def swinlstm_trajectory(y: float, x: float, theta: float, frames: int, step: float = 0.1):
    """The authors' scalar loop, written out independently of data.bouncing_trajectories."""
    vy, vx = np.sin(theta), np.cos(theta)
    out = []
    for _ in range(frames):
        y += vy * step
        x += vx * step
        if x <= 0:
            x, vx = 0.0, -vx
        if x >= 1:
            x, vx = 1.0, -vx
        if y <= 0:
            y, vy = 0.0, -vy
        if y >= 1:
            y, vy = 1.0, -vy
        out.append((y, x))
    return out


def render_reference(ds: data.MovingMNIST, i: int) -> np.ndarray:
    """Sequence i rendered from its drawn start/direction/digits with scalar code: uint8 (t, h, w)."""
    plan = ds.plan
    video = np.zeros((ds.frames, ds.canvas, ds.canvas), np.uint8)
    free = ds.canvas - data.DIGIT_SIZE
    for k in range(ds.num_digits):
        digit = ds.digits[plan.digit[i, k]]
        path = swinlstm_trajectory(*plan.start[i, k], plan.theta[i, k], ds.frames)
        for t, (y, x) in enumerate(path):
            top, left = int(free * y), int(free * x)
            for r in range(28):
                for c in range(28):
                    video[t, top + r, left + c] = max(video[t, top + r, left + c], digit[r, c])
    return video


def as_uint8(item: torch.Tensor) -> np.ndarray:
    return (item[:, 0] * 255).round().to(torch.uint8).numpy()


def loader_items(ds, workers: int) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, num_workers=workers)
    return torch.cat(list(loader))


# ---- Moving MNIST generator -----------------------------------------------------------------------------------

def test_mmnist_items_shape_dtype_range():
    ds = data.MovingMNIST(random_digits(50), length=8)
    x = ds[3]
    assert x.shape == (20, 1, 64, 64) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0
    assert len(ds) == 8
    other = data.MovingMNIST(random_digits(50), length=4, input_frames=5, output_frames=3, canvas=48, num_digits=3)
    assert other[0].shape == (8, 1, 48, 48)
    with pytest.raises(IndexError):
        ds[8]


def test_trajectories_follow_the_swinlstm_rule():
    rng = np.random.default_rng(1)
    start, theta = rng.random((200, 2)), 2 * np.pi * rng.random(200)
    got = data.bouncing_trajectories(start, theta, 30)                     # (t, n, 2)
    assert got.shape == (30, 200, 2)
    assert got.min() >= 0 and got.max() <= 1
    for n in range(200):
        np.testing.assert_allclose(got[:, n], swinlstm_trajectory(*start[n], theta[n], 30), rtol=0, atol=1e-12)
    assert (got == 0).any() and (got == 1).any()                           # some walls are hit


def test_trajectory_bounces_off_a_wall():
    got = data.bouncing_trajectories(np.array([0.5, 0.95]), np.array(0.0), 4)   # moving +x, towards the wall
    np.testing.assert_allclose(got[:, 0], 0.5)
    np.testing.assert_allclose(got[:, 1], [1.0, 0.9, 0.8, 0.7])            # clamped, then moving back


def test_mmnist_rendering_two_digits_inside_canvas():
    ds = data.MovingMNIST(random_digits(30, seed=2), length=6, seed=3)
    corner = ds.plan.corner                                                # (n, t, k, 2)
    assert corner.min() >= 0 and corner.max() <= 64 - 28
    for i in range(6):
        video = as_uint8(ds[i])
        np.testing.assert_array_equal(video, render_reference(ds, i))
        covered = np.zeros_like(video, dtype=bool)
        for t in range(ds.frames):
            for k in range(2):                                             # both digits visible where they lie
                y, x = corner[i, t, k]
                digit = ds.digits[ds.plan.digit[i, k]]
                assert (video[t, y:y + 28, x:x + 28] >= digit).all()
                covered[t, y:y + 28, x:x + 28] = True
        assert (video[~covered] == 0).all()                                # nothing outside the digits


def test_mmnist_digits_move_between_frames():
    ds = data.MovingMNIST(random_digits(30), length=20, seed=4)
    moves = np.abs(np.diff(ds.plan.corner.astype(int), axis=1)).max(axis=-1)   # (n, t-1, k)
    assert moves.max() <= 4 and moves.mean() > 1                           # 3.6 px per frame along a direction


def test_validation_is_fixed_across_calls_epochs_and_workers():
    val = data.MovingMNIST(random_digits(40), length=12, seed=data.VAL_SEED, stream=data.VAL_STREAM,
                           resample=False)
    first = torch.stack([val[i] for i in range(12)])
    val.set_epoch(7)
    assert torch.equal(torch.stack([val[i] for i in range(12)]), first)
    assert torch.equal(loader_items(val, 0), first)
    assert torch.equal(loader_items(val, 2), first)


def test_training_data_change_with_epoch_and_reproduce():
    digits = random_digits(40)
    train = data.MovingMNIST(digits, length=12, seed=5)
    train.set_epoch(0)
    a = train[4]
    train.set_epoch(1)
    b = train[4]
    train.set_epoch(0)
    assert not torch.equal(a, b)
    assert torch.equal(train[4], a)
    resumed = data.MovingMNIST(digits, length=12, seed=5)                  # a resumed run sees the same data
    resumed.set_epoch(1)
    assert torch.equal(resumed[4], b)
    other_seed = data.MovingMNIST(digits, length=12, seed=6)
    assert not torch.equal(other_seed[4], a)
    train.set_epoch(3)
    assert torch.equal(loader_items(train, 0), loader_items(train, 2))


def test_train_and_val_streams_differ():
    digits = random_digits(40)
    train = data.MovingMNIST(digits, length=5, seed=0, stream=data.TRAIN_STREAM)
    val = data.MovingMNIST(digits, length=5, seed=0, stream=data.VAL_STREAM, resample=False)
    assert not np.array_equal(train.plan.start, val.plan.start)


# ---- idx parser -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_idx_reader_good_file(tmp_path, compress):
    images = random_digits(7)
    raw = idx_bytes(images)
    path = tmp_path / "digits"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    got = data.read_idx_images(path)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, images)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("problem, make, message", [
    ("truncated", lambda: idx_bytes(random_digits(5))[:-100], "truncated idx file"),
    ("header only part", lambda: idx_bytes(random_digits(5))[:10], "truncated idx file"),
    ("wrong magic", lambda: idx_bytes(random_digits(5), magic=2049), "magic number 2049"),
    ("not 28x28", lambda: idx_bytes(np.zeros((2, 32, 32), np.uint8)), "32x32"),
])
def test_idx_reader_bad_files(tmp_path, compress, problem, make, message):
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(gzip.compress(make()) if compress else make())
    with pytest.raises(DataError, match=message) as error:
        data.read_idx_images(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_idx_reader_corrupt_gzip_and_missing(tmp_path):
    good = gzip.compress(idx_bytes(random_digits(5)))
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.gz").write_bytes(data.GZIP_MAGIC + b"\x08\x00garbage" * 10)
    for name in ("cut.gz", "garbage.gz"):
        with pytest.raises(DataError, match="gzip"):
            data.read_idx_images(tmp_path / name)
    with pytest.raises(DataError, match="missing.gz"):
        data.read_idx_images(tmp_path / "missing.gz")


# ---- real MNIST digits (t10k file from shared/data) -----------------------------------------------------------

def test_t10k_digits_and_checksum():
    needs_t10k()
    digits = data.read_idx_images(T10K)
    assert digits.shape == (10_000, 28, 28) and digits.max() == 255
    assert 25 < digits.mean() < 40                                          # MNIST's mean pixel is about 33
    assert hashlib.md5(T10K.read_bytes()).hexdigest() == data.MNIST_MD5[T10K.name]


def test_digits_file_split_is_deterministic_and_labelled(tmp_path):
    needs_t10k()
    train, val = data.build_datasets("mmnist", tmp_path, digits_file=T10K, download=False)
    digits = data.read_idx_images(T10K)
    np.testing.assert_array_equal(train.digits, digits[:7000])
    np.testing.assert_array_equal(val.digits, digits[7000:])
    assert len(train) == data.MMNIST_EPOCH and len(val) == 3000
    assert "NOT the paper protocol" in train.describe() and "NOT the paper protocol" in val.describe()
    x = val[0]
    assert x.shape == (20, 1, 64, 64) and x.max() == 1.0
    assert not list(tmp_path.iterdir())                                    # nothing downloaded or written


def test_paper_protocol_needs_13000_digits(tmp_path):
    needs_t10k()
    (tmp_path / data.MNIST_TRAIN_FILE).write_bytes(T10K.read_bytes())      # only 10,000 digits
    with pytest.raises(DataError, match="13,000"):
        data.build_datasets("mmnist", tmp_path, download=False)


# ---- paper protocol with a fake train file and a fake mnist_test_seq.npy --------------------------------------

@pytest.fixture(scope="module")
def fake_mnist_dir(tmp_path_factory):
    """13,000 random digits as a raw idx file in torchvision's cache layout (data_dir/MNIST/raw/)."""
    root = tmp_path_factory.mktemp("mnist")
    (root / "MNIST" / "raw").mkdir(parents=True)
    (root / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(idx_bytes(random_digits(13_000, seed=9)))
    return root


def test_paper_protocol_digit_ranges_and_generated_val(fake_mnist_dir):
    train, val = data.build_datasets("mmnist", fake_mnist_dir, download=False, val_length=10)
    digits = random_digits(13_000, seed=9)
    np.testing.assert_array_equal(train.digits, digits[:10_000])
    np.testing.assert_array_equal(val.digits, digits[10_000:13_000])
    assert isinstance(val, data.MovingMNIST) and not val.resample and len(val) == 10
    assert "paper protocol" in train.describe() and "NOT the paper's fixed test set" in val.describe()
    again = data.build_datasets("mmnist", fake_mnist_dir, download=False, val_length=10, seed=123)[1]
    assert torch.equal(val[3], again[3])                                   # independent of the training seed


def test_fixed_test_seq_is_used_when_present(fake_mnist_dir, tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "MNIST").symlink_to(fake_mnist_dir / "MNIST", target_is_directory=True)
    videos = np.random.default_rng(0).integers(0, 256, (20, 3, 64, 64), dtype=np.uint8)
    np.save(root / data.MNIST_TEST_SEQ_FILE, videos)
    train, val = data.build_datasets("mmnist", root, download=False)
    assert isinstance(val, data.MovingMNISTFixed) and len(val) == 3
    assert "mnist_test_seq.npy" in val.describe() and "paper protocol" in val.describe()
    x = val[1]
    assert x.shape == (20, 1, 64, 64) and x.dtype == torch.float32
    np.testing.assert_array_equal(as_uint8(x), videos[:, 1])
    assert torch.equal(pickle.loads(pickle.dumps(val))[1], x)             # as a spawned worker sees it
    _, generated = data.build_datasets("mmnist", root, download=False, fixed_val=False)
    assert isinstance(generated, data.MovingMNIST)
    _, other_frames = data.build_datasets("mmnist", root, download=False, input_frames=5, output_frames=5)
    assert isinstance(other_frames, data.MovingMNIST) and other_frames[0].shape == (10, 1, 64, 64)
    with pytest.raises(ValueError, match="fixed_val"):
        data.build_datasets("mmnist", root, download=False, fixed_val=True, input_frames=5, output_frames=5)


@pytest.mark.parametrize("problem, message", [("shape", "expected uint8"), ("truncated", "truncated"),
                                              ("not npy", "not a readable")])
def test_fixed_test_seq_bad_files(tmp_path, problem, message):
    path = tmp_path / data.MNIST_TEST_SEQ_FILE
    if problem == "shape":
        np.save(path, np.zeros((10, 3, 64, 64), np.uint8))
    elif problem == "truncated":
        np.save(path, np.zeros((20, 3, 64, 64), np.uint8))
        path.write_bytes(path.read_bytes()[:-1000])
    else:
        path.write_bytes(b"this is not a numpy file" * 10)
    with pytest.raises(DataError, match=message) as error:
        data.MovingMNISTFixed(path)
    assert str(path) in str(error.value)


# ---- TaxiBJ ---------------------------------------------------------------------------------------------------

def taxibj_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.uniform(-1, 1, (n, 4, 2, 32, 32)) for k, n in
            (("X_train", 3), ("Y_train", 3), ("X_test", 2), ("Y_test", 2))}


def test_taxibj_reader(tmp_path):
    arrays = taxibj_arrays()
    (tmp_path / "taxibj").mkdir()
    np.savez(tmp_path / "taxibj" / "dataset.npz", **arrays)
    train, val = data.build_datasets("taxibj", tmp_path)
    assert (len(train), len(val)) == (3, 2) and "TaxiBJ" in train.describe()
    x = train[2]
    assert x.shape == (8, 2, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    expected = (np.concatenate([arrays["X_train"][2], arrays["Y_train"][2]]) + 1) / 2
    np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(val[1].numpy()[4:], (arrays["Y_test"][1] + 1) / 2, rtol=0, atol=1e-6)
    short = data.build_datasets("taxibj", tmp_path, input_frames=2, output_frames=3)[0][2]
    np.testing.assert_allclose(short.numpy(), expected[2:7], rtol=0, atol=1e-6)
    with pytest.raises(DataError, match="4\\+4 frames"):
        data.build_datasets("taxibj", tmp_path, input_frames=6)


@pytest.mark.parametrize("problem, message", [
    ("missing", "not found"), ("keys", "missing"), ("shape", "expected float"), ("range", "expected \\[-1, 1\\]"),
    ("not zip", "not a readable"), ("truncated", "not a readable"), ("npy", "single .npy"),
    ("lengths", "sequences"),
])
def test_taxibj_bad_files(tmp_path, problem, message):
    path = tmp_path / "dataset.npz"
    arrays = taxibj_arrays()
    if problem == "keys":
        del arrays["Y_train"]
    if problem == "shape":
        arrays["X_train"] = arrays["X_train"][..., :16]
    if problem == "range":
        arrays["X_train"] = (arrays["X_train"] + 1) * 127.5
    if problem == "lengths":
        arrays["Y_train"] = arrays["Y_train"][:2]
    if problem != "missing":
        np.savez(path, **arrays)
    if problem == "not zip":
        path.write_bytes(b"PK not really a zip" * 20)
    if problem == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    if problem == "npy":
        with open(path, "wb") as f:
            np.save(f, arrays["X_train"])
    with pytest.raises(DataError, match=message) as error:
        data.TaxiBJ(path, "train")
    assert str(path) in str(error.value) and "\n" not in str(error.value)


# ---- KTH ------------------------------------------------------------------------------------------------------

def write_kth_sequence(root, action, person, numbers, rgb=False):
    folder = root / action / f"person{person:02d}_{action}_d1_uncomp"
    folder.mkdir(parents=True)
    for n in numbers:
        value = np.full((12, 16), 10 * n, np.uint8)                      # h 12, w 16: resized to 8 x 8
        frame = np.stack([value, 255 - value, value // 2], -1) if rgb else value
        Image.fromarray(frame).save(folder / f"image_{n:04d}.png")


@pytest.fixture
def kth_root(tmp_path):
    root = tmp_path / "kth"
    for action in data.KTH_ACTIONS:
        (root / action).mkdir(parents=True)
    write_kth_sequence(root, "boxing", 1, range(1, 13))                    # 12 frames
    write_kth_sequence(root, "jogging", 2, range(1, 10))                   # 9 frames, stride 3
    write_kth_sequence(root, "walking", 17, range(1, 9), rgb=True)         # test person, colour frames
    write_kth_sequence(root, "handclapping", 18, [*range(1, 7), *range(8, 14)])   # a gap after frame 6
    (root / "boxing" / "person01_boxing_d1_uncomp" / "notes.txt").write_text("not a frame")
    return root


def first_frame_numbers(ds):
    return [int(ds.windows[i][0].stem[6:]) for i in range(len(ds))]


def test_kth_windows_and_frames(kth_root):
    train, val = data.build_datasets("kth", kth_root.parent, input_frames=2, output_frames=3, image_size=8)
    # boxing: windows end at the last frame, non-overlapping (stride 5): frames 3..7, 8..12; jogging: stride 3
    assert first_frame_numbers(train) == [3, 8, 2, 5]
    # handclapping (gap between 6 and 8): 9..13, then 2..6; walking: 4..8
    assert first_frame_numbers(val) == [2, 9, 4]
    assert "persons 01-16" in train.describe() and "persons 17-25" in val.describe()
    for ds in (train, val):
        for i in range(len(ds)):
            x = ds[i]
            assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32
            start = first_frame_numbers(ds)[i]
            numbers = [int(p.stem[6:]) for p in ds.windows[i]]
            assert numbers[0] == start
            np.testing.assert_allclose(x[:, 0, 0, 0].numpy(), [10 * n / 255 for n in numbers], atol=1e-6)
            assert torch.equal(x, x[:, :, :1, :1].expand_as(x))             # constant frames stay constant


def test_kth_window_rule_matches_openstl_global_walk():
    """OpenSTL walks backwards over all frames of all folders at once; our per-folder rule must agree."""
    rng = np.random.default_rng(0)
    for trial in range(30):
        length = int(rng.integers(3, 12))
        folders = []
        for _ in range(int(rng.integers(1, 5))):
            numbers = np.cumsum(rng.choice([1, 1, 1, 1, 1, 1, 2], int(rng.integers(0, 60))))
            folders.append((list(numbers), 3 if rng.random() < 0.5 else length))
        # reference: one flat list, folder marks, the category's stride at each window's end
        flat, marks, strides = [], [], []
        for mark, (numbers, stride) in enumerate(folders):
            flat += numbers
            marks += [mark] * len(numbers)
            strides += [stride] * len(numbers)
        expected, index = [], len(flat) - 1
        while index >= length - 1:
            start = index - length + 1
            if marks[index] == marks[start] and flat[index] - flat[start] == length - 1:
                expected.append(start)
                index -= strides[index] - 1
            index -= 1
        offset, got = 0, []
        for numbers, stride in folders:
            got += [offset + s for s in data.kth_window_starts(numbers, length, stride)]
            offset += len(numbers)
        assert sorted(expected) == got


def test_kth_bad_layouts(kth_root):
    with pytest.raises(DataError, match="no 30-frame windows"):            # the default 10 -> 20
        data.build_datasets("kth", kth_root.parent)
    (kth_root / "running").rmdir()
    with pytest.raises(DataError, match="running"):
        data.build_datasets("kth", kth_root.parent, input_frames=2, output_frames=3)


def test_kth_corrupt_frame(kth_root):
    frame = kth_root / "boxing" / "person01_boxing_d1_uncomp" / "image_0005.png"
    frame.write_bytes(frame.read_bytes()[:40])
    train, _ = data.build_datasets("kth", kth_root.parent, input_frames=2, output_frames=3, image_size=8)
    with pytest.raises(DataError, match="image_0005.png"):
        train[0]


# ---- shapes and the entry point -------------------------------------------------------------------------------

def test_shapes_offline_set():
    train, val = data.build_datasets("shapes", "unused", channels=3, image_size=32, train_length=6, val_length=4)
    x = train[0]
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and (x > 0).any(dim=(1, 2, 3)).all()   # something in every frame
    assert not torch.equal(x[0], x[-1])                                     # it moves
    assert "NOT a benchmark" in train.describe()
    train.set_epoch(1)
    assert not torch.equal(train[0], x)
    train.set_epoch(0)
    assert torch.equal(train[0], x)
    val.set_epoch(1)
    assert torch.equal(loader_items(val, 0), torch.stack([val[i] for i in range(4)]))


def test_build_datasets_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        data.build_datasets("mnist", tmp_path)
    with pytest.raises(ValueError, match="digits_file"):
        data.build_datasets("kth", tmp_path, digits_file="x")
    with pytest.raises(TypeError):
        data.build_datasets("shapes", tmp_path, chanels=3)
    train, val = data.build_datasets("shapes", tmp_path)
    assert train[0].shape == (20, 1, 64, 64) and (train.input_frames, train.output_frames) == (10, 10)


def test_set_epoch_exists_everywhere(tmp_path, kth_root):
    np.savez(tmp_path / "dataset.npz", **taxibj_arrays())
    taxibj, _ = data.build_datasets("taxibj", tmp_path)
    kth, _ = data.build_datasets("kth", kth_root.parent, input_frames=2, output_frames=3, image_size=8)
    for ds in (taxibj, kth):
        before = ds[0]
        ds.set_epoch(4)
        assert torch.equal(ds[0], before)


def test_missing_mnist_without_download(tmp_path):
    with pytest.raises(DataError) as error:
        data.build_datasets("mmnist", tmp_path, download=False)
    message = str(error.value)
    assert str(tmp_path / data.MNIST_TRAIN_FILE) in message and data.MNIST_MIRRORS[0] in message


# ---- downloads against a local HTTP server --------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        server.ranges.append(self.headers.get("Range"))
        if server.missing:
            self.send_error(404)
            return
        body, start = server.payload, 0
        requested = self.headers.get("Range")
        if requested and server.honour_range:
            start = int(requested.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        rest = body[start:]
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        if server.cut_next:                                              # send half, then close the connection
            server.cut_next = False
            self.wfile.write(rest[: len(rest) // 2])
            return
        self.wfile.write(rest)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.payload = np.random.default_rng(0).bytes(300_000)
    httpd.missing, httpd.honour_range, httpd.cut_next, httpd.ranges = False, True, False, []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/file.bin"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def test_download_good_file(server, tmp_path):
    dest = tmp_path / "sub" / "file.bin"
    assert data.download_file([server.url], dest, md5(server.payload)) == dest
    assert dest.read_bytes() == server.payload
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]


def test_download_checksum_mismatch(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(DataError, match="md5") as error:
        data.download_file([server.url], dest, "0" * 32)
    assert str(dest) in str(error.value) and server.url in str(error.value)
    assert list(tmp_path.iterdir()) == []                                  # no final file, no part


@pytest.mark.parametrize("honour_range", [True, False], ids=["resume", "restart"])
def test_download_interrupted_then_retried(server, tmp_path, honour_range):
    dest, part = tmp_path / "file.bin", tmp_path / "file.bin.part"
    server.cut_next = True
    with pytest.raises(DataError, match="connection closed") as error:
        data.download_file([server.url], dest, md5(server.payload))
    assert "resume" in str(error.value)
    assert not dest.exists() and part.stat().st_size == len(server.payload) // 2
    server.honour_range = honour_range
    data.download_file([server.url], dest, md5(server.payload))
    assert dest.read_bytes() == server.payload and not part.exists()
    assert server.ranges == [None, f"bytes={len(server.payload) // 2}-"]   # the retry asked for the rest


def test_download_complete_part_is_finished(server, tmp_path):
    (tmp_path / "file.bin.part").write_bytes(server.payload)               # e.g. killed before the rename
    data.download_file([server.url], tmp_path / "file.bin", md5(server.payload))
    assert (tmp_path / "file.bin").read_bytes() == server.payload


def test_download_unreachable(tmp_path):
    with socket.socket() as s:                                             # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/train-images-idx3-ubyte.gz"
    dest = tmp_path / "train-images-idx3-ubyte.gz"
    with pytest.raises(DataError) as error:
        data.download_file([url], dest, "0" * 32, timeout=5)
    message = str(error.value)
    assert dest.name in message and str(dest) in message and url in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_fetch_mnist_from_mirrors(server, tmp_path):
    needs_t10k()
    server.payload = T10K.read_bytes()
    base = server.url.removesuffix("file.bin")
    dead = f"http://127.0.0.1:{server.server_address[1]}/missing/"
    server.missing = False
    path = data.fetch_mnist(tmp_path, T10K.name, mirrors=[base])           # verified against MNIST_MD5
    assert path == tmp_path / T10K.name and path.read_bytes() == T10K.read_bytes()
    assert data.read_idx_images(path).shape == (10_000, 28, 28)
    assert data.fetch_mnist(tmp_path, T10K.name, mirrors=[dead]) == path   # present: no second download
    assert len(server.ranges) == 1


def test_fetch_mnist_falls_back_to_next_mirror(server, tmp_path, monkeypatch):
    needs_t10k()
    server.payload = T10K.read_bytes()
    good = server.url.removesuffix("file.bin")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
    monkeypatch.setattr(data, "MNIST_MIRRORS", (dead, good))
    path = data.fetch_mnist(tmp_path, T10K.name)
    assert path.read_bytes() == T10K.read_bytes()

# ==================================================================================================
# train.py: metrics, pictures, schedule, and end-to-end CPU runs on tiny models
# ==================================================================================================

# A model and data small enough for a step in well under a second: 16x16 frames, 2 -> 2, width 16, one block.
TINY = ["--data", "shapes", "--image-size", "16", "--input-frames", "2", "--output-frames", "2",
        "--embed-dim", "16", "--depths", "1", "--batch-size", "2", "--train-length", "6", "--val-samples", "3",
        "--num-workers", "0", "--log-every", "1", "--device", "cpu", "--seed", "3", "--threads", "1"]


def train_run(out, *extra):
    return train.main(TINY + ["--out", str(out), *extra])


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def error_message(argv, capsys):
    """Run main(argv), expect SystemExit, return its message (parser errors go to stderr)."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code not in (0, None)
    return f"{e.value.code} {capsys.readouterr().err}"


# --------------------------------------------------------------------------------------------------
# Metrics, schedule, pictures: pure functions
# --------------------------------------------------------------------------------------------------

def test_mse_mae_are_per_frame_sums():
    target = np.zeros((2, 3, 1, 4, 4))
    pred = np.zeros((2, 3, 1, 4, 4))
    pred[0, 1, 0, :2, :] = 0.5                           # 8 pixels off by 0.5 in one frame
    pred[1, 2] = 1.0                                     # a whole frame off by 1 (16 pixels)
    mse, mae = train.mse_per_frame(pred, target), train.mae_per_frame(pred, target)
    assert mse.shape == mae.shape == (2, 3)
    assert mse[0, 1] == pytest.approx(8 * 0.25) and mae[0, 1] == pytest.approx(8 * 0.5)
    assert mse[1, 2] == pytest.approx(16.0) and mae[1, 2] == pytest.approx(16.0)
    assert mse.mean() == pytest.approx((2 + 16) / 6)     # the reported MSE: mean over sequences and frames
    assert mse.sum() - mse[0, 1] - mse[1, 2] == 0


def test_ssim_data_range_conventions():
    rng = np.random.default_rng(0)
    target = np.zeros((1, 2, 1, 32, 32))
    target[..., 8:20, 10:22] = 0.9                       # a dark frame with a bright square, like a digit
    pred = np.clip(np.roll(target, 2, axis=-1) + 0.05 * rng.standard_normal(target.shape), 0, 1)
    dr1, dr2 = train.ssim_per_frame(pred, target, 1.0), train.ssim_per_frame(pred, target, 2.0)
    direct = [structural_similarity(target[0, j, 0], pred[0, j, 0], data_range=1.0) for j in range(2)]
    np.testing.assert_allclose(dr1[0], direct)
    assert np.all(dr2 > dr1 + 0.1)                       # data_range=2 inflates SSIM: the two must be labelled
    assert train.ssim_per_frame(target, target, 1.0) == pytest.approx(np.ones((1, 2)))


def test_psnr_in_float_even_for_uint8():
    target = np.full((1, 1, 1, 4, 4), 200, np.uint8)
    pred = np.zeros((1, 1, 1, 4, 4), np.uint8)           # uint8 differences would wrap: (0 - 200) % 256 = 56
    expected = 20 * np.log10(255) - 10 * np.log10(200 ** 2)
    assert train.psnr_per_frame(pred, target)[0, 0] == pytest.approx(expected)       # about 2.11 dB
    wrapped = 20 * np.log10(255) - 10 * np.log10(float(((pred - target) ** 2).mean()))
    assert abs(wrapped - expected) > 1                   # what the bug would give is far off
    f = np.full((1, 1, 1, 4, 4), 0.25)
    assert train.psnr_per_frame(np.zeros_like(f), f)[0, 0] == pytest.approx(10 * np.log10(1 / 0.0625))


def test_learning_rate_schedules():
    cfg = dict(lr=4e-4, warmup_epochs=5, schedule="cosine", epochs=200)
    assert train.learning_rate(0, cfg) == pytest.approx(train.WARMUP_LR)
    assert train.learning_rate(4, cfg) == pytest.approx(train.WARMUP_LR + 4 * (4e-4 - train.WARMUP_LR) / 5)
    assert train.learning_rate(100, cfg) == pytest.approx((4e-4 + train.MIN_LR) / 2)
    assert train.learning_rate(199, cfg) < 1e-6 + 1e-7
    assert train.learning_rate(7, dict(cfg, schedule="constant")) == 4e-4


def test_sample_grid_layout():
    frames = np.random.default_rng(0).random((2, 7, 2, 32, 32))            # 2 sequences, 4 -> 3, 2 channels
    image = train.sample_grid(frames, frames[:, 4:], 4, with_error=True)
    rows, tile = 2 * 2 * 4, 64                                              # seq x channel x 4 rows, 32 px x2
    assert image.dtype == np.uint8
    assert image.shape == (2 + rows * (tile + 2) + 8, 48 + 4 * (tile + 2) + 2)
    y, x = 2 + 3 * (tile + 2), 48 + 2                                       # first |error| tile: exact -> 0
    assert image[y:y + tile, x:x + tile].max() == 0


# --------------------------------------------------------------------------------------------------
# End-to-end runs on "shapes"
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """4 steps in one go: 3 steps per epoch (6 sequences, batch 2), so the run crosses an epoch boundary."""
    out = tmp_path_factory.mktemp("straight")
    return out, train_run(out, "--max-steps", "4")


def test_run_folder_is_well_formed(straight):
    out, result = straight
    assert result["step"] == 4 and result["epoch"] == 1
    ckpt = torch.load(out / "ckpt_last.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "rng", "config", "step", "epoch", "elapsed_s"} <= ckpt.keys()
    assert ckpt["step"] == 4 and ckpt["epoch"] == 1 and ckpt["batch_in_epoch"] == 1
    assert ckpt["config"]["model"] == "vmrnn-b" and ckpt["config"]["depths"] == [1]
    assert torch.load(out / "ckpt_best.pt", weights_only=True)["best_mse"] == pytest.approx(result["best_mse"])
    with open(out / "log.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == train.CSV_FIELDS
    assert [(r["kind"], int(r["step"])) for r in rows] == \
        [("train", 1), ("train", 2), ("train", 3), ("eval", 3), ("train", 4), ("eval", 4)]
    assert all(float(r["loss"]) > 0 for r in rows if r["kind"] == "train")
    last = rows[-1]
    assert float(last["mse"]) == pytest.approx(result["metrics"]["mse"], rel=1e-5)
    assert len(last["mse_per_frame"].split()) == 2
    for name in ("samples.png", "samples_best.png"):
        with Image.open(out / name) as image:
            # 3 sequences x 3 rows (input, truth, pred) of 2 frames, 16 px enlarged to 64
            assert image.format == "PNG" and image.size == (48 + 2 * 66 + 2, 2 + 9 * 66 + 3 * 8 - 8)
    m = result["metrics"]
    assert m["sequences"] == 3 and len(m["mse_per_frame"]) == 2
    assert np.mean(m["mse_per_frame"]) == pytest.approx(m["mse"])
    assert 0 < m["mse"] < 256 and 0 < m["mae"] < 256 and -1 < m["ssim_dr1"] < m["ssim"] < 1


def test_resume_is_exact(straight, tmp_path):
    out, _ = straight
    first = train_run(tmp_path, "--max-steps", "2")                       # stops mid-epoch 0
    assert first["step"] == 2
    second = train.main(["--resume", "--out", str(tmp_path), "--max-steps", "4", "--device", "cpu",
                         "--num-workers", "0"])
    assert second["step"] == 4
    assert_same_weights(weights(tmp_path / "ckpt_last.pt"), weights(out / "ckpt_last.pt"))
    assert second["metrics"]["mse"] == torch.load(out / "ckpt_last.pt", weights_only=True)["metrics"]["mse"]
    with open(tmp_path / "log.csv", newline="") as f:
        steps = [(r["kind"], int(r["step"])) for r in csv.DictReader(f)]
    assert steps == [("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("eval", 3), ("train", 4), ("eval", 4)]


def test_eval_only_from_our_checkpoint(straight):
    out, result = straight
    again = train.main(["--eval-only", "--ckpt", str(out / "ckpt_last.pt"), "--device", "cpu",
                        "--num-workers", "0"])
    assert again["metrics"]["mse"] == result["metrics"]["mse"]
    assert again["metrics"]["ssim"] == result["metrics"]["ssim"]


def test_eval_only_from_authors_state_dict(tmp_path):
    path = SHARED / "fixtures" / "mmnist_b_small.pt"
    if not path.exists():
        pytest.skip(f"{path} not found: the official fixtures live in ../shared beside the checkout")
    fixture = torch.load(path, weights_only=True)
    cfg = fixture["config"]                                          # img 16, patch 2, embed 32, depths [2]
    argv = ["--data", "shapes", "--image-size", str(cfg["img_size"]), "--model", "vmrnn-b",
            "--patch-size", str(cfg["patch_size"]), "--embed-dim", str(cfg["embed_dim"]),
            "--depths", *map(str, cfg["depths"]), "--input-frames", "2", "--output-frames", "2",
            "--val-samples", "2", "--num-workers", "0", "--device", "cpu", "--eval-only", "--ckpt", str(path),
            "--out", str(tmp_path)]
    result = train.main(argv)
    model = result["model"].eval()
    with torch.no_grad():
        outputs = model(fixture["inputs"], fixture["T_out"])
    torch.testing.assert_close(outputs, fixture["outputs"], atol=1e-5, rtol=0)   # the weights really loaded
    assert result["metrics"]["sequences"] == 2 and np.isfinite(result["metrics"]["mse"])
    assert (tmp_path / "samples_eval.png").exists()
    torch.save(fixture["state_dict"], tmp_path / "bare.pt")                      # the authors' bare format
    bad = [a if a != str(path) else str(tmp_path / "bare.pt") for a in argv]
    bad[bad.index("--embed-dim") + 1] = "16"
    with pytest.raises(SystemExit, match="does not fit"):
        train.main(bad)


def test_nan_loss_stops_and_keeps_the_checkpoint(straight, tmp_path, monkeypatch, capsys):
    out, _ = straight
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)
    before = (run_dir / "ckpt_last.pt").read_bytes()
    monkeypatch.setattr(train, "compute_loss", lambda pred, target, kind: pred.sum() * float("nan"))
    message = error_message(["--resume", "--out", str(run_dir), "--max-steps", "6", "--device", "cpu",
                             "--num-workers", "0"], capsys)
    assert "loss is nan at step 5" in message and "ckpt_last.pt" in message
    assert (run_dir / "ckpt_last.pt").read_bytes() == before
    assert torch.load(run_dir / "ckpt_last.pt", weights_only=True)["step"] == 4


def test_ddp_two_processes_keep_identical_weights(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text("import os, sys, torch\n"
                      f"sys.path.insert(0, {str(ROOT)!r})\n"
                      "import train\n"
                      "result = train.main(sys.argv[1:])\n"
                      f"torch.save(result['model'].state_dict(), os.path.join({str(tmp_path)!r}, "
                      "f\"rank{os.environ['RANK']}.pt\"))\n")
    argv = [a if a != "6" else "8" for a in TINY]                     # 8 sequences: 2 steps of 2 per rank
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), *argv, "--max-steps", "2", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same_weights(rank0, rank1)
    assert_same_weights(rank0, weights(tmp_path / "run" / "ckpt_last.pt"))
    ckpt = torch.load(tmp_path / "run" / "ckpt_last.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert ckpt["metrics"]["sequences"] == 3                         # 3 val sequences split 2 + 1, all-reduced
    start = train.build_model(ckpt["config"] | {"drop_path": 0.1}, 1, 16).state_dict()
    assert any(not torch.equal(start[k], rank0[k]) for k in rank0)    # the weights did train


# --------------------------------------------------------------------------------------------------
# Errors: one readable line, no traceback
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, expected", [
    (["--model", "vmrnn-d", "--depths", "2", "6"], "--depths: vmrnn-d takes 4"),
    (["--depths", "2", "2"], "--depths: vmrnn-b takes 1"),
    (["--image-size", "17"], "not divisible by patch_size 2"),
    (["--eval-only"], "--eval-only needs --ckpt"),
    (["--resume"], "no checkpoint"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--batch-size", "8"], "make no batch of 8"),
    (["--digits-file", "x.gz"], "--digits-file applies to --data mmnist only"),
])
def test_bad_flags(extra, expected, tmp_path, capsys):
    argv = TINY + ["--out", str(tmp_path / "run"), *extra]
    if "--resume" in extra:
        argv = ["--resume", "--out", str(tmp_path)]
    assert expected in error_message(argv, capsys)


def test_data_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad-idx.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    common = ["--device", "cpu", "--num-workers", "0", "--out", str(tmp_path / "run")]
    message = error_message(["--data", "mmnist", "--digits-file", str(bad), *common], capsys)
    assert message.startswith("error: ") and str(bad) in message and "\n" not in message.strip()
    message = error_message(["--data", "taxibj", "--data-dir", str(tmp_path), *common], capsys)
    assert "dataset.npz" in message and "not found" in message


def test_existing_run_is_not_overwritten(straight, capsys):
    out, _ = straight
    assert "already holds a run" in error_message(TINY + ["--out", str(out)], capsys)


def test_checkpoint_that_does_not_fit(straight, tmp_path, capsys):
    out, _ = straight
    assert "--embed-dim cannot change on --resume" in error_message(["--resume", "--out", str(out), "--embed-dim",
                                                                     "32", "--device", "cpu"], capsys)


# --------------------------------------------------------------------------------------------------
# Moving MNIST on real digits (the quick start's data)
# --------------------------------------------------------------------------------------------------

def test_moving_mnist_on_t10k_digits(tmp_path):
    if not T10K.exists():
        pytest.skip(f"{T10K} not found: the MNIST t10k digits live in ../shared beside the checkout")
    result = train.main(["--data", "mmnist", "--digits-file", str(T10K), "--device", "cpu", "--embed-dim", "16",
                         "--depths", "1", "1", "1", "1", "--patch-size", "8", "--input-frames", "2", "--output-frames", "2",
                         "--train-length", "4", "--batch-size", "2", "--max-steps", "2", "--val-samples", "2",
                         "--num-workers", "0", "--out", str(tmp_path)])
    assert isinstance(result["model"], VMRNN_D) and not isinstance(result["model"], VMRNN_B)
    ckpt = torch.load(tmp_path / "ckpt_last.pt", weights_only=True)
    assert ckpt["config"]["loss"] == "mse+l1" and ckpt["config"]["lr"] == 5e-5 and ckpt["config"]["amp"] == "none"
    m = result["metrics"]
    assert result["step"] == 2 and m["sequences"] == 2
    assert 0 < m["mse"] < 64 * 64 and np.isfinite([m["mae"], m["ssim"], m["psnr"]]).all()
    with Image.open(tmp_path / "samples.png") as image:                 # 64 px frames, not enlarged
        assert image.size == (48 + 2 * 66 + 2, 2 + 9 * 66 + 3 * 8 - 8)


def log_rows(out):
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def resume(out, *extra):
    return train.main(["--resume", "--out", str(out), "--device", "cpu", *extra])


@pytest.fixture
def copied(straight, tmp_path):
    """A private copy of the module's 4-step run (steps 1-3 = epoch 0, step 4 in epoch 1)."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0], run_dir)
    return run_dir


def no_data(monkeypatch):
    """Errors that must come before any dataset is built: building one fails the test."""
    def build_datasets(*args, **kwargs):
        raise AssertionError("datasets were built before the error")
    monkeypatch.setattr(train, "build_datasets", build_datasets)


def one_line(message):
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1, message
    return message


# --------------------------------------------------------------------------------------------------
# --resume applies the flags given, refuses those that cannot change, records what it used
# --------------------------------------------------------------------------------------------------

def test_resume_applies_given_flags_and_records_them(copied):
    result = resume(copied, "--lr", "1e-3", "--grad-clip", "0.5", "--max-steps", "5")
    assert result["step"] == 5
    ckpt = torch.load(copied / "ckpt_last.pt", weights_only=True)
    cfg = ckpt["config"]
    assert cfg["lr"] == 1e-3 and cfg["grad_clip"] == 0.5 and cfg["max_steps"] == 5
    assert cfg["num_workers"] == 0 and cfg["threads"] == 1           # not given: the run's own values, not defaults
    expected = train.learning_rate(1, cfg)                            # epoch 1 of the new schedule
    assert expected > 1e-4                                            # the old lr would give about 5e-4 * ...
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [expected]
    row = [r for r in log_rows(copied) if r["kind"] == "train"][-1]
    assert int(row["step"]) == 5 and float(row["lr"]) == pytest.approx(expected, rel=1e-5)


def test_gpu_run_resumed_on_cpu_drops_its_gpu_options(copied):
    """A run saved on a GPU (fp16 autocast, CUDA graphs) continues on a CPU in fp32 without graphs, unless the
    user types them."""
    ckpt = torch.load(copied / "ckpt_last.pt", weights_only=True)
    ckpt["config"].update(amp="fp16", cuda_graphs=True)
    torch.save(ckpt, copied / "ckpt_last.pt")
    assert resume(copied, "--max-steps", "5")["step"] == 5
    cfg = torch.load(copied / "ckpt_last.pt", weights_only=True)["config"]
    assert cfg["amp"] == "none" and cfg["cuda_graphs"] is False


@pytest.mark.parametrize("flag, value, saved", [
    ("--data", "mmnist", "shapes"), ("--embed-dim", "32", "16"), ("--depths", "2", "1"),
    ("--batch-size", "3", "2"), ("--seed", "4", "3"), ("--input-frames", "3", "2"),
    ("--cell-update", "paper", "code"), ("--model", "vmrnn-d", "vmrnn-b"),
])
def test_resume_refuses_flags_that_define_the_run(straight, flag, value, saved, capsys, monkeypatch):
    no_data(monkeypatch)
    message = one_line(error_message(["--resume", "--out", str(straight[0]), flag, value], capsys))
    assert f"{flag} cannot change on --resume" in message and f"started with {saved}" in message
    assert f"you gave {value}" in message and "another --out" in message


def test_resume_with_the_original_command_is_fine(copied):
    """Repeating every original flag (same values) with --resume is not a change."""
    assert train.main(TINY + ["--out", str(copied), "--resume", "--max-steps", "5"])["step"] == 5


def test_resume_data_change_names_the_dataset_not_the_digits_file(copied, tmp_path, capsys, monkeypatch):
    ckpt = torch.load(copied / "ckpt_last.pt", weights_only=True)
    ckpt["config"].update(data="mmnist", digits_file=str(tmp_path / "digits.gz"))   # as an mmnist run saves it
    torch.save(ckpt, copied / "ckpt_last.pt")
    no_data(monkeypatch)
    message = one_line(error_message(["--resume", "--out", str(copied), "--data", "shapes"], capsys))
    assert "--data cannot change on --resume" in message and "started with mmnist" in message
    assert "--digits-file" not in message


def test_nan_advice_works(tmp_path, capsys):
    """A huge lr diverges; the printed command, with a lower --lr, continues from the last good checkpoint."""
    out = tmp_path / "run"
    message = one_line(error_message(TINY + ["--out", str(out), "--lr", "10", "--max-steps", "6"], capsys))
    assert "loss is nan at step 5" in message and f"{out / 'ckpt_last.pt'} holds step 3" in message
    assert "--grad-clip 1" in message and "--amp" not in message           # amp is already none
    command = shlex.split(message.split("lower learning rate: ")[1])
    assert command[:2] == ["python", "train.py"]
    argv = command[2:]
    argv[argv.index("--lr") + 1] = "1e-3"
    result = train.main(argv)
    assert result["step"] == 6 and 0 < result["metrics"]["mse"] < 256
    rows = [r for r in log_rows(out) if r["kind"] == "train"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(0 < float(r["loss"]) < 1 for r in rows) and float(rows[-1]["lr"]) < 1e-3


def test_nan_before_any_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(train, "compute_loss", lambda pred, target, kind: pred.sum() * float("nan"))
    message = one_line(error_message(TINY + ["--out", str(out), "--amp", "bf16"], capsys))
    assert "loss is nan at step 1" in message and "No checkpoint was saved yet" in message
    assert "--amp none" in message                                           # offered only when amp is on
    assert not (out / "ckpt_last.pt").exists()
    monkeypatch.undo()
    assert train_run(out, "--max-steps", "1")["step"] == 1                   # the same --out starts afresh
    assert [(r["kind"], r["step"]) for r in log_rows(out)] == [("train", "1"), ("eval", "1")]


def test_weights_that_blow_up_are_not_saved(copied, capsys, monkeypatch):
    """A finite loss, but the update leaves weights that predict inf: the previous checkpoint stays."""
    before = (copied / "ckpt_last.pt").read_bytes()
    real_step = train.make_train_step

    def poisoned(model, optimizer, *args):
        step = real_step(model, optimizer, *args)

        def poisoned_step(frames):
            loss = step(frames)
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))
            return loss
        return poisoned_step
    monkeypatch.setattr(train, "make_train_step", poisoned)
    message = one_line(error_message(["--resume", "--out", str(copied), "--device", "cpu", "--max-steps", "5",
                                      "--save-every", "1"], capsys))
    assert "non-finite" in message and "holds step 4" in message
    assert (copied / "ckpt_last.pt").read_bytes() == before


# --------------------------------------------------------------------------------------------------
# Work survives interruption
# --------------------------------------------------------------------------------------------------

def saved_steps(monkeypatch):
    """Record (file name, step) of every checkpoint written."""
    saved, real = [], train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda path, obj: (saved.append((path.name, obj["step"])),
                                                                     real(path, obj)))
    return saved


def test_saves_every_n_steps(tmp_path, monkeypatch):
    saved = saved_steps(monkeypatch)
    train_run(tmp_path, "--max-steps", "5", "--save-every", "2", "--train-length", "20")   # 10 steps per epoch
    assert [s for name, s in saved if name == "ckpt_last.pt"] == [2, 4, 5]


def test_saves_every_few_minutes(tmp_path, monkeypatch):
    saved = saved_steps(monkeypatch)
    train_run(tmp_path, "--max-steps", "3", "--save-every", "0", "--save-minutes", "1e-9", "--train-length", "20")
    assert [s for name, s in saved if name == "ckpt_last.pt"] == [1, 2, 3, 3]   # 3 again: the final evaluation


@pytest.mark.parametrize("sig, workers", [(signal.SIGINT, 0), (signal.SIGTERM, 0), (signal.SIGINT, 1)],
                         ids=["SIGINT", "SIGTERM", "SIGINT-1-worker"])
def test_signal_saves_and_resume_continues(tmp_path, sig, workers):
    """A real process: after its first step, SIGINT/SIGTERM to its process group (as Ctrl-C or a scheduler do);
    it saves, prints one line with the command to resume, exits non-zero; that command continues."""
    out = tmp_path / "run"
    argv = TINY + ["--out", str(out), "--train-length", "400", "--num-workers", str(workers)]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        for line in proc.stdout:
            if line.startswith("step 1/"):
                break
        os.killpg(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, stderr
    last = one_line(stderr.strip().splitlines()[-1])
    assert "Traceback" not in stderr
    step = torch.load(out / "ckpt_last.pt", weights_only=True)["step"]
    assert step >= 1 and f"stopped by {signal.Signals(sig).name} at step {step}: saved {out / 'ckpt_last.pt'}" in last
    command = shlex.split(last.split("resume with: ")[1])
    assert command[:4] == ["python", "train.py", "--resume", "--out"]
    result = train.main(command[2:] + ["--max-steps", str(step + 1), "--num-workers", "0"])
    assert result["step"] == step + 1
    assert [int(r["step"]) for r in log_rows(out) if r["kind"] == "train"] == list(range(1, step + 2))


def test_signal_during_evaluation_abandons_it(copied, capsys, monkeypatch):
    real = train.frame_metric_sums

    def interrupted(pred, target):
        os.kill(os.getpid(), signal.SIGINT)
        return real(pred, target)
    monkeypatch.setattr(train, "frame_metric_sums", interrupted)
    with pytest.raises(SystemExit) as e:
        resume(copied, "--max-steps", "5")
    assert e.value.code == 128 + signal.SIGINT
    assert "stopped by SIGINT at step 5" in capsys.readouterr().err
    ckpt = torch.load(copied / "ckpt_last.pt", weights_only=True)
    assert ckpt["step"] == 5 and ckpt["metrics"]["step"] == 4                # the evaluation was not finished


def test_second_signal_stops_at_once():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with train.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested == "SIGTERM"
        with pytest.raises(SystemExit, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before   # handlers restored


def test_default_run_folder_is_not_overwritten(straight, tmp_path, capsys, monkeypatch):
    shutil.copytree(straight[0], tmp_path / "runs" / "shapes")             # --out defaults to runs/DATA
    monkeypatch.chdir(tmp_path)
    no_data(monkeypatch)
    message = one_line(error_message(TINY, capsys))
    assert "runs/shapes already holds a run: pass --resume to continue it, or choose a fresh --out" in message


def test_log_only_folder_starts_a_clean_log(tmp_path):
    (tmp_path / "log.csv").write_text("kind,step\ntrain,50\ntrain,100\n")  # a run stopped before its first save
    train_run(tmp_path, "--max-steps", "1")
    assert [(r["kind"], r["step"]) for r in log_rows(tmp_path)] == [("train", "1"), ("eval", "1")]


@pytest.mark.parametrize("torn", ["a new row", "the last row"])
def test_torn_log_line_is_dropped_on_resume(copied, torn):
    text = (copied / "log.csv").read_text()                              # ... eval,4,1,...,mse_per_frame\n
    text = text + "tra" if torn == "a new row" else text[:-4]            # a crash while writing a row
    (copied / "log.csv").write_text(text)
    resume(copied, "--max-steps", "5")
    rows = log_rows(copied)
    kept = [("train", 1), ("train", 2), ("train", 3), ("eval", 3), ("train", 4)]
    kept += [("eval", 4)] if torn == "a new row" else []                  # a torn row is dropped
    assert [(r["kind"], int(r["step"])) for r in rows] == kept + [("train", 5), ("eval", 5)]
    assert all(None not in r.values() and None not in r for r in rows)


def test_time_continues_and_eval_rows_carry_their_epoch(straight, copied):
    elapsed = torch.load(copied / "ckpt_last.pt", weights_only=True)["elapsed_s"]
    resume(copied, "--max-steps", "5")
    rows = log_rows(copied)
    assert elapsed > 0 and all(float(r["time_s"]) >= elapsed for r in rows if int(r["step"]) == 5)
    evals = [(int(r["step"]), int(r["epoch"])) for r in log_rows(straight[0]) if r["kind"] == "eval"]
    assert evals == [(3, 0), (4, 1)]                                         # epoch 0 ends at step 3


def test_paths_are_stored_absolute_and_resume_from_another_folder(copied, tmp_path, monkeypatch):
    cfg, _ = train.parse_args(["--data", "mmnist", "--digits-file", "digits.gz", "--data-dir", "d", "--device", "cpu"])
    assert cfg["digits_file"] == os.path.abspath("digits.gz") and cfg["data_dir"] == os.path.abspath("d")
    assert os.path.isabs(torch.load(copied / "ckpt_last.pt", weights_only=True)["config"]["data_dir"])
    monkeypatch.chdir(copied.parent)
    assert train.main(["--resume", "--out", copied.name, "--device", "cpu", "--max-steps", "5"])["step"] == 5


# --------------------------------------------------------------------------------------------------
# Every error is one line: checkpoint files, devices, ranges
# --------------------------------------------------------------------------------------------------

def bad_checkpoints(run_dir, tmp_path):
    good = (run_dir / "ckpt_last.pt").read_bytes()
    ckpt = torch.load(run_dir / "ckpt_last.pt", weights_only=True)
    other = dict(ckpt, model=VMRNN_B(16, 2, 1, 32, depth=1).state_dict())   # another width in this run's file
    files = {"empty": b"", "text": b"step 4\n", "random": os.urandom(4096), "truncated": good[:len(good) // 2]}
    tmp_path.mkdir(exist_ok=True)
    for name, payload in files.items():
        (tmp_path / name).write_bytes(payload)
    torch.save({"x": ValueError("not a tensor")}, tmp_path / "objects")
    torch.save(ckpt["model"], tmp_path / "bare")
    torch.save([1, 2], tmp_path / "list")
    torch.save({"model": ckpt["model"], "config": ckpt["config"]}, tmp_path / "incomplete")
    torch.save(other, tmp_path / "other_model")
    return tmp_path


@pytest.mark.parametrize("kind, expected", [
    ("empty", "is empty (0 bytes)"), ("text", "not a file written by torch.save"),
    ("random", "not a file written by torch.save"), ("truncated", "is truncated or corrupt"),
    ("objects", "weights_only loading refuses"), ("bare", "is a bare state dict (weights only)"),
    ("list", "holds a list, not a train.py checkpoint"), ("incomplete", "missing batch_in_epoch"),
    ("other_model", "'embed.proj.weight' has"),
])
def test_bad_checkpoint_files_for_resume(straight, tmp_path, kind, expected, capsys):
    files = bad_checkpoints(straight[0], tmp_path / "files")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(files / kind, run_dir / "ckpt_last.pt")
    message = one_line(error_message(["--resume", "--out", str(run_dir), "--device", "cpu"], capsys))
    assert message.startswith("error: --resume:") and expected in message
    if kind == "other_model":
        assert "(32, 1, 2, 2)" in message and "(16, 1, 2, 2)" in message         # both shapes


@pytest.mark.parametrize("kind, expected", [
    ("empty", "is empty"), ("random", "not a file written by torch.save"), ("truncated", "truncated or corrupt"),
    ("list", "neither a train.py checkpoint nor a state dict"),
])
def test_bad_checkpoint_files_for_eval_only(straight, tmp_path, kind, expected, capsys):
    files = bad_checkpoints(straight[0], tmp_path)
    message = one_line(error_message(TINY + ["--eval-only", "--ckpt", str(files / kind)], capsys))
    assert expected in message and "--ckpt" in message


def test_eval_only_mismatch_names_the_key_and_both_shapes(straight, capsys):
    message = one_line(error_message(["--eval-only", "--ckpt", str(straight[0] / "ckpt_last.pt"), "--device",
                                      "cpu", "--embed-dim", "32"], capsys))
    assert "does not fit" in message and "'embed.proj.weight'" in message
    assert "(16, 1, 2, 2)" in message and "(32, 1, 2, 2)" in message


@pytest.mark.parametrize("device, expected", [
    ("gpu", "--device gpu: not a device name"),
    ("cuda", "--device cuda: CUDA is not available"),
    ("cuda:7", "--device cuda:7: "),
    ("mps", "--device mps: Apple's MPS is not available"),
    ("meta", "unsupported device type 'meta'"),
])
def test_bad_devices_before_any_data(device, expected, tmp_path, capsys, monkeypatch):
    if device.startswith("cuda") and torch.cuda.is_available() and device == "cuda":
        pytest.skip("CUDA is available here")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    no_data(monkeypatch)
    argv = [a if a != "cpu" else device for a in TINY] + ["--out", str(tmp_path)]
    message = one_line(error_message(argv, capsys))
    assert expected in message and ("use --device cpu" in message or "no such GPU" in message)


@pytest.mark.parametrize("extra, expected", [
    (["--drop-path", "1.5"], "--drop-path is a probability in [0, 1), got 1.5"),
    (["--drop-path", "-0.5"], "--drop-path is a probability in [0, 1), got -0.5"),
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--grad-clip", "-1"], "--grad-clip must be a finite number >= 0"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--save-minutes", "inf"], "--save-minutes must be a finite number >= 0"),
    (["--log-seconds", "-2"], "--log-seconds must be a finite number >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--patch-size", "0"], "--patch-size must be >= 1"),
    (["--image-size", "-16"], "--image-size must be >= 1"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be >= 0"),
    (["--cuda-graphs"], "--cuda-graphs needs a CUDA device"),
    (["--lr", "x"], "argument --lr: invalid float value: 'x'"),
])
def test_out_of_range_options_are_refused_up_front(extra, expected, tmp_path, capsys, monkeypatch):
    no_data(monkeypatch)
    message = one_line(error_message(TINY + ["--out", str(tmp_path), *extra], capsys))
    assert expected in message


# --------------------------------------------------------------------------------------------------
# Newcomers: -h, threads
# --------------------------------------------------------------------------------------------------

def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["-h"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())                        # argparse wraps lines
    for expected in ("--save-every N save ckpt_last.pt every N steps (0 = off) (default: 500)",
                     "--lr LR peak learning rate of Adam (default: per dataset)",
                     "--drop-path P stochastic depth rate, in [0, 1) (default: 0.1)",
                     "--log-seconds S", "(default: 30.0)", "--threads N", "--scan-compile {auto,on,off}"):
        assert expected in text


def test_default_threads(monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert train.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    loadavg = tmp_path / "loadavg"
    monkeypatch.setattr(train, "LOADAVG", str(loadavg))
    for running, threads in [(1, 4), (2, 3), (4, 1), (9, 1)]:            # this process is one of them
        loadavg.write_text(f"3.90 2.00 1.00 {running}/120 4567\n")
        assert train.default_threads() == threads
    monkeypatch.setattr(os, "cpu_count", lambda: 8)                        # 4 of 8 cores are ours
    for running, threads in [(5, 4), (6, 3), (9, 1)]:                      # others run elsewhere first
        loadavg.write_text(f"3.90 2.00 1.00 {running}/120 4567\n")
        assert train.default_threads() == threads
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(train, "LOADAVG", str(tmp_path / "missing"))        # not Linux: the load average
    for load, threads in [(0.2, 4), (1.4, 3), (2.6, 1), (9.0, 1)]:
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert train.default_threads() == threads


def test_threads_flag_sets_torch_threads(straight, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    train.main(["--eval-only", "--ckpt", str(straight[0] / "ckpt_last.pt"), "--device", "cpu", "--threads", "2"])
    assert calls[0] == 2                                                     # the last call restores the old count
    assert torch.load(straight[0] / "ckpt_last.pt", weights_only=True)["config"]["threads"] == 1


# --------------------------------------------------------------------------------------------------
# Progress lines, --checkpoint-steps, --scan-compile, the training step
# --------------------------------------------------------------------------------------------------

def test_progress_lines_by_time_and_first_step(tmp_path, capsys):
    train_run(tmp_path / "a", "--max-steps", "3", "--log-every", "100", "--log-seconds", "0")
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
    assert len(lines) == 1 and lines[0].startswith("step 1/3  epoch 0  loss ")     # the first step, always
    for field in (" lr ", " s/step ", " seq/s ", " eta "):
        assert field in lines[0]
    assert " peak " not in lines[0]                                          # GPU memory on CUDA only
    assert train.format_progress(5, 10, 0, 0.5, 1e-3, 2.0, 4.0, 7200.0, 21.37) == \
        "step 5/10  epoch 0  loss 0.500000  lr 1.00e-03  2.000 s/step  4.0 seq/s  peak 21.37 GB  eta 2.0 h"
    train_run(tmp_path / "b", "--max-steps", "3", "--log-every", "100", "--log-seconds", "1e-9")
    out = capsys.readouterr().out
    assert [l.split()[1] for l in out.splitlines() if l.startswith("step ")] == ["1/3", "2/3", "3/3"]
    assert "eval: 2/3 sequences" in out and "eval: 3/3 sequences" in out    # a long evaluation reports too
    assert [r["step"] for r in log_rows(tmp_path / "b") if r["kind"] == "train"] == ["1", "2", "3"]


def test_checkpoint_steps_gives_the_same_losses(straight, tmp_path, monkeypatch):
    calls = []
    real = vmrnn.checkpoint
    monkeypatch.setattr(vmrnn, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    result = train_run(tmp_path, "--max-steps", "2", "--checkpoint-steps")
    assert result["model"].checkpoint_steps and calls                         # the rollout really checkpointed
    losses = [float(r["loss"]) for r in log_rows(tmp_path) if r["kind"] == "train"]
    assert losses == [float(r["loss"]) for r in log_rows(straight[0]) if r["kind"] == "train"][:2]


def test_scan_compile_flag_reaches_vmrnn(straight, monkeypatch):
    modes = []
    monkeypatch.setattr(vmrnn, "set_scan_compile", modes.append)
    ckpt = str(straight[0] / "ckpt_last.pt")
    for flag in (["--scan-compile", "off"], ["--compile"], []):
        train.main(["--eval-only", "--ckpt", ckpt, "--device", "cpu", "--val-samples", "1", *flag])
    assert modes == ["off", "on", "off"]                            # the default: off


def test_make_train_step_equals_the_plain_loop():
    """The eager path of make_train_step is the loop train.py had: identical losses and weights."""
    cfg = {"loss": "mse+l1", "grad_clip": 1e-3, "cuda_graphs": False}          # small enough to clip
    frames = torch.rand(3, 2, 4, 1, 16, 16)                                # 3 batches of (2, 2 + 2, 1, 16, 16)

    def fresh():
        torch.manual_seed(0)
        model = VMRNN_B(16, 2, 1, 16, depth=2, drop_path_rate=0.5)           # drop path draws random numbers
        return model, torch.optim.Adam(model.parameters(), lr=1e-2), torch.amp.GradScaler("cpu", enabled=False)

    model, optimizer, scaler = fresh()
    step = train.make_train_step(model, optimizer, scaler, train.nullcontext(), cfg, 2, 2)
    torch.manual_seed(1)
    ours = [step(f).item() for f in frames]
    reference, ref_optimizer, _ = fresh()
    torch.manual_seed(1)
    theirs = []
    for f in frames:                                                        # train.py's loop before make_train_step
        pred = reference(f[:, :2], 2)
        loss = train.compute_loss(pred.float(), f[:, 1:], cfg["loss"])
        ref_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg["grad_clip"])
        ref_optimizer.step()
        theirs.append(loss.item())
    assert ours == theirs and len(set(ours)) == 3
    assert_same_weights(model.state_dict(), reference.state_dict())


def test_cuda_graph_capture_failure_falls_back_to_eager(monkeypatch, capsys):
    """The graph path's bookkeeping on CPU: warm-up passes do not move the weights, a capture that raises is
    reported once, and training goes on eagerly with the same losses. (The capture itself needs a GPU.)"""
    class Stream:
        def wait_stream(self, other):
            pass

    def graph(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")
    for name, value in [("Stream", Stream), ("current_stream", Stream), ("stream", lambda s: train.nullcontext()),
                        ("CUDAGraph", object), ("graph", graph)]:
        monkeypatch.setattr(torch.cuda, name, value)
    frames = torch.rand(3, 2, 4, 1, 16, 16)
    losses = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        model = VMRNN_B(16, 2, 1, 16, depth=2, drop_path_rate=0.0)          # no random draws
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        cfg = {"loss": "mse", "grad_clip": 0.0, "cuda_graphs": graphs}
        step = train.make_train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                     train.nullcontext(), cfg, 2, 2)
        losses[graphs] = [step(f).item() for f in frames]
        assert step.path == ("eager (capture failed)" if graphs else "eager")
    assert losses[True] == losses[False]
    assert capsys.readouterr().err.count("warning: CUDA graph capture failed (RuntimeError: operation not") == 1


def test_cuda_graph_bookkeeping_with_a_stand_in_graph(monkeypatch):
    """torch.cuda's graph API replaced by a stand-in (capture runs the body once, replay counts): the first call
    warms up and captures, a same-shape batch replays, another shape runs eagerly into the .grad tensors the
    graph owns, and the first loss is eager's (warm-up moves no weight)."""
    replays = []

    class Graph:
        def replay(self):
            replays.append(1)

    class Stream:
        def wait_stream(self, other):
            pass
    for name, value in [("Stream", Stream), ("current_stream", Stream), ("stream", lambda s: train.nullcontext()),
                        ("CUDAGraph", Graph), ("graph", lambda g, **kwargs: train.nullcontext())]:
        monkeypatch.setattr(torch.cuda, name, value)
    frames = torch.rand(2, 2, 4, 1, 16, 16)
    first = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        model = VMRNN_B(16, 2, 1, 16, depth=1, drop_path_rate=0.0)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        step = train.make_train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                     train.nullcontext(), {"loss": "mse", "grad_clip": 1.0, "cuda_graphs": graphs},
                                     2, 2)
        first[graphs] = step(frames[0]).item()
    assert step.path == "cuda graph" and replays == [1] and first[True] == first[False]
    grads = [p.grad for p in model.parameters()]
    step(frames[1, :1])                                                     # a last partial batch: eager
    assert replays == [1] and all(p.grad is g for p, g in zip(model.parameters(), grads))
    step(frames[1])
    assert replays == [1, 1]


# ==================================================================================================
# README, CI and bench.py: the README's commands and code cannot rot
# ==================================================================================================


def readme_blocks(language):
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_readme_python_snippets_run():
    snippets = [s for s in readme_blocks("python") if "torch.load(" not in s]   # the rest need a user's file
    assert snippets
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    commands = [line for block in readme_blocks("bash") for line in block.splitlines() if "pytest" in line]
    assert len(commands) == 1
    test_command = commands[0].split("&&")[-1].strip()
    assert test_command == "python -m pytest -q test_vmrnn.py"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci]


def test_bench_quick_mode_runs():
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--quick"], capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for section in ("Selective scan", "Training step", "Inference", "Moving MNIST generation",
                    "Parameters and FLOPs"):
        assert section in result.stdout
    assert "| quick | (2, 32, 100, 4, 4) | torch |" in result.stdout              # the scan ran
    for model in ("taxibj", "kth", "mmnist"):                                     # train: CPU eager
        assert f"| {model} | 1, 2->1 | none | eager scan | torch, eager |" in result.stdout
    assert "FAILED" not in result.stdout and "skipped" not in result.stdout


def test_bench_scan_paths_table_runs_on_cpu(capsys, monkeypatch):
    """The CUDA scan table's code (eager, kernel side by side, what ran) on CPU at the quick shape."""
    cases = bench.Cases()
    bench.bench_scan_paths("cpu", True, cases, "off")
    out = capsys.readouterr().out
    assert "| quick | (2, 32, 100, 4, 4) | torch | torch |" in out
    assert "| quick | (2, 32, 100, 4, 4) | mamba | CUDA only |" in out
    assert "torch-compiled" not in out and not cases.failed
    # Where the kernel runs, its row is measured and the eager scan is given as a multiple of it
    # (stood in for here by the PyTorch scan under the kernel's name).
    monkeypatch.setattr(bench, "kernel_status", lambda device: None)
    monkeypatch.setitem(bench.SCAN_METHODS, "mamba", ("torch", "off"))
    bench.bench_scan_paths("cpu", True, cases, "off")
    out = capsys.readouterr().out
    assert "| quick | (2, 32, 100, 4, 4) | mamba | torch |" in out
    assert "quick: torch / kernel = " in out and "x forward + backward" in out and not cases.failed


def test_bench_train_step_path_reports_losses_and_a_failed_graph_capture(monkeypatch):
    """measure_train runs train.make_train_step; a CUDA-graph path whose capture fails (on CPU it
    always does) is reported as eager in the table, and its losses equal the eager path's."""
    monkeypatch.setitem(bench.TRAIN_PATHS, "eager scan + graphs", ("torch", "off", True))
    timing = dict(min=2, max=2, cap_s=math.inf)
    args = ("taxibj", "cpu", True)
    eager = bench.measure_train(*args, "eager scan", 1, 2, 1, False, timing)
    graphed = bench.measure_train(*args, "eager scan + graphs", 1, 2, 1, False, timing)
    assert eager["ran"] == "torch, eager" and len(eager["losses"]) == 3
    assert eager["losses"][2] < eager["losses"][0]                   # the optimiser steps
    assert graphed["ran"] == "torch, eager (capture failed)"
    assert graphed["losses"] == eager["losses"]
    assert eager["peak"] > 50 and eager["warmup"] > 0 and eager["step"] > 0


def test_bench_compare_losses_tolerances():
    def r(*losses):
        return dict(losses=list(losses))
    results = {"eager scan": (r(1.0, 0.9, 0.8), False),
               "compiled scan": (r(1.0, 0.9, 0.80004), False),          # 5e-5 <= 1e-4
               "kernel": (r(1.0, 0.9, 0.8008), False),                  # 1e-3 > 1e-4
               "kernel + graphs": (r(1.0, 0.909, 0.8), True),           # 1e-2 <= 2e-2 (autocast)
               "compiled scan + graphs": ("OOM", False)}
    assert bench.compare_losses(results) == ["compiled scan 5.0e-05 match", "kernel 1.0e-03 DIFFER",
                                             "kernel + graphs 1.0e-02 match"]
    assert bench.compare_losses({"kernel": (r(1.0), False)}) == []    # no eager reference


def test_bench_projection_of_the_paper_protocols(capsys):
    bench.print_projection({"mmnist": {"kernel": 0.25}, "taxibj": {"compiled scan": 0.1}})
    out = capsys.readouterr().out
    assert "| mmnist: 1,250 steps x 2000 epochs = 2,500,000 steps | kernel | 0.250 | 7.2 days |" in out
    # 10,000 / 16 steps x 200 epochs x 0.1 s = 12,500 s
    assert "| taxibj: N/16 steps x 200 epochs | compiled scan | 0.100 | 3.5 h x N / 10,000 |" in out


def test_bench_cases_skip_past_the_budget_and_survive_failures(capsys):
    assert bench.Cases(budget_s=-1).run("late", lambda: 1) == "skipped (--budget-s)"
    cases = bench.Cases()

    def fails():
        raise ValueError("bad shape\nsecond line")

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    assert cases.run("ok", lambda: 42) == 42
    assert cases.run("broken", fails) == "FAILED (ValueError: bad shape)"
    assert cases.run("big", out_of_memory) == "OOM"
    assert cases.failed == ["broken"] and cases.skipped == []


def test_bench_peak_memory_in_a_fresh_process_and_in_this_one():
    args = ("taxibj", "cpu", True, "eager scan", 1, 2, 1)
    fresh = bench.peak_mb(bench.train_case, args, "cpu", fresh=True)
    here = bench.peak_mb(bench.train_case, args, "cpu", fresh=False)
    assert 100 < fresh < 4000 and 100 < here < 4000                  # torch alone is ~300 MB


def test_bench_main_sections_alias_and_exit_status(capsys, monkeypatch):
    assert bench.main(["--quick", "--only", "models", "--models", "taxibj"]) == 0
    out = capsys.readouterr().out
    assert "## Training step" in out and "## Inference" in out and "Selective scan" not in out
    assert "| taxibj | 1, 2->1 | none | eager scan | torch, eager |" in out and "| kth |" not in out

    def broken(*args):
        raise RuntimeError("inference broke")
    monkeypatch.setattr(bench, "measure_inference", broken)
    assert bench.main(["--quick", "--only", "train", "--models", "taxibj"]) == 1
    out = capsys.readouterr().out
    assert "FAILED (RuntimeError: inference broke)" in out and "FAILED: inference taxibj" in out
