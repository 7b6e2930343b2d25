"""Benchmarks behind every speed, memory and FLOP number in the README, measured as ratios in one run.

    python bench.py                  # CPU, all sections (about 10 minutes on 2 cores)
    python bench.py --device cuda    # the same on a GPU
    python bench.py --quick          # tiny shapes, seconds: checks that the benchmark runs

Sections:
  1. Selective scan: the parallel PyTorch scan (and the mamba-ssm kernel on CUDA, when it runs)
     against a careful float32 sequential loop, forward, forward + backward and peak memory, at the
     top-level scan shapes of the three Table 1 models.
  2. Model throughput: training step and inference rollout, sequences/s, and peak memory of a
     training step, for the three Table 1 models at batch 1.
  3. Moving MNIST generation speed, training sequences/s on one CPU core.
  4. Parameters and FLOPs of the Table 1 models, in the papers' convention (fvcore's
     multiply-accumulates over the whole rollout at batch 1), with and without the selective scan.

Peak memory on CPU is the peak resident memory (VmHWM) of a fresh process per case (it includes Python and torch,
about 300 MB); on CUDA it is torch.cuda.max_memory_allocated.
"""

import argparse
import math
import multiprocessing
import os
import resource
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import vmrnn
from data import MMNIST_EPOCH, MovingMNIST


def timed(fn, device, repeats=3):
    """Best wall-clock seconds of `repeats` calls of fn() after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _rss_after(case, args):
    """In a fresh process: run case(*args) once, return the process's peak resident memory, MB.

    Read from VmHWM: ru_maxrss would also count the parent's peak, which Linux carries across the
    fork + exec that starts the process.
    """
    torch.set_num_threads(2)
    case(*args)
    try:
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) for l in status if l.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # KB on Linux


def peak_mb(case, args, device):
    """Peak memory of case(*args): a fresh process's ru_maxrss (CPU), or max allocated (CUDA)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        case(*args)
        return torch.cuda.max_memory_allocated() / 2 ** 20
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_rss_after, (case, args))


# --------------------------------------------------------------------------------------------------
# 1. Selective scan
# --------------------------------------------------------------------------------------------------

# (name, b, d, l, n, g): the top-level scan of each paper model (d = 4 directions x d_inner, l = H*W).
SCAN_SHAPES = [("Moving MNIST", 2, 1024, 1024, 16, 4),     # VMRNN-D level 0, 32x32 grid
               ("TaxiBJ", 16, 1024, 64, 16, 4),            # 8x8 grid
               ("KTH", 1, 1024, 4096, 16, 4)]              # 64x64 grid
QUICK_SCAN_SHAPES = [("quick", 2, 32, 100, 4, 4)]


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
    """One forward (and backward) of `method`: "loop" or a selective_scan backend, on inputs x
    (drawn here if not given, for the memory measurement in a fresh process)."""
    x = x if x is not None else scan_inputs(*shape, device=device, requires_grad=backward)
    with torch.set_grad_enabled(backward):
        if method == "loop":
            y = loop_scan(x["u"], F.softplus(x["delta"] + x["delta_bias"][:, None]), x["A"], x["B"],
                          x["C"])
        else:
            y = vmrnn.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"],
                                     delta_bias=x["delta_bias"], delta_softplus=True, backend=method)
        if backward:
            y.backward(torch.ones_like(y))


