"""Benchmarks behind the README's speed, memory, op-count and FLOP numbers, every ratio measured in one run.

    python bench.py                     # CPU: scan ops compile flops baselines data (many minutes)
    python bench.py --quick             # tiny shapes, one thread, under a minute: every section runs; NOT numbers
    python bench.py --only scan train   # some of: scan ops compile flops baselines train data (train: not by default)
    python bench.py --device cuda       # a GPU, one run: scan (eager, compiled, kernel) and train

Sections, each a markdown table printed row by row as it is measured (the titles say more):
  scan      At each Table 1 model's top-level scan shape, the PyTorch parallel scan against `loop_scan`, a careful
            float32 loop: s (best of 3) and peak memory. CUDA: the training batch sizes, also the mamba-ssm kernel
            and the scan under vmrnn.set_scan_compile("on").
  ops       The eager aten ops of one training step at the Table 1 batch sizes and rollouts, counted on meta
            tensors by `CountOps` (meta gets vmrnn's GPU slab sizing, as every device but the CPU: what a GPU
            launches); then Inductor's kernels for a small VMRNN-B compiled by train.compile_ss2d, on CPU.
  compile   Per Table 1 model, in a fresh process with an empty Inductor cache: the first training step with
            train.compile_ss2d (warm, compiling included), the next one, the eager step, and their losses.
  flops     Parameters and fvcore-style GMACs of the whole rollout at batch 1, without and with the scan.
  baselines The quick start's validation set predicted by zeros and by the last input frame, scored as train.py.
  train     Training steps, s/step and peak memory. CPU (not by default): batch 1, eager. CUDA: the paper's batch
            sizes, rollouts and autocast, eager and with train.compile_ss2d.
  data      Moving MNIST generation: training sequences/s on one CPU core.

Peak memory: CPU, VmHWM of a fresh process running the case (Python, torch, imports: about 300 MB); CUDA,
max_memory_allocated (the scan's: above its inputs). Training steps run without stochastic depth (so eager and
compiled compute the same). A failed case prints FAILED in its row, the run goes on, and the exit status is 1.
"""

import argparse
import functools
import math
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import train
import vmrnn
from data import MMNIST_EPOCH, MovingMNIST, build_datasets

# Table 1 rollouts (frames in -> out) and the authors' parameter counts (all; never used by their forward pass).
PAPER = {"mmnist": dict(t_in=10, t_out=10, params_all=15_267_201, params_unused=1_871_872),
         "taxibj": dict(t_in=4, t_out=4, params_all=2_579_970, params_unused=361_856),
         "kth": dict(t_in=10, t_out=20, params_all=1_214_721, params_unused=164_480)}
# --quick: the same architectures, tiny; TaxiBJ's is also the small model of the compiled-kernel count.
QUICK = {"mmnist": dict(img_size=16, embed_dim=16, depths_down=(1, 1), depths_up=(1, 1)),
         "taxibj": dict(embed_dim=16, depth=2), "kth": dict(img_size=16, embed_dim=16, depth=1)}
FAILED = []                                  # the cases that failed in this run


