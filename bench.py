"""Benchmarks behind every speed, memory and FLOP number in the README, measured in one run.

    python bench.py                  # CPU, all four sections, the full models (long: many minutes)
    python bench.py --quick          # tiny shapes, seconds: checks that every section runs, NOT numbers
    python bench.py --only scan      # one or more sections: scan, train, data, flops

On a GPU, the one command a GPU session runs (from the repository root; see ../shared/gpu/README.md):

    bash .gpu/setup-mamba.sh .gpu && export PYTHONPATH=/tmp/msite; python bench.py --device cuda

where .gpu/ is the mamba-ssm kernel kit: a copy of ../shared/gpu made beforehand (`cp -r ../shared/gpu .gpu`),
git-ignored, never committed, named in the device call's carry. Without it the kernel rows say "not installed".
On CUDA the default sections are scan and train (data and flops measure the CPU: add them with --only), and
--budget-s (default 420 on CUDA) stops starting new cases after that many seconds, so that the run fits a short
GPU lease; every row is printed as soon as it is measured, and progress lines go to stderr.

Sections:
  scan   The selective scan at the top-level scan shape of each Table 1 model. CPU: the parallel PyTorch scan
         against a careful float32 sequential loop (speed-up and memory ratios), at batch 2 / 16 / 1. CUDA: at the
         training batch sizes (8 / 16 / 2), the eager PyTorch scan, the compiled PyTorch scan (with its compile
         time) and the mamba-ssm kernel side by side, milliseconds, peak memory above the inputs.
  train  The three Table 1 models: training step per path (eager scan, eager scan + CUDA graphs, kernel,
         kernel + CUDA graphs, then the opt-in compiled scan with and without graphs; whatever runs here), with
         s/step, peak memory, warm-up time and the first three losses; activation checkpointing for KTH;
         inference throughput; on CUDA the projected wall time of each paper protocol. CUDA: the paper's batch
         sizes and rollouts. CPU: batch 1, and KTH's
         training step 10 -> 2 (its 10 -> 20 step at batch 1 outgrew a 24 GB machine). (It replaces the old
         "models" section; --only models still selects it.)
  data   Moving MNIST generation speed, training sequences/s on one CPU core.
  flops  Parameters and FLOPs of the Table 1 models, in the papers' convention (fvcore's multiply-accumulates over
         the whole rollout at batch 1), with and without the selective scan.

Peak memory on CPU is the peak resident memory (VmHWM) of a fresh process per case (it includes Python and torch,
about 300 MB); with --quick it is read in this process instead (no process start-up). On CUDA it is
torch.cuda.max_memory_allocated above what was allocated before the case: above the inputs for the scan;
weights, optimiser state, batch and activations for a training step. Threads: train.default_threads()
($OMP_NUM_THREADS if set, else the cores not already busy).
"""

import argparse
import gc
import math
import multiprocessing
import os
import resource
import sys
import time
import traceback
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import train
import vmrnn
from data import MMNIST_EPOCH, MovingMNIST

_START = time.perf_counter()


# --------------------------------------------------------------------------------------------------
# Measuring: timers, peak memory, and cases that may fail or run out of time
# --------------------------------------------------------------------------------------------------

def progress(message):
    """A progress line on stderr (the tables go to stdout), flushed at once: a run that is cut short
    still shows how far it got."""
    print(f"[bench {time.perf_counter() - _START:5.0f} s] {message}", file=sys.stderr, flush=True)


def row(*cells):
    """One markdown table row, printed at once."""
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=3):
    """(seconds of the first call, best seconds of `repeats` later calls, the last call's result).

    The first call pays the one-off costs (torch.compile, CUDA-graph capture, lazy initialisation);
    on CUDA every call is timed between synchronisations."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    first, best = time.perf_counter() - start, math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return first, best, result


def _peak_rss_mb():
    """This process's peak resident memory (VmHWM), MB."""
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmHWM")) / 1024


def _rss_after(case, args, threads):
    """In a fresh process: run case(*args) once, return the process's peak resident memory, MB.

    Read from VmHWM: ru_maxrss would also count the parent's peak, which Linux carries across the
    fork + exec that starts the process.
    """
    torch.set_num_threads(threads)
    case(*args)
    try:
        return _peak_rss_mb()
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # KB on Linux