def bench_scan(device, quick):
    shapes, repeats = (QUICK_SCAN_SHAPES, 1) if quick else (SCAN_SHAPES, 3)
    methods = ["loop", "torch"]
    if device == "cuda" and vmrnn._mamba_kernel_works(torch.device("cuda")):
        methods.append("mamba")
    print(f"\n## Selective scan on {device} ({torch.get_num_threads()} threads), best of {repeats}; "
          f"speed-up = loop time / method time; memory = method peak / loop peak")
    print("| shape | (b, d, l, n, g) | method | fwd s | speed-up | fwd+bwd s | speed-up | peak MB | "
          "memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, *shape in shapes:
        results = {}
        inputs = {grad: scan_inputs(*shape, device=device, requires_grad=grad) for grad in (False, True)}
        for m in methods:   # inputs drawn once, outside the timed region
            results[m] = (timed(lambda: scan_case(m, shape, device, False, inputs[False]), device,
                                repeats),
                          timed(lambda: scan_case(m, shape, device, True, inputs[True]), device,
                                repeats),
                          peak_mb(scan_case, (m, shape, device, True), device))
        base = results["loop"]
        for m, r in results.items():
            print(f"| {name} | {tuple(shape)} | {m} | {r[0]:.3f} | {base[0] / r[0]:.2f}x | "
                  f"{r[1]:.3f} | {base[1] / r[1]:.2f}x | {r[2]:.0f} | {r[2] / base[2]:.2f}x |")


# --------------------------------------------------------------------------------------------------
# 2. Model throughput
# --------------------------------------------------------------------------------------------------

# Table 1 rollouts (frames in, frames out) and the authors' parameter counts (SPEC §6).
PAPER = {
    "taxibj": dict(t_in=4, t_out=4, params_all=2_579_970, params_unused=361_856),
    "kth": dict(t_in=10, t_out=20, params_all=1_214_721, params_unused=164_480),
    "mmnist": dict(t_in=10, t_out=10, params_all=15_267_201, params_unused=1_871_872),
}


def model_case(name, device, quick, train, t_in, t_out, repeats=1, batch=1):
    """Seconds of one training step (rollout, loss, backward, Adam) or one inference rollout."""
    model = vmrnn.paper_model(name, **(dict(embed_dim=16) if quick else {})).to(device)
    frames = torch.rand(batch, t_in + t_out, model.in_chans, *model.img_size, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train_step():
        loss = F.mse_loss(model(frames[:, :t_in], t_out), frames[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer():
        model(frames[:, :t_in], t_out)

    model.train(train)
    return timed(train_step if train else infer, device, repeats)


def bench_models(device, quick):
    print(f"\n## Model throughput on {device}, batch 1, Table 1 rollouts (pure-PyTorch scan), "
          f"sequences/s")
    print("| model | rollout | train step seq/s | inference seq/s | peak MB (train step) |")
    print("|---|---|---|---|---|")
    for name, p in PAPER.items():
        infer = (2, 1) if quick else (p["t_in"], p["t_out"])
        # KTH's 29-frame training rollout at batch 1 outgrew a 24 GB CPU machine (past 21 GB of
        # activations: 174 SS2D calls on a 64x64 grid), so on CPU its train step runs 10 -> 2.
        train = (10, 2) if name == "kth" and device == "cpu" and not quick else infer
        train_s = model_case(name, device, quick, True, *train)
        infer_s = model_case(name, device, quick, False, *infer)
        mem = peak_mb(model_case, (name, device, quick, True, *train, 0), device)
        print(f"| {name} | {infer[0]}->{infer[1]}{' (quick)' if quick else ''} | {1 / train_s:.3f}"
              f"{f' (at {train[0]}->{train[1]})' if train != infer else ''} | {1 / infer_s:.3f} | "
              f"{mem:.0f} |")


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: seconds, not numbers")
    parser.add_argument("--only", nargs="+", choices=["scan", "models", "data", "flops"],
                        default=["scan", "models", "data", "flops"])
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(2)
    print(f"# bench.py: torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else
             f" ({torch.get_num_threads()} threads)") + (", QUICK (not numbers)" if args.quick else "")
          + f"; load average {os.getloadavg()[0]:.1f}")
    if "scan" in args.only:
        bench_scan(args.device, args.quick)
    if "models" in args.only:
        bench_models(args.device, args.quick)
    if "data" in args.only:
        bench_data(args.quick)
    if "flops" in args.only:
        bench_flops(args.quick)
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.1f} (other work on the machine "
          f"slows multi-threaded ops most)")


if __name__ == "__main__":
    main()