def table(title, *columns):
    print(f"\n## {title}\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns), flush=True)


def row(*cells):
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def attempt(what, fn, *args):
    """fn(*args), or a string saying why it failed: one case must not end the run."""
    try:
        return fn(*args)
    except Exception as error:               # reported in the table; the traceback goes to stderr
        traceback.print_exc()
        FAILED.append(what)
        return f"FAILED ({type(error).__name__}: {str(error).strip()[:100]})".splitlines()[0]


def best_of(fn, device, repeats=3):
    """(s of a first call, best s of `repeats` later calls), timed between synchronisations on CUDA."""
    sync, times = torch.cuda.synchronize if device == "cuda" else lambda: None, []
    for _ in range(1 + repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times[0], min(times[1:])


def _child(threads, fn, args):
    """What a fresh process runs: fn(*args) on `threads` threads, then its peak resident memory (VmHWM), MB."""
    torch.set_num_threads(threads)
    result = fn(*args)
    with open("/proc/self/status") as status:
        return result, next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def in_fresh_process(fn, *args, env=None):
    """(fn(*args), peak resident MB) from a new Python process, spawned with `env` added to the environment (a
    process killed for memory raises BrokenProcessPool)."""
    with mock.patch.dict(os.environ, env or {}), ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_child, torch.get_num_threads(), fn, args).result()


# 1. The selective scan ----------------------------------------------------------------------------------------------
# (name, b, d, l, n, g) of the top-level scan of each model: d = 4 directions x d_inner, l = H*W.
SCAN_SHAPES = {"cpu": [("Moving MNIST", 2, 1024, 1024, 16, 4), ("TaxiBJ", 16, 1024, 64, 16, 4),
                       ("KTH", 1, 1024, 4096, 16, 4)],
               "cuda": [("Moving MNIST", 8, 1024, 1024, 16, 4), ("TaxiBJ", 16, 1024, 64, 16, 4),
                        ("KTH", 2, 1024, 4096, 16, 4)],
               "quick": [("quick", 2, 32, 100, 4, 4)]}


def loop_scan(u, delta, A, B, C):
    """The careful sequential float32 loop the parallel scan is measured against: exp(delta A) and delta B u made
    at once, time-major, then one fused update a step, h = dA[t] h + dBu[t], y[t] = sum_n C[t] h.
    u, delta (b, d, l), delta after softplus; A (d, n); B, C (b, g, n, l) -> y (b, d, l)."""
    (b, d, l), (g, n) = u.shape, B.shape[1:3]
    dt = delta.permute(2, 0, 1).reshape(l, b, g, d // g, 1)                 # (l, b, g, d/g, 1)
    dA = torch.exp(dt * A.view(g, d // g, n))                               # (l, b, g, d/g, n)
    dBu = dt * u.permute(2, 0, 1).reshape(l, b, g, d // g, 1) * B.permute(3, 0, 1, 2)[:, :, :, None]
    Ct = C.permute(3, 0, 1, 2)[:, :, :, None]                               # (l, b, g, 1, n)
    h, ys = u.new_zeros(b, g, d // g, n), []
    for dA_t, dBu_t, C_t in zip(dA.unbind(0), dBu.unbind(0), Ct.unbind(0)):
        h = torch.addcmul(dBu_t, dA_t, h)                                   # (b, g, d/g, n)
        ys.append((h * C_t).sum(-1))                                        # (b, g, d/g)
    return torch.stack(ys, dim=-1).reshape(b, d, l)


def scan_inputs(b, d, l, n, g, device="cpu", grad=False):
    """Scan inputs at Mamba's initialisation: A = -(1..n), delta_bias = softplus^-1(log-uniform [1e-3, 1e-1])."""
    gen = torch.Generator().manual_seed(0)
    dt = torch.exp(torch.rand(d, generator=gen) * math.log(100) + math.log(1e-3))
    x = dict(u=torch.randn(b, d, l, generator=gen), delta=0.1 * torch.randn(b, d, l, generator=gen),
             A=-torch.arange(1, n + 1.0).repeat(d, 1), B=torch.randn(b, g, n, l, generator=gen),
             C=torch.randn(b, g, n, l, generator=gen), delta_bias=dt + torch.log(-torch.expm1(-dt)))
    return {k: v.to(device).requires_grad_(grad) for k, v in x.items()}


def scan_run(method, x, backward):
    """One forward (and backward) of `method` (loop, torch, kernel or compiled) on inputs x -> what ran."""
    vmrnn.set_scan_compile("on" if method == "compiled" else "off")
    with torch.set_grad_enabled(backward):
        if method == "loop":
            y = loop_scan(x["u"], F.softplus(x["delta"] + x["delta_bias"][:, None]), x["A"], x["B"], x["C"])
        else:
            y = vmrnn.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], delta_bias=x["delta_bias"],
                                     delta_softplus=True, backend="mamba" if method == "kernel" else "torch")
        if backward:                         # gradients of every input, none accumulated in .grad
            torch.autograd.grad(y, list(x.values()), torch.ones_like(y))
    vmrnn.set_scan_compile("off")
    return "loop" if method == "loop" else vmrnn.last_scan_backend()


def scan_case(method, shape):
    """What a fresh process runs for the CPU peak memory: inputs, one forward and backward."""
    return scan_run(method, scan_inputs(*shape, grad=True), True)


def measure_scan(method, shape, device, repeats):
    x = {grad: scan_inputs(*shape, device=device, grad=grad) for grad in (False, True)}
    first, fwd = best_of(lambda: scan_run(method, x[False], False), device, repeats)
    first_both, both = best_of(lambda: scan_run(method, x[True], True), device, repeats)
    if device == "cuda":                     # above the inputs
        torch.cuda.reset_peak_memory_stats()
        before, ran = torch.cuda.memory_allocated(), scan_run(method, x[True], True)
        peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    else:
        ran, peak = in_fresh_process(scan_case, method, shape)
    return dict(ran=ran, fwd=fwd, both=both, peak=peak, first=f"{first:.2f}; {first_both:.2f}")


def bench_scan(device, quick):
    repeats, methods = 1 if quick else 3, ["loop", "torch"] + (["kernel", "compiled"] if device == "cuda" else [])
    table(f"Selective scan on {device}, best of {repeats}: speed-up = loop s / s, memory = peak / loop peak; first "
          f"calls (fwd; fwd+bwd) include compiling", "shape", "(b, d, l, n, g)", "method", "ran", "fwd s",
          "speed-up", "fwd+bwd s", "speed-up", "peak MB", "memory", "first calls s")
    why_not = None if "mamba_ssm" in sys.modules else "not installed"   # vmrnn imports it where it is installed
    for name, *shape in SCAN_SHAPES["quick" if quick else device]:
        loop = dict(fwd=math.nan, both=math.nan, peak=math.nan)        # the ratios' denominators, once measured
        for m in methods:
            r = why_not if m == "kernel" and why_not else attempt(f"scan {name} {m}", measure_scan, m, shape,
                                                                  device, repeats)
            if isinstance(r, str):
                row(name, tuple(shape), m, r, *[""] * 7)
                continue
            loop = r if m == "loop" else loop
            row(name, tuple(shape), m, r["ran"], f"{r['fwd']:.4f}", f"{loop['fwd'] / r['fwd']:.2f}x",
                f"{r['both']:.4f}", f"{loop['both'] / r['both']:.2f}x", f"{r['peak']:.0f}",
                f"{r['peak'] / loop['peak']:.2f}x", r["first"])


# 2. Op counts -------------------------------------------------------------------------------------------------------
class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active. The scan reaches it as one custom op (forward or
    backward), so it runs the op's insides, vmrnn.scan_forward / scan_backward, under itself; there it splits the
    composite ops (reshape, flatten, ...) into the ops they run, as it sees them outside."""
    INSIDES = {torch.ops.vmrnn.selective_scan.default: vmrnn.scan_forward,
               torch.ops.vmrnn.selective_scan_backward.default: vmrnn.scan_backward}
    count = 0                                # each instance counts from 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        with self:
            out = self.INSIDES.get(func, func.decompose)(*args, **(kwargs or {}))
        if out is NotImplemented:            # not a composite op: one op
            self.count += 1
            out = func(*args, **(kwargs or {}))
        return out


def count_scan_ops(b, d, l, n, g):
    """(forward ops, backward ops, slabs) of the scan op vmrnn::selective_scan on meta tensors."""
    shapes = [(b, d, l), (b, d, l), (d, n), (b, g, n, l), (b, g, n, l)]
    u, delta, A, B, C = (torch.empty(s, device="meta", requires_grad=True) for s in shapes)
    with CountOps() as forward:
        y, last, states = torch.ops.vmrnn.selective_scan(u, delta, A, B, C)
    with CountOps() as backward:
        torch.autograd.backward([y, last], [torch.ones_like(y), torch.ones_like(last)])
    return forward.count, backward.count, states.shape[0]


def rollout_loss(model, frames, t_in, kind="mse"):
    """train.py's loss: MSE (+ L1 with kind "mse+l1") of every next-frame prediction of the rollout."""
    pred = model(frames[:, :t_in], frames.shape[1] - t_in).float()         # (b, t - 1, c, h, w)
    loss = F.mse_loss(pred, frames[:, 1:])
    return loss + F.l1_loss(pred, frames[:, 1:]) if kind == "mse+l1" else loss


def count_step_ops(model, batch, t_in, t_out, loss="mse"):
    """(forward ops with the loss, backward ops) of one training step of `model`, moved to meta tensors."""
    model = model.to("meta").train()
    frames = torch.empty(batch, t_in + t_out, model.in_chans, *model.img_size, device="meta")
    with CountOps() as forward:
        value = rollout_loss(model, frames, t_in, loss)
    with CountOps() as backward:
        value.backward()
    return forward.count, backward.count


def bench_ops(device, quick):
    table("Eager aten ops of one training step on meta tensors, GPU slab sizing" + (" (QUICK: tiny)" if quick else ""),
          "config", "batch, rollout", "forward ops (with the loss)", "backward ops", "ops per frame step")
    for name, p in PAPER.items():
        batch, t_in, t_out = (2, 3, 2) if quick else (train.PRESETS[name]["batch_size"], p["t_in"], p["t_out"])
        model = vmrnn.paper_model(name, **(QUICK[name] if quick else {}))
        r = attempt(f"ops {name}", count_step_ops, model, batch, t_in, t_out, train.PRESETS[name]["loss"])
        row(name, f"{batch}, {t_in}->{t_out}", *([r, "", ""] if isinstance(r, str) else
                                                 [*r, f"{sum(r) / (t_in - 1 + t_out):.0f}"]))
    shape = (8, 1024, 1024, 16, 4)
    fwd, bwd, slabs = count_scan_ops(*shape)
    row(f"one scan op, {slabs} slabs", f"{shape}", fwd, bwd, "")
    table("Compiled SS2Ds (train.compile_ss2d): one training step of a small VMRNN-B on CPU (TaxiBJ's 32x32x2, patch "
          "4, width 16, 2 blocks: its SS2Ds share a graph), in a fresh process with an empty Inductor cache",
          "batch, rollout", "SS2D calls per frame step", "graphs", "kernels generated",
          "compiled kernels run per frame step (fwd + bwd)", "first step s (compiling)")
    r, calls = attempt("ops compiled", fresh_steps, "taxibj", True, 2, 3, 2, "cpu"), QUICK["taxibj"]["depth"]
    c = {} if isinstance(r, str) else r[0]["compiled"]
    row("2, 3->2", calls, c.get("graphs", r), c.get("kernels", ""),
        c and (c["kernels"] * calls if c["graphs"] == 1 else "n/a: not one graph"), c and f"{c['first']:.1f}")


# 3. Compile time ----------------------------------------------------------------------------------------------------
def make_step(model, frames, t_in, name, device):
    """step() -> loss: a training step as train.py takes it (Adam at the preset's lr, its loss; on CUDA its
    autocast, with fp16's gradient scaler)."""
    preset = train.PRESETS[name]
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(preset["amp"]) if device == "cuda" else None
    ctx = torch.autocast(device, dtype=amp, enabled=amp is not None)
    scaler = torch.amp.GradScaler(device, enabled=amp == torch.float16)
    optimizer = torch.optim.Adam(model.parameters(), lr=preset["lr"])

    def step():
        with ctx:
            loss = rollout_loss(model, frames, t_in, preset["loss"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.item()
    return step


def step_case(name, quick, batch, t_in, t_out, device, paths, steps):
    """{path: first s, best later s, losses, graphs and kernels compiled, CUDA peak MB} of `steps` training steps
    of the Table 1 model (tiny with quick), "eager" or "compiled" (train.compile_ss2d), from the same weights."""
    from torch._dynamo.utils import counters    # here: importing Inductor costs 2 s and 70 MB in every process
    from torch._inductor import metrics
    out = {}
    for path in paths:
        torch.manual_seed(0)
        model = vmrnn.paper_model(name, drop_path_rate=0.0, **(QUICK[name] if quick else {})).to(device)
        frames = torch.rand(batch, t_in + t_out, model.in_chans, *model.img_size).to(device)
        if path == "compiled":
            train.compile_ss2d(model, device)
        step, losses = make_step(model, frames, t_in, name, device), []
        graphs, kernels = counters["stats"]["unique_graphs"], metrics.generated_kernel_count
        if device == "cuda":                 # weights, optimiser state, frames and activations
            torch.cuda.reset_peak_memory_stats()
        first, best = best_of(lambda: losses.append(step()), device, steps - 1)
        out[path] = dict(first=first, step=best, losses=losses, graphs=counters["stats"]["unique_graphs"] - graphs,
                         kernels=metrics.generated_kernel_count - kernels,
                         peak=torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None)
        model = step = None                  # freed before the next path's peak
    return out


@functools.cache                                    # measured once a run: the ops and compile sections share one
def fresh_steps(name, quick, batch, t_in, t_out, device, paths=("eager", "compiled"), steps=2):
    """(step_case(...), peak resident MB) from a fresh process with an empty Inductor cache."""
    with tempfile.TemporaryDirectory() as cache:
        return in_fresh_process(step_case, name, quick, batch, t_in, t_out, device, paths, steps,
                                env={"TORCHINDUCTOR_CACHE_DIR": cache})


def bench_compile(device, quick):
    table(f"Compile time on {device}, batch 2, rollout 3->2, stochastic depth off, a fresh process with an empty "
          "Inductor cache" + (" (QUICK: the tiny TaxiBJ model only)" if quick else "") + "; warm = the first "
          "training step with train.compile_ss2d, compiling included", "model", "warm s", "compiled step s",
          "eager step s", "speed-up", "graphs", "kernels", "loss rel. diff")
    for name in ["taxibj"] if quick else PAPER:
        r = attempt(f"compile {name}", fresh_steps, name, quick, 2, 3, 2, device)
        if isinstance(r, str):
            row(name, r, *[""] * 6)
            continue
        e, c = r[0]["eager"], r[0]["compiled"]
        diff = max(abs(a - b) / abs(b) for a, b in zip(c["losses"], e["losses"]))
        FAILED.extend([f"compile {name} (losses differ)"] if diff > 1e-4 else [])
        row(name, f"{c['first']:.1f}", f"{c['step']:.3f}", f"{e['step']:.3f}", f"{e['step'] / c['step']:.2f}x",
            c["graphs"], c["kernels"], f"{diff:.1e} " + ("ok" if diff <= 1e-4 else "DIFFER"))


# 4. Parameters and FLOPs --------------------------------------------------------------------------------------------
def scan_macs(b, d, l, n):
    """VMamba's analytic count of one selective scan with D, without z (discretisation, l state updates and
    read-outs, skip term): numpy's optimal-path FLOPs of each einsum, halved (multiply-adds), as fvcore counts."""
    def macs(equation, *shapes):
        report = np.einsum_path(equation, *[np.empty(s) for s in shapes], optimize="optimal")[1].lower()
        return math.floor(float(next(r for r in report.splitlines() if "optimized flop" in r).split(":")[-1]) / 2)
    return (macs("bdl,dn->bdln", (b, d, l), (d, n)) + macs("bdl,bnl,bdl->bdln", (b, d, l), (b, n, l), (b, d, l))
            + l * (b * d * n + macs("bdn,bdn->bd", (b, d, n), (b, d, n))) + b * d * l)


def count_macs(model, frames, pred_len):
    """(GMACs without the scan, with it) of one rollout: convolutions, linears and einsums from FlopCounterMode
    (FLOPs / 2), affine LayerNorm and GroupNorm at 5 per input element (fvcore's rule), scans by scan_macs."""
    norms, scans = [], []
    hooks = [m.register_forward_hook(lambda m, args, out: norms.append(args[0].numel()))
             for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))]
    hooks += [m.register_forward_hook(lambda m, args, out: scans.append(scan_macs(
        len(args[0]), 4 * m.d_inner, args[0].shape[1] * args[0].shape[2], m.d_state)))   # x (b, H, W, c)
              for m in model.modules() if isinstance(m, vmrnn.SS2D)]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(frames, pred_len)
    for hook in hooks:
        hook.remove()
    without = counter.get_total_flops() // 2 + 5 * sum(norms)
    return without / 1e9, (without + sum(scans)) / 1e9


def bench_flops(device, quick):
    table("Parameters and FLOPs of the Table 1 models (GMACs of the whole rollout at batch 1)", "config",
          "params (ours)", "authors' params", "never used by the authors", "GMACs without scan", "GMACs with scan")
    for name, p in [("taxibj", PAPER["taxibj"])] if quick else PAPER.items():
        model = vmrnn.paper_model(name).eval()
        without, with_scan = count_macs(model, torch.rand(1, p["t_in"], model.in_chans, *model.img_size), p["t_out"])
        row(f"{name} {p['t_in']}->{p['t_out']}", f"{sum(t.numel() for t in model.parameters()):,}",
            f"{p['params_all']:,}", f"{p['params_unused']:,}", f"{without:.3f}", f"{with_scan:.3f}")


# 5. Trivial baselines of the quick start ----------------------------------------------------------------------------
def bench_baselines(device, quick):
    _, val = build_datasets("shapes", "data")
    frames, t_in = torch.stack([val[i] for i in range(len(val))]).numpy(), val.input_frames   # (n, t, c, h, w)
    target = frames[:, t_in:]
    table(f"Trivial predictors on the quick start's validation set ({len(val)} sequences, {t_in}->"
          f"{val.output_frames}, {val.image_size}x{val.image_size}), per frame as train.py evaluates",
          "predictor", "MSE", "MAE", "SSIM")
    for name, pred in [("all zeros", np.zeros_like(target)),
                       ("last input frame", np.repeat(frames[:, t_in - 1:t_in], target.shape[1], axis=1))]:
        m = train.frame_metrics(pred, target)
        row(name, f"{m['mse'].mean():.4f}", f"{m['mae'].mean():.4f}", f"{m['ssim'].mean():.4f}")


# 6. Training steps of the Table 1 models ----------------------------------------------------------------------------
def bench_train(device, quick):
    cuda = device == "cuda"
    paths = ("eager", "compiled") if cuda else ("eager",)
    table(f"Training step on {device}, " + ("the paper's batch sizes, rollouts and autocast" if cuda else
          "batch 1, KTH at 10->2") + (" (QUICK: tiny models, 2->1)" if quick else "") + ", a fresh process per "
          "model; s/step = best of 2 after the first step", "model", "batch, rollout", "path", "first step s",
          "s/step", "peak MB", "first loss")
    for name, p in PAPER.items():
        batch = train.PRESETS[name]["batch_size"] if cuda else 1
        t_in, t_out = (2, 1) if quick else (p["t_in"], 2 if name == "kth" and not cuda else p["t_out"])
        r = attempt(f"train {name}", fresh_steps, name, quick, batch, t_in, t_out, device, paths, 3)
        for path in paths:
            m = None if isinstance(r, str) else r[0][path]
            row(name, f"{batch}, {t_in}->{t_out}", path, *([r, "", "", ""] if m is None else [f"{m['first']:.2f}",
                f"{m['step']:.3f}", f"{m['peak'] if cuda else r[1]:.0f}", f"{m['losses'][0]:.6f}"]))


# 7. Moving MNIST generation -----------------------------------------------------------------------------------------
def bench_data(device, quick):
    """Training sequences/s of MovingMNIST (10 + 10 frames, 64x64, random digits), an epoch from set_epoch on."""
    sequences = 500 if quick else MMNIST_EPOCH
    digits = np.random.default_rng(0).integers(0, 256, (10_000, 28, 28), dtype=np.uint8)
    dataset, start = MovingMNIST(digits, length=sequences), time.perf_counter()
    torch.set_num_threads(1)                 # one core; main restores the thread count
    dataset.set_epoch(1)
    for i in range(sequences):
        dataset[i]
    table("Moving MNIST generation on one CPU core", "sequences", "training sequences/s")
    row(f"{sequences:,}", f"{sequences / (time.perf_counter() - start):,.0f}")


SECTIONS = dict(scan=bench_scan, ops=bench_ops, compile=bench_compile, flops=bench_flops, baselines=bench_baselines,
                train=bench_train, data=bench_data)      # each (device, quick), run in this order


def main(argv=None):
    """Run the chosen sections; returns the exit status, 1 if a case failed (or compiled losses differed)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), metavar="SECTION",
                        help="of: %(choices)s (default: all but train on CPU; scan and train on CUDA)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: %(default)s")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one thread: checks that sections run")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    only = args.only or (["scan", "train"] if args.device == "cuda" else [s for s in SECTIONS if s != "train"])
    threads, start = torch.get_num_threads(), time.perf_counter()
    torch.set_num_threads(1 if args.quick else threads)
    FAILED.clear()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"# bench.py: torch {torch.__version__}, {args.device} ({where}), load average {os.getloadavg()[0]:.1f}"
          + ("; QUICK: tiny shapes, not numbers" if args.quick else ""), flush=True)
    try:
        for name, section in SECTIONS.items():
            if name in only:
                section(args.device, args.quick)
    finally:
        torch.set_num_threads(threads)
    print(f"\n{time.perf_counter() - start:.0f} s in all; load average at the end {os.getloadavg()[0]:.1f}"
          + (f"; FAILED: {', '.join(FAILED)}" if FAILED else ""), flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