def _rss_in_process(case, args):
    """Peak resident memory of this process while case(*args) runs, MB: VmHWM is reset to the
    current resident size first (Linux >= 4.0, /proc/self/clear_refs), nan where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        case(*args)
        return _peak_rss_mb()
    except (OSError, StopIteration):
        case(*args)
        return math.nan


def peak_mb(case, args, device, fresh=True):
    """Peak memory of case(*args), MB. CUDA: torch.cuda.max_memory_allocated above what was
    allocated before the call (the inputs passed in args). CPU: the peak resident memory of a fresh
    process (fresh=True; it starts by importing torch, a few seconds) or of this one (fresh=False)."""
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        case(*args)
        sync(device)
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    if not fresh:
        return _rss_in_process(case, args)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_rss_after, (case, args, torch.get_num_threads()))


class Cases:
    """Runs each measured case so that no single one ends the run: a case that would start after the
    --budget-s deadline is skipped, running out of memory gives "OOM", any other error "FAILED (...)"
    (traceback on stderr); GPU memory is released after every case."""

    def __init__(self, budget_s=None):
        self.deadline = None if budget_s is None else time.perf_counter() + budget_s
        self.skipped, self.failed = [], []

    def run(self, what, fn):
        """fn()'s result, or a string saying why there is none."""
        if self.deadline is not None and time.perf_counter() > self.deadline:
            self.skipped.append(what)
            return "skipped (--budget-s)"
        progress(what)
        try:
            outcome = fn()
        except Exception as error:          # one case's failure must not end the run
            message = (str(error).strip().splitlines() or [""])[0][:120]
            if isinstance(error, torch.OutOfMemoryError) or "out of memory" in message.lower():
                outcome = "OOM"
            else:
                traceback.print_exc()
                outcome = f"FAILED ({type(error).__name__}: {message})"
                self.failed.append(what)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return outcome


def device_name(device):
    """The device for a table title: the GPU's name, or the CPU's thread count."""
    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name()})"
    threads = torch.get_num_threads()
    return f"{device} ({threads} thread{'s' if threads != 1 else ''})"


def kernel_status(device):
    """None if the mamba-ssm kernel runs on `device`, else why not (for the tables)."""
    if device != "cuda":
        return "CUDA only"
    if vmrnn._mamba_scan_fn is None:
        return "not installed"
    return None if vmrnn._mamba_kernel_works(torch.device("cuda")) else "installed, fails (see warning)"


# --------------------------------------------------------------------------------------------------
# 1. Selective scan
# --------------------------------------------------------------------------------------------------

# (name, b, d, l, n, g): the top-level scan of each paper model (d = 4 directions x d_inner, l = H*W).
SCAN_SHAPES = [("Moving MNIST", 2, 1024, 1024, 16, 4),     # VMRNN-D level 0, 32x32 grid
               ("TaxiBJ", 16, 1024, 64, 16, 4),            # 8x8 grid
               ("KTH", 1, 1024, 4096, 16, 4)]              # 64x64 grid
CUDA_SCAN_SHAPES = [("Moving MNIST", 8, 1024, 1024, 16, 4),  # the same at the training batch sizes
                    ("TaxiBJ", 16, 1024, 64, 16, 4),
                    ("KTH", 2, 1024, 4096, 16, 4)]
QUICK_SCAN_SHAPES = [("quick", 2, 32, 100, 4, 4)]

# method -> (selective_scan backend, vmrnn.set_scan_compile mode); "loop" is loop_scan below.
SCAN_METHODS = {"torch": ("torch", "off"), "torch-compiled": ("torch", "on"), "mamba": ("mamba", "off")}


def loop_scan(u, delta, A, B, C):
    """The careful float32 sequential loop the parallel scan is measured against.

    exp(delta A) and delta B u precomputed in a time-major layout, then one elementwise update per
    step, h = dA[t] h + dBu[t], y[t] = sum_n C[t] h. u, delta (b, d, l) (delta after softplus);
    A (d, n); B, C (b, g, n, l) -> y (b, d, l).
    """
    (b, d, l), (g, n) = u.shape, B.shape[1:3]
    dt = delta.permute(2, 0, 1).reshape(l, b, g, d // g, 1)                 # (l, b, g, d/g, 1)
    dA = torch.exp(dt * A.view(g, d // g, n))                               # (l, b, g, d/g, n)
    dBu = dt * u.permute(2, 0, 1).reshape(l, b, g, d // g, 1) * B.permute(3, 0, 1, 2)[:, :, :, None]
    Ct = C.permute(3, 0, 1, 2)[:, :, :, None]                               # (l, b, g, 1, n)
    h = u.new_zeros(b, g, d // g, n)
    ys = []
    for dA_t, dBu_t, C_t in zip(dA.unbind(0), dBu.unbind(0), Ct.unbind(0)):
        h = torch.addcmul(dBu_t, dA_t, h)                                   # (b, g, d/g, n)
        ys.append((h * C_t).sum(-1))                                        # (b, g, d/g)
    return torch.stack(ys, dim=-1).reshape(b, d, l)


def scan_inputs(b, d, l, n, g, device="cpu", requires_grad=False, seed=0):
    """Mamba-initialised scan inputs: A = -(1..n), dt bias = softplus^-1(log-uniform [1e-3, 1e-1])."""
    gen = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(d, generator=gen) * math.log(100) + math.log(1e-3))
    inputs = dict(u=torch.randn(b, d, l, generator=gen),
                  delta=0.1 * torch.randn(b, d, l, generator=gen),
                  A=-torch.arange(1, n + 1.0).repeat(d, 1),
                  B=torch.randn(b, g, n, l, generator=gen),
                  C=torch.randn(b, g, n, l, generator=gen),
                  delta_bias=dt + torch.log(-torch.expm1(-dt)))             # softplus^-1(dt)
    return {k: v.to(device).requires_grad_(requires_grad) for k, v in inputs.items()}


def scan_case(method, shape, device, backward, x=None):
    """One forward (and backward) of `method` ("loop" or a SCAN_METHODS key) on inputs x (drawn
    here if not given, for the memory measurement in a fresh process). Returns what ran: "loop" or
    vmrnn.last_scan_backend()."""
    x = x if x is not None else scan_inputs(*shape, device=device, requires_grad=backward)
    with torch.set_grad_enabled(backward):
        if method == "loop":
            y, ran = loop_scan(x["u"], F.softplus(x["delta"] + x["delta_bias"][:, None]), x["A"],
                               x["B"], x["C"]), "loop"
        else:
            backend, compile_mode = SCAN_METHODS[method]
            vmrnn.set_scan_compile(compile_mode)
            y = vmrnn.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"],
                                     delta_bias=x["delta_bias"], delta_softplus=True, backend=backend)
            ran = vmrnn.last_scan_backend()
        if backward:
            for t in x.values():
                t.grad = None                                               # no accumulation
            y.backward(torch.ones_like(y))
    return ran


def bench_scan(device, quick, cases, scan_compile):
    """CPU: the README's table (methods against the loop, ratios); CUDA: bench_scan_paths."""
    if device == "cuda":
        return bench_scan_paths(device, quick, cases, scan_compile)
    shapes, repeats = (QUICK_SCAN_SHAPES, 1) if quick else (SCAN_SHAPES, 3)
    methods = ["loop", "torch"] + (["torch-compiled"] if scan_compile == "on" else [])
    print(f"\n## Selective scan on {device_name(device)}, best of {repeats}; "
          f"speed-up = loop time / method time; memory = method peak / loop peak", flush=True)
    print("| shape | (b, d, l, n, g) | method | fwd s | speed-up | fwd+bwd s | speed-up | peak MB | "
          "memory |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    notes = []
    for name, *shape in shapes:
        results = {}
        inputs = {grad: scan_inputs(*shape, device=device, requires_grad=grad) for grad in (False, True)}

        def measure(m):   # inputs drawn once, outside the timed region
            first, fwd, ran = timed(lambda: scan_case(m, shape, device, False, inputs[False]), device,
                                    repeats)
            _, fwd_bwd, _ = timed(lambda: scan_case(m, shape, device, True, inputs[True]), device,
                                  repeats)
            if m == "torch-compiled":
                notes.append(f"{name}: torch-compiled ran as {ran!r}, first call {first:.1f} s "
                             f"(compiling), warm {fwd:.3f} s")
            return fwd, fwd_bwd, peak_mb(scan_case, (m, shape, device, True), device, fresh=not quick)

        for m in methods:
            results[m] = cases.run(f"scan {name} {m}", lambda: measure(m))
        base = results["loop"]
        for m, r in results.items():
            if isinstance(r, str) or isinstance(base, str):
                row(name, tuple(shape), m, r if isinstance(r, str) else "", "", "", "", "", "")
                continue
            row(name, tuple(shape), m, f"{r[0]:.3f}", f"{base[0] / r[0]:.2f}x", f"{r[1]:.3f}",
                f"{base[1] / r[1]:.2f}x", f"{r[2]:.0f}", f"{r[2] / base[2]:.2f}x")
    for note in notes:
        print(note, flush=True)
    if scan_compile != "on":
        print("(compiled scan: not run on CPU, where a new scan shape took 12-37 s to compile forward and "
              "29-127 s backward; --scan-compile on adds it)", flush=True)


def bench_scan_paths(device, quick, cases, scan_compile):
    """The CUDA table: eager scan, compiled scan and the mamba-ssm kernel side by side at the
    training batch sizes, milliseconds (device="cpu" runs the same code, for the tests)."""
    shapes, repeats = (QUICK_SCAN_SHAPES, 1) if quick else (CUDA_SCAN_SHAPES, 5)
    compiled = scan_compile == "on" or (scan_compile == "auto" and device == "cuda")
    methods = ["torch", "mamba"] + (["torch-compiled"] if compiled else [])   # compiled last: --budget-s
    print(f"\n## Selective scan on {device_name(device)}, ms, best of {repeats} (synchronized); "
          f"compile = first call - warm call (forward; backward); peak = "
          + ("max_memory_allocated of forward + backward above the inputs" if device == "cuda" else
             "peak resident memory of this process")
          + "; ran = vmrnn.last_scan_backend()", flush=True)
    print("| shape | (b, d, l, n, g) | path | ran | fwd ms | fwd+bwd ms | compile s | peak MB |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for name, *shape in shapes:
        inputs = {grad: scan_inputs(*shape, device=device, requires_grad=grad) for grad in (False, True)}
        results = {}

        def measure(m):
            fwd_first, fwd, ran = timed(lambda: scan_case(m, shape, device, False, inputs[False]),
                                        device, repeats)
            both_first, both, _ = timed(lambda: scan_case(m, shape, device, True, inputs[True]),
                                        device, repeats)
            for t in inputs[True].values():
                t.grad = None
            peak = peak_mb(scan_case, (m, shape, device, True, inputs[True]), device, fresh=False)
            return ran, fwd, both, fwd_first - fwd, both_first - both, peak

        for m in methods:
            why_not = kernel_status(device) if m == "mamba" else None
            r = why_not or cases.run(f"scan {name} {m}", lambda: measure(m))
            results[m] = r
            if isinstance(r, str):
                row(name, tuple(shape), m, r, "", "", "", "")
                continue
            ran, fwd, both, compile_fwd, compile_bwd, peak = r
            compile_s = f"{compile_fwd:.1f}; {compile_bwd:.1f}" if m == "torch-compiled" else "-"
            row(name, tuple(shape), m, ran, f"{fwd * 1e3:.2f}", f"{both * 1e3:.2f}", compile_s,
                f"{peak:.0f}")
        kernel = results["mamba"]
        for m in ("torch", "torch-compiled"):
            if not isinstance(kernel, str) and not isinstance(results.get(m, "not run"), str):
                print(f"{name}: {m} / kernel = {results[m][1] / kernel[1]:.1f}x forward, "
                      f"{results[m][2] / kernel[2]:.1f}x forward + backward", flush=True)
        del inputs


# --------------------------------------------------------------------------------------------------
# 2. Training step and inference of the Table 1 models
# --------------------------------------------------------------------------------------------------

# Table 1 rollouts (frames in, frames out) and the authors' parameter counts (SPEC §6). Batch, amp,
# loss, lr and epochs are the paper's (train.PRESETS).
PAPER = {
    "taxibj": dict(t_in=4, t_out=4, params_all=2_579_970, params_unused=361_856),
    "kth": dict(t_in=10, t_out=20, params_all=1_214_721, params_unused=164_480),
    "mmnist": dict(t_in=10, t_out=10, params_all=15_267_201, params_unused=1_871_872),
}
# --quick: the same architectures, tiny (16-pixel frames but TaxiBJ's 32, width 16, 1 block a cell).
QUICK_MODELS = {"taxibj": dict(embed_dim=16, depth=1),
                "kth": dict(img_size=16, embed_dim=16, depth=1),
                "mmnist": dict(img_size=16, embed_dim=16, depths_down=(1, 1), depths_up=(1, 1))}

# path -> (selective_scan backend, vmrnn.set_scan_compile mode, CUDA graphs in train.make_train_step)
TRAIN_PATHS = {"eager scan": ("torch", "off", False),
               "eager scan + graphs": ("torch", "off", True),
               "compiled scan": ("torch", "on", False),
               "compiled scan + graphs": ("torch", "on", True),
               "kernel": ("mamba", "off", False),
               "kernel + graphs": ("mamba", "off", True)}
LOSS_RTOL = {False: 1e-4, True: 2e-2}   # first losses "match" eager within: fp32; under autocast


def train_paths(device, scan_compile):
    """The paths measured here: what train.py runs by default first (the eager scan, then with CUDA
    graphs), then the kernel, and the opt-in compiled scan last, so that --budget-s cuts it first."""
    compiled = scan_compile == "on" or (scan_compile == "auto" and device == "cuda")
    paths = ["eager scan", "eager scan + graphs", "kernel", "kernel + graphs"]
    if compiled:
        paths += ["compiled scan", "compiled scan + graphs"]
    return paths if device == "cuda" else [p for p in paths if p in ("eager scan", "compiled scan")]


def run_config(name, device, quick, path):
    """(amp, label) of `path` for model `name`: the paper's autocast on CUDA (CPU runs fp32), except
    that CUDA graphs cannot take fp16's gradient scaler, so a graphed fp16 config runs bf16."""
    amp = train.PRESETS[name]["amp"] if device == "cuda" else "none"
    if TRAIN_PATHS[path][2] and amp == "fp16":
        return "bf16", "bf16 (graphs: no fp16 scaler)"
    return amp, amp


def build(name, device, quick, path, batch, t_in, t_out, checkpoint=False):
    """(model, frames, ctx) for one path: weights from seed 0, stochastic depth off (so that no path
    draws random numbers and the first losses compare), a fixed batch of uniform frames (seed 1)."""
    backend, compile_mode, graphs = TRAIN_PATHS[path]
    vmrnn.set_scan_compile(compile_mode)
    torch.manual_seed(0)
    model = vmrnn.paper_model(name, drop_path_rate=0.0, scan_backend=backend,
                              **(QUICK_MODELS[name] if quick else {})).to(device)
    if checkpoint:
        if not hasattr(model, "checkpoint_steps"):
            raise RuntimeError("this vmrnn.py has no activation checkpointing (model.checkpoint_steps)")
        model.checkpoint_steps = True
    frames = torch.rand(batch, t_in + t_out, model.in_chans, *model.img_size,
                        generator=torch.Generator().manual_seed(1)).to(device)
    amp = run_config(name, device, quick, path)[0]
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    ctx = nullcontext() if dtype is None else torch.autocast(device, dtype=dtype,
                                                             cache_enabled=not graphs)
    return model, frames, ctx, amp


def train_setup(name, device, quick, path, batch, t_in, t_out, checkpoint=False):
    """step(frames) -> loss from train.make_train_step, as train.py trains (Adam at the paper's lr,
    the paper's loss, fp16 with a gradient scaler), and the batch."""
    model, frames, ctx, amp = build(name, device, quick, path, batch, t_in, t_out, checkpoint)
    preset = train.PRESETS[name]
    optimizer = torch.optim.Adam(model.parameters(), lr=preset["lr"])
    scaler = torch.amp.GradScaler(device, enabled=amp == "fp16")
    cfg = dict(loss=preset["loss"], grad_clip=0.0, cuda_graphs=TRAIN_PATHS[path][2])
    return train.make_train_step(model, optimizer, scaler, ctx, cfg, t_in, t_out), frames


def train_case(name, device, quick, path, batch, t_in, t_out, checkpoint=False):
    """One training step, from building the model: what a fresh process runs for its peak memory."""
    step, frames = train_setup(name, device, quick, path, batch, t_in, t_out, checkpoint)
    step(frames)


def measure_train(name, device, quick, path, batch, t_in, t_out, checkpoint, timing):
    """Warm-up step (its time includes compiling and graph capture), then timed steps: at least
    timing["min"], at most timing["max"], none more once timing["cap_s"] seconds are spent.
    Returns dict(ran (scan backend, and step.path: eager, cuda graph or eager (capture failed)),
    warmup, step (best s), losses (first ones), peak MB)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    step, frames = train_setup(name, device, quick, path, batch, t_in, t_out, checkpoint)
    sync(device)
    start = time.perf_counter()
    losses = [step(frames)]
    sync(device)
    warmup, times = time.perf_counter() - start, []
    ran = f"{vmrnn.last_scan_backend()}, {step.path}"         # e.g. "torch-compiled, cuda graph"
    while len(times) < timing["max"] and (len(times) < timing["min"]
                                         or warmup + sum(times) < timing["cap_s"]):
        sync(device)
        start = time.perf_counter()
        losses.append(step(frames))
        sync(device)
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    else:
        del step, frames
        peak = peak_mb(train_case, (name, device, quick, path, batch, t_in, t_out, checkpoint),
                       device, fresh=not quick)
    return dict(ran=ran, warmup=warmup, step=min(times), losses=[float(l) for l in losses],
                peak=peak)


def measure_inference(name, device, quick, path, batch, t_in, t_out, repeats):
    """(ran, first s, best s) of one inference rollout, no_grad, eval mode."""
    model, frames, ctx, _ = build(name, device, quick, path, batch, t_in, 0)
    model.eval()

    @torch.no_grad()
    def rollout():
        with ctx:
            model(frames, t_out)
        return vmrnn.last_scan_backend()

    first, best, ran = timed(rollout, device, repeats)
    return ran, first, best


def bench_train(device, quick, cases, scan_compile, models):
    cuda = device == "cuda"
    timing = (dict(min=2, max=2, cap_s=math.inf) if quick else
              dict(min=2, max=3, cap_s=20.0) if cuda else dict(min=1, max=2, cap_s=30.0))
    paths = train_paths(device, scan_compile)
    kernel_missing = kernel_status(device)
    unit = "GB" if cuda else "MB"
    print(f"\n## Training step on {device_name(device)}, "
          + ("the paper's batch sizes" if cuda else "batch 1")
          + (", QUICK: tiny models, 2->1 rollouts" if quick else
             ", the paper's rollouts" if cuda else
             ", the paper's rollouts but KTH's 10->2 (its 10->20 step at batch 1 outgrew a 24 GB machine)")
          + "; stochastic depth off (no path draws random numbers)", flush=True)
    print(f"warm-up = the first step, incl. torch.compile of scan shapes not compiled earlier in "
          f"this run and CUDA-graph capture; s/step = best of "
          + (f"{timing['min']}" if timing["min"] == timing["max"] else f"{timing['min']}-{timing['max']}")
          + " later steps; peak = "
          + ("torch.cuda.max_memory_allocated over the path, above what was allocated before it "
             "(weights, optimiser state, batch, activations, workspaces)" if cuda else
             "peak resident memory of " + ("this process" if quick else
                                           "a fresh process running one step"))
          + f"; losses = the first {timing['min'] + 1}"
          + ("" if timing["min"] == timing["max"] else f"-{timing['max'] + 1}")
          + " steps on one fixed batch", flush=True)
    print(f"| model | batch, rollout | amp | path | ran | warm-up s | s/step | sequences/s | "
          f"peak {unit} | first losses |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    measured = {}
    for name in models:
        batch = train.PRESETS[name]["batch_size"] if cuda else 1
        t_in, t_out = (2, 1) if quick else (PAPER[name]["t_in"], PAPER[name]["t_out"])
        if name == "kth" and not cuda and not quick:
            t_out = 2
        rows = [(p, False) for p in paths]
        if name == "kth":    # activation checkpointing, for memory: the fastest path without graphs
            best = next(p for p in ("kernel", "eager scan")
                        if p in paths and not (p == "kernel" and kernel_missing))
            rows.append((best, True))
        results = {}
        for path, checkpoint in rows:
            label = path + (" + checkpointing" if checkpoint else "")
            amp, amp_label = run_config(name, device, quick, path)
            if TRAIN_PATHS[path][0] == "mamba" and kernel_missing:
                r = kernel_missing
            else:
                r = cases.run(f"train {name} {label}", lambda: measure_train(
                    name, device, quick, path, batch, t_in, t_out, checkpoint, timing))
            results[label] = (r, amp != "none")
            cells = [name, f"{batch}, {t_in}->{t_out}", amp_label, label]
            if isinstance(r, str):
                row(*cells, r, "", "", "", "", "")
                continue
            peak = r["peak"] / 1024 if cuda else r["peak"]
            row(*cells, r["ran"], f"{r['warmup']:.1f}", f"{r['step']:.3f}", f"{batch / r['step']:.2f}",
                f"{peak:.{2 if cuda else 0}f}", ", ".join(f"{l:.6f}" for l in r["losses"][:3]))
        measured[name] = {label: r for label, (r, _) in results.items() if not isinstance(r, str)}
        checks = compare_losses(results)
        if checks:
            print(f"{name}: first losses vs eager scan, max relative difference (match: <= "
                  f"{LOSS_RTOL[False]:g} in fp32, <= {LOSS_RTOL[True]:g} under autocast): "
                  + "; ".join(checks), flush=True)
    if cuda:
        print_projection({name: {label: r["step"] for label, r in rows.items()}
                          for name, rows in measured.items()}, quick)
    bench_inference(device, quick, cases, paths, kernel_missing, models)


def compare_losses(results):
    """["path max-relative-difference match|DIFFER", ...]: each path's first losses against the
    eager scan's. results: {path: (measure_train's dict or a string, ran under autocast)}."""
    reference, ref_autocast = results.get("eager scan", ("", False))
    if isinstance(reference, str):
        return []
    checks = []
    for label, (r, autocast) in results.items():
        if label == "eager scan" or isinstance(r, str):
            continue
        n = min(len(r["losses"]), len(reference["losses"]), 3)
        diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"][:n], reference["losses"]))
        verdict = "match" if diff <= LOSS_RTOL[autocast or ref_autocast] else "DIFFER"
        checks.append(f"{label} {diff:.1e} {verdict}")
    return checks


def print_projection(step_s, quick=False):
    """Projected wall time of each paper protocol, steps/epoch x epochs x s/step, from
    {model: {path: s/step}} measured at the paper's batch sizes."""
    print("\n### Projected wall time of the paper protocols at these speeds: steps/epoch x epochs x "
          "s/step" + (" (QUICK: tiny models, meaningless)" if quick else ""), flush=True)
    print("Moving MNIST: 10,000 sequences/epoch (data.MMNIST_EPOCH) / batch 8 x 2000 epochs. TaxiBJ and "
          "KTH: N / batch steps/epoch x epochs, N = the training set's sequences (train.py prints it: "
          "'train: ... N sequences'), so the time is given per 10,000 training sequences")
    print("| protocol | path | s/step | projected wall time |")
    print("|---|---|---|---|", flush=True)
    for name, paths in step_s.items():
        preset = train.PRESETS[name]
        batch, epochs = preset["batch_size"], preset["epochs"]
        for path, s in paths.items():
            if name == "mmnist":
                steps = MMNIST_EPOCH // batch * epochs
                row(f"mmnist: {MMNIST_EPOCH // batch:,} steps x {epochs} epochs = {steps:,} steps",
                    path, f"{s:.3f}", f"{steps * s / 86400:.1f} days")
            else:
                per_10k = 10_000 / batch * epochs * s
                row(f"{name}: N/{batch} steps x {epochs} epochs", path, f"{s:.3f}",
                    f"{per_10k / 3600:.1f} h x N / 10,000")


def bench_inference(device, quick, cases, paths, kernel_missing, models):
    """Inference rollouts: TaxiBJ at batch 16 on CUDA (the paper's 526 FPS), every model at batch 1
    on CPU."""
    cuda = device == "cuda"
    names = [n for n in models if n == "taxibj" or not cuda]
    repeats = 1 if quick or not cuda else 5
    print(f"\n## Inference on {device}, no_grad, best of {repeats} after one call: sequences/s = "
          f"batch / s (OpenSTL's FPS); predicted frames/s = batch x t_out / s (the t_out future "
          f"frames; the t_in - 1 teacher-forced next-frame predictions are not counted). The paper "
          f"reports 526 FPS for TaxiBJ on an A6000", flush=True)
    print("| model | batch, rollout | path | ran | first s | s/rollout | sequences/s | "
          "predicted frames/s |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for name in names:
        batch = train.PRESETS[name]["batch_size"] if cuda else 1
        t_in, t_out = (2, 1) if quick else (PAPER[name]["t_in"], PAPER[name]["t_out"])
        for path in [p for p in paths if "graphs" not in p]:
            cells = [name, f"{batch}, {t_in}->{t_out}", path]
            if TRAIN_PATHS[path][0] == "mamba" and kernel_missing:
                row(*cells, kernel_missing, "", "", "", "")
                continue
            r = cases.run(f"inference {name} {path}", lambda: measure_inference(
                name, device, quick, path, batch, t_in, t_out, repeats))
            if isinstance(r, str):
                row(*cells, r, "", "", "", "")
                continue
            ran, first, best = r
            row(*cells, ran, f"{first:.2f}", f"{best:.3f}", f"{batch / best:.2f}",
                f"{batch * t_out / best:.1f}")


# --------------------------------------------------------------------------------------------------
# 3. Moving MNIST generation
# --------------------------------------------------------------------------------------------------

def bench_data(quick):
    """Training sequences per second MovingMNIST generates on one CPU core (10 + 10, 64x64).

    Times one epoch from set_epoch to the last item, drawing the epoch's trajectories included.
    The digits are random pixels: the speed does not depend on their content.
    """
    sequences = 500 if quick else MMNIST_EPOCH
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        digits = np.random.default_rng(0).integers(0, 256, (10_000, 28, 28), dtype=np.uint8)
        train = MovingMNIST(digits, length=sequences)
        start = time.perf_counter()
        train.set_epoch(1)
        for i in range(sequences):
            train[i]
        rate = sequences / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    print(f"\n## Moving MNIST generation: {rate:,.0f} training sequences/s on one CPU core "
          f"(10+10 frames, 64x64, {sequences:,} sequences)")


# --------------------------------------------------------------------------------------------------
# 4. Parameters and FLOPs
# --------------------------------------------------------------------------------------------------

def _einsum_cost(shapes, equation):
    """numpy's optimized-path cost of an einsum, halved (multiply-adds), as fvcore/VMamba count it."""
    report = np.einsum_path(equation, *[np.empty(s) for s in shapes], optimize="optimal")[1]
    line = next(l for l in report.splitlines() if "optimized flop" in l.lower())
    return math.floor(float(line.split(":")[-1]) / 2)


def scan_macs(b, d, l, n):
    """VMamba's analytic count of one grouped selective scan with D, without z (the count fvcore
    uses when told about the scan): discretisation, l state updates and read-outs, skip term."""
    return (_einsum_cost([[b, d, l], [d, n]], "bdl,dn->bdln")
            + _einsum_cost([[b, d, l], [b, n, l], [b, d, l]], "bdl,bnl,bdl->bdln")
            + l * (b * d * n + _einsum_cost([[b, d, n], [b, d, n]], "bdn,bdn->bd"))
            + b * d * l)


def count_macs(model, frames, pred_len):
    """Multiply-accumulates of one rollout, split the way fvcore (the papers' counter) counts them.

    matmul: convolutions, linears and einsums, from PyTorch's FlopCounterMode (FLOPs / 2);
    norm: affine LayerNorm / GroupNorm at 5 per input element (fvcore's rule);
    scan: the selective scans, by `scan_macs` (fvcore does not see them unless told).
    """
    norm_elements, scans = [0], []

    def on_norm(module, inputs, output):
        norm_elements[0] += inputs[0].numel()

    def on_ss2d(module, inputs, output):
        b, H, W, _ = inputs[0].shape
        scans.append((b, 4 * module.d_inner, H * W, module.d_state))

    hooks = [m.register_forward_hook(on_norm) for m in model.modules()
             if isinstance(m, (nn.LayerNorm, nn.GroupNorm))]
    hooks += [m.register_forward_hook(on_ss2d) for m in model.modules() if isinstance(m, vmrnn.SS2D)]
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(frames, pred_len)
    finally:
        for hook in hooks:
            hook.remove()
    return dict(matmul=counter.get_total_flops() // 2, norm=5 * norm_elements[0],
                scan=sum(scan_macs(*s) for s in scans))


def bench_flops(quick):
    print("\n## Parameters and FLOPs (Table 1 models; GMACs of the whole rollout at batch 1)")
    print("| config | params (ours) | authors' params | never used by the authors | "
          "GMACs without scan | GMACs with scan |")
    print("|---|---|---|---|---|---|")
    for name, p in PAPER.items():
        if quick and name != "taxibj":
            continue
        model = vmrnn.paper_model(name).eval()
        params = sum(t.numel() for t in model.parameters())
        frames = torch.rand(1, p["t_in"], model.in_chans, *model.img_size)
        macs = count_macs(model, frames, p["t_out"])
        without = (macs["matmul"] + macs["norm"]) / 1e9
        print(f"| {name} {p['t_in']}->{p['t_out']} | {params:,} | {p['params_all']:,} | "
              f"{p['params_unused']:,} | {without:.3f} | {without + macs['scan'] / 1e9:.3f} |")


SECTIONS = ["scan", "train", "data", "flops"]


def main(argv=None):
    """Run the chosen sections; returns the exit status (1 if a case failed other than by OOM)."""
    global _START
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default: cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and models: seconds, not numbers")
    parser.add_argument("--only", nargs="+", choices=SECTIONS + ["models"], metavar="SECTION",
                        help=f"sections to run, of {', '.join(SECTIONS)} (models = train, its old name); "
                             f"default: all on CPU, scan and train on CUDA")
    parser.add_argument("--models", nargs="+", choices=list(PAPER), default=["taxibj", "mmnist", "kth"],
                        help="the Table 1 models of the train section, run in this order (default: taxibj "
                             "mmnist kth)")
    parser.add_argument("--scan-compile", choices=["auto", "on", "off"], default="auto",
                        help="add the compiled-scan paths (vmrnn.set_scan_compile): auto (default) = on CUDA "
                             "only (on a 2-core CPU a new scan shape took 12-37 s to compile forward and "
                             "29-127 s backward)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new case after this many seconds (default: 420 on CUDA, none on CPU)")
    args = parser.parse_args(argv)
    if args.budget_s is not None and not args.budget_s > 0:
        parser.error(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu)")
    only = args.only or (["scan", "train"] if args.device == "cuda" else SECTIONS)
    only = {"train" if s == "models" else s for s in only}
    budget_s = args.budget_s if args.budget_s is not None else 420.0 if args.device == "cuda" else None
    _START = time.perf_counter()
    threads = train.default_threads()
    torch.set_num_threads(threads)
    if args.device == "cuda":
        kernel = kernel_status("cuda") or "runs"
        where = (f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}; mamba-ssm kernel: {kernel}; "
                 f"{threads} CPU threads")
    else:
        where = f"{threads} thread{'s' if threads != 1 else ''}"
    print(f"# bench.py: torch {torch.__version__}, device {args.device} ({where})"
          + (", QUICK (not numbers)" if args.quick else "")
          + f"; load average {os.getloadavg()[0]:.1f}"
          + (f"; --budget-s {budget_s:.0f}" if budget_s is not None else ""), flush=True)
    cases = Cases(budget_s)
    if "scan" in only:
        bench_scan(args.device, args.quick, cases, args.scan_compile)
    if "train" in only:
        bench_train(args.device, args.quick, cases, args.scan_compile, args.models)
    if "data" in only:
        bench_data(args.quick)
    if "flops" in only:
        bench_flops(args.quick)
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.1f} (other work on the machine "
          f"slows multi-threaded ops most); {time.perf_counter() - _START:.0f} s in all", flush=True)
    if cases.skipped:
        print(f"skipped for --budget-s: {', '.join(cases.skipped)} (rerun them with --only / --models)")
    if cases.failed:
        print(f"FAILED: {', '.join(cases.failed)} (tracebacks on stderr)")
    return 1 if cases.failed else 0


if __name__ == "__main__":
    sys.exit(main())
