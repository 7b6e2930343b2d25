"""Train and evaluate VMRNN (vmrnn.py) on Moving MNIST, KTH, TaxiBJ or the offline "shapes" toy set.

Quick start (CPU, offline, about 75 s on 2 cores; MNIST t10k digits instead of the train file; a tiny
VMRNN-D with patch 8 and 5->5 frames, NOT the paper's setting):

    python train.py --data mmnist --digits-file ../shared/data/t10k-images-idx3-ubyte.gz --device cpu \\
        --embed-dim 16 --depths 1 1 1 1 --patch-size 8 --input-frames 5 --output-frames 5 --batch-size 4 \\
        --lr 1e-3 --max-steps 400 --val-samples 64 --log-every 50 --num-workers 0 --out runs/quick

Paper runs (Table 1): `python train.py --data mmnist` (or kth, taxibj); several GPUs:
`torchrun --nproc_per_node=4 train.py --data taxibj` (DistributedDataParallel, --batch-size is per process).
`python train.py -h` lists every option with its default.

Reading guide, top to bottom: defaults (the table below) -> command line (and what --resume may change) ->
metrics (small pure functions) -> pictures -> checkpoints and log -> model, loss, schedule -> the training step
(make_train_step) -> evaluate -> train -> main. One training step is rollout (model(frames[:, :t_in], t_out),
SPEC section 5) -> loss over all t_in-1+t_out next-frame predictions against frames[:, 1:] -> Adam step -> log ->
(at epoch ends) evaluate -> save.

Defaults with nothing but --data X (model width 128, d_state 16, drop path 0.1 everywhere, Adam, no weight decay,
no gradient clipping). P = the paper's Table 1; C = the authors' code (Moving_MNIST_VMRNN/ for mmnist, their
OpenSTL configs and scripts for kth and taxibj):

    data    model    depths     patch  frames  lr        batch  epochs  loss       schedule              amp (CUDA)
    mmnist  VMRNN-D  2 6 6 2 P  2 P    10->10  5e-5 P,C  8 P,C  2000 P  MSE+L1 C   constant C            fp16 C
    kth     VMRNN-B  6 P        2 P    10->20  5e-4 P    2 P    100 P   MSE P,C    cosine, 5 warm-up C   none C
    taxibj  VMRNN-B  12 P       4 P    4->4    4e-4 P,C  16 P,C 200 P,C MSE P,C    cosine, 5 warm-up C   none C
    shapes  VMRNN-B  2          2      10->10  5e-4      8      10      MSE        cosine, 1 warm-up     none
    (shapes is ours: a smoke-test set, not a benchmark.)

Notes on the choices. The paper says MSE for every dataset; the authors' Moving MNIST script trains on MSE + L1
(use --loss mse for the paper's). Their Moving MNIST script also ran under fp16 autocast with a gradient scaler and
a constant learning rate; their OpenSTL runs (kth, taxibj) ran in fp32 with timm's cosine schedule stepped once per
epoch: lr rises linearly from 1e-5 over 5 warm-up epochs, then follows min_lr + (lr - min_lr)(1 + cos(pi e / E)) / 2
with min_lr 1e-6. KTH: the paper lists 5e-4 / batch 2 for 10->20 and 1e-4 / batch 1 for 10->40 (pass
--output-frames 40 --lr 1e-4 --batch-size 1); the authors' KTH script used 1e-4 and batch 4. On CPU the amp default
is none (fp16 autocast is a GPU speed-up). The paper's 2000 Moving MNIST epochs are its Table 1; the authors' script
ran 500 and then continued from a checkpoint.

Evaluation (SPEC section 8) is on the last t_out frames of the first --val-samples validation sequences: MSE and
MAE are per-frame sums over C*H*W averaged over sequences and frames; SSIM is scikit-image's per frame, averaged,
reported with data_range=2 (`ssim`, comparable with the published tables, whose scikit-image defaulted to 2 for
float frames) and data_range=1 (`ssim_dr1`, the physically right value for [0, 1] frames); PSNR is
10*log10(1 / mse) per frame in float, averaged. Under torchrun each process evaluates every world_size-th
sequence and the sums are all-reduced, so every rank holds the same metrics.

Saving and resuming. ckpt_last.pt is written (atomically: a temporary file, then a rename) every --save-every
steps (default 500), whenever --save-minutes (default 10) have passed since the last save, at every epoch end,
and when the run stops. It holds the epoch, the batch within it, the elapsed time and every RNG state (of every
rank); the data order of epoch e is a function of (seed, e), so `--resume --out RUN` continues exactly where the
run stopped. SIGINT (Ctrl-C) or SIGTERM: the current step finishes (in one process, an evaluation in progress is
abandoned), ckpt_last.pt is saved and the run exits (status 128 + the signal's number) with one line on stderr
giving the command that resumes it; a second signal stops at once without saving. A non-finite loss or
validation MSE, or weights that predict non-finite frames when a save is due, stop the run without saving: the
last checkpoint stays the last good state, and the message gives the command that resumes from it with a lower
--lr (which --resume applies, see below). Flags given with --resume override the
saved config, and the checkpoints record the values actually used. Flags that define the model or the data
cannot change mid-run and are refused (start a new run with another --out): FIXED_ON_RESUME below, i.e. --data,
--digits-file, --image-size, --channels, --input-frames, --output-frames, --train-length, --model, --depths,
--embed-dim, --patch-size, --cell-update, --batch-size (the resume point is counted in batches) and --seed (the
data order). Everything else may change: e.g. --lr (applied to the optimiser and the schedule), --epochs,
--max-steps, --grad-clip, --drop-path, --loss, --schedule, --warmup-epochs, --amp, --val-samples, the log, eval
and save cadence, --num-workers, --threads, --data-dir (a location), and the speed options. --device is given
per invocation (default: cuda if available). Paths (--data-dir, --digits-file) are stored absolute, so a run
resumes from any folder. A new run (no --resume) in a folder that holds ckpt_last.pt is refused; one that holds
only a log (a run stopped before its first save) starts a clean log.csv.

CPU threads: --threads, default $OMP_NUM_THREADS if set, else the cores this process may use (sched_getaffinity)
minus those other processes keep busy right now (runnable tasks in /proc/loadavg), at least 1 (default_threads());
saved with the run, so a resumed run computes with the same count.

Speed options. On a GPU the selective scan runs eagerly with long chunks and few slabs (vmrnn._slab_sizes).
--scan-compile {auto,on,off}: torch.compile the selective scan only (vmrnn.set_scan_compile; auto = on CUDA only);
default off, because its compile time has not been measured on a GPU yet (on a 2-core CPU a new scan shape took
12-37 s forward and 29-127 s backward). --compile is an alias of --scan-compile on (whole-model torch.compile was
removed: it gave no step within 240 s on a GPU). --checkpoint-steps: activation checkpointing per frame step
(model.checkpoint_steps), trading compute for memory. --cuda-graphs (opt-in, CUDA, one process, amp none or bf16):
forward + backward captured in a CUDA graph, see make_train_step; UNVERIFIED on a GPU so far.
Progress: a line after the first step, then every --log-every steps or --log-seconds seconds, whichever comes
first (step/total, loss, lr, s/step, sequences/s, peak GPU memory on CUDA, ETA of the run); an evaluation reports
its progress every --log-seconds too.

Run folder (--out): ckpt_last.pt and ckpt_best.pt (best validation MSE); log.csv (one row per log line and per
evaluation; an eval row carries the epoch whose training it follows; time_s continues across resumes);
samples.png and samples_best.png (input / ground truth / prediction rows, plus |error| for TaxiBJ). Checkpoints
load with torch.load(path, weights_only=True): {"model", "optimizer", "scaler", "epoch", "batch_in_epoch",
"step", "elapsed_s", "best_mse", "metrics", "rng" (one dict per rank), "world_size", "config"}.
"""

import argparse
import csv
import io
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from skimage.metrics import structural_similarity
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

import vmrnn
from data import DataError, build_datasets
from vmrnn import VMRNN_B, VMRNN_D, load_official_state_dict

# ----------------------------------------------------------------------------------------------------------------
# Defaults: the paper's Table 1 and the authors' scripts (see the table in the module docstring)
# ----------------------------------------------------------------------------------------------------------------

PRESETS = {
    "mmnist": dict(model="vmrnn-d", depths=[2, 6, 6, 2], patch_size=2, lr=5e-5, batch_size=8, epochs=2000,
                   loss="mse+l1", schedule="constant", warmup_epochs=0, amp="fp16", eval_every=5),
    "kth": dict(model="vmrnn-b", depths=[6], patch_size=2, lr=5e-4, batch_size=2, epochs=100,
                loss="mse", schedule="cosine", warmup_epochs=5, amp="none", eval_every=1),
    "taxibj": dict(model="vmrnn-b", depths=[12], patch_size=4, lr=4e-4, batch_size=16, epochs=200,
                   loss="mse", schedule="cosine", warmup_epochs=5, amp="none", eval_every=1),
    "shapes": dict(model="vmrnn-b", depths=[2], patch_size=2, lr=5e-4, batch_size=8, epochs=10,
                   loss="mse", schedule="cosine", warmup_epochs=1, amp="none", eval_every=1),
}
WARMUP_LR, MIN_LR = 1e-5, 1e-6          # OpenSTL's defaults for timm's CosineLRScheduler
FIGURE_SEQUENCES = 3                     # validation sequences drawn in samples.png
CSV_FIELDS = ["kind", "step", "epoch", "time_s", "lr", "loss", "seq_per_s",
              "mse", "mae", "ssim", "ssim_dr1", "psnr", "mse_per_frame"]
NOT_SAVED = ("resume", "eval_only", "ckpt", "device", "out", "no_download")   # per-invocation flags
FIXED_ON_RESUME = ("data", "digits_file", "image_size", "channels", "input_frames", "output_frames", "train_length",
                   "model", "depths", "embed_dim", "patch_size", "cell_update", "batch_size", "seed")
CHECKPOINT_KEYS = {"model", "optimizer", "scaler", "epoch", "batch_in_epoch", "step", "best_mse", "metrics", "rng",
                   "world_size", "config"}

# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage block), exit status 2."""

    def error(self, message):
        syntax = message.startswith(("argument ", "unrecognized arguments", "ambiguous option"))
        self.exit(2, f"error: {message}" + (" (python train.py -h lists every option)\n" if syntax else "\n"))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """-h shows every default; an unset (None) default reads "per dataset" (the table in the module docstring)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or action.nargs == 0:
            return text
        return text + (" (default: per dataset)" if action.default is None else " (default: %(default)s)")


def build_parser():
    p = OneLineParser(description="Train or evaluate VMRNN. Options left unset take the dataset's defaults (the "
                                  "table in train.py's docstring).", formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=sorted(PRESETS), help="dataset (no default; --resume takes it from the run)")
    g.add_argument("--data-dir", default="data", metavar="DIR", help="where the dataset files are")
    g.add_argument("--digits-file", metavar="PATH", help="mmnist: train on this MNIST idx file (its last 30%% = "
                   "validation); NOT the paper protocol (default: the MNIST train file)")
    g.add_argument("--no-download", action="store_true", help="never download missing MNIST files")
    g.add_argument("--input-frames", type=int, metavar="N", help="frames the model sees")
    g.add_argument("--output-frames", type=int, metavar="N", help="frames it predicts")
    g.add_argument("--image-size", type=int, metavar="N", help="mmnist canvas, kth resize, shapes size")
    g.add_argument("--channels", type=int, metavar="N", help="shapes only: channels per frame (default: 1)")
    g.add_argument("--train-length", type=int, metavar="N",
                   help="mmnist/shapes: generated training sequences per epoch")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=["vmrnn-b", "vmrnn-d"], help="VMRNN-B (one cell) or VMRNN-D (down/up)")
    g.add_argument("--depths", type=int, nargs="+", metavar="N",
                   help="VMRNN-B: one int; VMRNN-D: down then up, e.g. 2 6 6 2")
    g.add_argument("--embed-dim", type=int, default=128, metavar="N", help="model width C")
    g.add_argument("--patch-size", type=int, metavar="N", help="pixels per patch side")
    g.add_argument("--drop-path", type=float, default=0.1, metavar="P", help="stochastic depth rate, in [0, 1)")
    g.add_argument("--cell-update", choices=["code", "paper"], default="code",
                   help="cell-state update: the authors' code or the paper's Eq. (5)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, metavar="N", help="passes over the training set")
    g.add_argument("--max-steps", type=int, metavar="N",
                   help="stop after this many optimiser steps in total (default: none)")
    g.add_argument("--batch-size", type=int, metavar="N", help="sequences per step and process")
    g.add_argument("--lr", type=float, help="peak learning rate of Adam")
    g.add_argument("--schedule", choices=["constant", "cosine"], help="learning-rate schedule, stepped per epoch")
    g.add_argument("--warmup-epochs", type=int, metavar="N", help="linear warm-up of the cosine schedule")
    g.add_argument("--loss", choices=["mse", "mse+l1"], help="training loss")
    g.add_argument("--grad-clip", type=float, default=0.0, metavar="X",
                   help="clip the gradient norm to this (0 = off)")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], help="autocast dtype (default: per dataset on "
                                                                   "CUDA, none on CPU)")
    g.add_argument("--seed", type=int, default=0, help="weights, data order and drop-path draws")
    g = p.add_argument_group("speed")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: $OMP_NUM_THREADS, else "
                   "the cores not busy with other processes now, at least 1)")
    g.add_argument("--num-workers", type=int, default=4, metavar="N",
                   help="data-loading processes (0 = load in this one)")
    g.add_argument("--scan-compile", choices=["auto", "on", "off"], default="off",
                   help="torch.compile the selective scan only (auto: on CUDA; off by default until its compile "
                        "time is measured on a GPU)")
    g.add_argument("--compile", dest="scan_compile", action="store_const", const="on",
                   help="alias of --scan-compile on (whole-model torch.compile was removed: it gave no step within "
                        "240 s on a GPU)")
    g.add_argument("--checkpoint-steps", action=argparse.BooleanOptionalAction, default=False,
                   help="activation checkpointing per frame step: less memory, about one more forward pass")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
                   help="capture forward + backward in a CUDA graph (CUDA, one process, amp none/bf16; unverified)")
    g = p.add_argument_group("run folder, logging, evaluation")
    g.add_argument("--out", metavar="DIR", help="run folder (default: runs/DATA)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its ckpt_last.pt")
    g.add_argument("--save-every", type=int, default=500, metavar="N",
                   help="save ckpt_last.pt every N steps (0 = off)")
    g.add_argument("--save-minutes", type=float, default=10.0, metavar="M",
                   help="and whenever this many minutes passed since the last save (0 = off)")
    g.add_argument("--log-every", type=int, default=50, metavar="N", help="print and log a line every N steps")
    g.add_argument("--log-seconds", type=float, default=30.0, metavar="S",
                   help="and whenever this many seconds passed since the last line (0 = off)")
    g.add_argument("--val-samples", type=int, metavar="N",
                   help="evaluate on the first N validation sequences (default: all)")
    g.add_argument("--eval-every", type=int, metavar="N", help="evaluate every N epochs (and always at the end)")
    g.add_argument("--eval-only", action="store_true", help="evaluate --ckpt on the validation set and stop")
    g.add_argument("--ckpt", metavar="PATH",
                   help="checkpoint for --eval-only: ours, or the authors' state dict (default: none)")
    return p


def parse_args(argv=None):
    """Flags -> (config dict of plain Python values, loaded checkpoint or None). Bad flags: one line, exit 2.

    With --resume (and --eval-only of our checkpoint) the saved config fills every flag the user did not type;
    a typed flag wins, except FIXED_ON_RESUME ones, which --resume refuses to change."""
    parser = build_parser()
    args = parser.parse_args(argv)
    unset = object()                                    # argparse fills only the dests a namespace lacks
    typed = parser.parse_args(argv, argparse.Namespace(**{key: unset for key in vars(args)}))
    given = {key for key, value in vars(typed).items() if value is not unset}    # the flags typed
    cfg = vars(args)
    for key in ("data_dir", "digits_file"):             # absolute: a run resumes from any folder
        if cfg[key] is not None:
            cfg[key] = os.path.abspath(cfg[key])
    ckpt = None
    if args.resume and args.eval_only:
        parser.error("--resume and --eval-only exclude each other")
    if args.resume:
        if args.out is None:
            parser.error("--resume needs --out, the folder of the run to continue")
        path = Path(args.out) / "ckpt_last.pt"
        if not path.is_file():
            why = ("the run stopped before its first save: start it again without --resume" if
                   (Path(args.out) / "log.csv").is_file() else "is --out the folder of the run?")
            parser.error(f"--resume: no checkpoint {path} ({why})")
        ckpt = load_checkpoint_file(path, "--resume")
        check_resumable(ckpt, path)
        apply_saved_config(cfg, given, ckpt["config"], refuse=FIXED_ON_RESUME, out=args.out, parser=parser)
    elif args.eval_only:
        if args.ckpt is None:
            parser.error("--eval-only needs --ckpt PATH")
        if not Path(args.ckpt).is_file():
            parser.error(f"--ckpt: no such file {args.ckpt}")
        ckpt = load_checkpoint_file(Path(args.ckpt), "--ckpt")
        if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and "model" in ckpt:   # ours
            apply_saved_config(cfg, given, ckpt["config"], refuse=(), out=None, parser=parser)
    elif args.ckpt is not None:
        parser.error("--ckpt goes with --eval-only (use --resume --out RUN to continue training)")
    if cfg["data"] is None:
        parser.error("--data is required")
    cfg["device"] = check_device(cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu"), parser)
    if not cfg["device"].startswith("cuda"):            # also a GPU run resumed on CPU: its GPU options go
        if "amp" not in given and cfg["amp"] in (None, "fp16"):
            cfg["amp"] = "none"                         # autocast is a GPU speed-up; CPU runs in fp32
        cfg["cuda_graphs"] = cfg["cuda_graphs"] and "cuda_graphs" in given
    for key, value in PRESETS[cfg["data"]].items():
        if cfg[key] is None:
            cfg[key] = value
    if cfg["threads"] is None:
        cfg["threads"] = default_threads()
    check_ranges(cfg, parser)
    if not cfg["eval_only"]:
        cfg["out"] = cfg["out"] or f"runs/{cfg['data']}"
        if not cfg["resume"] and (Path(cfg["out"]) / "ckpt_last.pt").exists():
            parser.error(f"{cfg['out']} already holds a run: pass --resume to continue it, or choose a fresh --out")
    return cfg, ckpt


def apply_saved_config(cfg, given, saved, refuse, out, parser):
    """Fill cfg from a checkpoint's config wherever the user typed nothing; refuse a typed change of a `refuse` key."""
    for key in refuse:
        if key in given and key in saved and cfg[key] != saved[key]:
            show = lambda v: "the dataset's default" if v is None else " ".join(map(str, v)) if isinstance(v, list) \
                else str(v)
            flag = "--" + key.replace("_", "-")
            parser.error(f"{flag} cannot change on --resume: the run in {out} was started with {show(saved[key])}, "
                         f"you gave {show(cfg[key])}; leave {flag} out to continue that run, or start a new run "
                         f"with another --out")
    for key, value in saved.items():
        if key in cfg and key not in given and key not in NOT_SAVED:   # unknown keys: options since removed
            cfg[key] = value


def check_device(name, parser):
    """--device -> a device string torch can use here, or one line saying why not (before any data is built)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name}: not a device name; use --device cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            parser.error(f"--device {name}: CUDA is not available ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {name}: there is no such GPU, this machine has {torch.cuda.device_count()} "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            parser.error(f"--device {name}: Apple's MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        parser.error(f"--device {name}: unsupported device type {device.type!r}; use --device cpu or cuda")
    return name


def check_ranges(cfg, parser):
    """Every numeric option in its range, and the combinations that cannot work, refused before any work."""
    want = 1 if cfg["model"] == "vmrnn-b" else 4
    if len(cfg["depths"]) != want or min(cfg["depths"]) < 1:
        parser.error(f"--depths: {cfg['model']} takes {want} positive int(s) "
                     f"({'the blocks of its one cell' if want == 1 else 'down then up, e.g. 2 6 6 2'}), "
                     f"got {' '.join(map(str, cfg['depths']))}")
    flag = lambda key: "--" + key.replace("_", "-")
    for key in ("epochs", "batch_size", "embed_dim", "eval_every", "log_every", "max_steps", "val_samples",
                "input_frames", "output_frames", "train_length", "image_size", "channels", "patch_size", "threads"):
        if cfg[key] is not None and cfg[key] < 1:
            parser.error(f"{flag(key)} must be >= 1, got {cfg[key]}")
    for key in ("warmup_epochs", "num_workers", "save_every"):
        if cfg[key] < 0:
            parser.error(f"{flag(key)} must be >= 0, got {cfg[key]}")
    for key in ("grad_clip", "save_minutes", "log_seconds"):
        if not (0 <= cfg[key] < math.inf):
            parser.error(f"{flag(key)} must be a finite number >= 0 (0 = off), got {cfg[key]}")
    if not (0 < cfg["lr"] < math.inf):
        parser.error(f"--lr must be a finite number > 0, got {cfg['lr']}")
    if not (0 <= cfg["drop_path"] < 1):
        parser.error(f"--drop-path is a probability in [0, 1), got {cfg['drop_path']}")
    if cfg["digits_file"] is not None and cfg["data"] != "mmnist":
        parser.error("--digits-file applies to --data mmnist only")
    if cfg["cuda_graphs"] and not cfg["eval_only"]:
        if not cfg["device"].startswith("cuda"):
            parser.error(f"--cuda-graphs needs a CUDA device, got --device {cfg['device']}; leave it out (or pass "
                         f"--no-cuda-graphs)")
        if cfg["amp"] == "fp16":
            parser.error("--cuda-graphs does not support --amp fp16 (its gradient scaler); use --amp bf16 or none")


def default_threads():
    """CPU threads for torch: $OMP_NUM_THREADS if set, else the cores this process may run on (sched_getaffinity)
    minus those other processes keep busy (busy_cores), at least 1. Oversubscribed cores make a step many times
    slower, so under load fewer threads are faster."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    elsewhere = max(0, (os.cpu_count() or cores) - cores)   # cores we may not use take other work first
    return max(1, cores - max(0, busy_cores() - elsewhere))


LOADAVG = "/proc/loadavg"               # its 4th field: runnable tasks now / all tasks


def busy_cores(samples=5):
    """Tasks of other processes running now: the median of `samples` reads of LOADAVG, 10 ms apart, less this one.
    Where it cannot be read (not Linux), the rounded 1-minute load average, which lags: it still counts a process
    that ended a minute ago."""
    try:
        counts = []
        for _ in range(samples):
            with open(LOADAVG) as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
            time.sleep(0.01)
        return sorted(counts)[len(counts) // 2]
    except (OSError, ValueError, IndexError):
        return math.floor(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0


def first_line(error):
    """The first line of an exception's message (some have none): error messages stay one line."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_checkpoint_file(path, flag):
    """torch.load(weights_only=True), or one line saying what the file is instead (empty, not torch.save's,
    truncated, holding Python objects) and what to do."""
    fix = ("start a new run with another --out, or restore the file from a copy" if flag == "--resume" else
           "pass a checkpoint written by train.py or a state dict of the authors' code")
    if path.stat().st_size == 0:
        raise SystemExit(f"error: {flag}: {path} is empty (0 bytes), not a checkpoint; {fix}")
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")             # torch's protocol warnings about files it then rejects
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                              # pickle, zip or weights_only errors: one line
        if head != b"PK\x03\x04":                       # torch.save writes a zip archive
            what = "is not a checkpoint (not a file written by torch.save)"
        elif "weights only" in str(e).lower() or "weights_only" in str(e):
            what = "holds Python objects that weights_only loading refuses (not a checkpoint of train.py)"
        else:
            what = "is truncated or corrupt"
        raise SystemExit(f"error: {flag}: {path} {what}; {fix}") from None


def check_resumable(ckpt, path):
    """A checkpoint written by train.py, or one line: a bare state dict holds weights only, nothing to resume."""
    fix = f"evaluate it with --eval-only --ckpt {path}, or train from scratch with another --out"
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise SystemExit(f"error: --resume: {path} is a bare state dict (weights only): no optimiser state or "
                         f"step to continue from; {fix}")
    if not isinstance(ckpt, dict):
        raise SystemExit(f"error: --resume: {path} holds a {type(ckpt).__name__}, not a train.py checkpoint; {fix}")
    missing = sorted(CHECKPOINT_KEYS - set(ckpt))
    if missing or not isinstance(ckpt["config"], dict):
        raise SystemExit(f"error: --resume: {path} is not a complete train.py checkpoint (missing "
                         f"{', '.join(missing) or 'a config dict'}); {fix}")


# ----------------------------------------------------------------------------------------------------------------
# Metrics (SPEC section 8): pure functions of (n, t, c, h, w) arrays, one value per frame -> (n, t)
# ----------------------------------------------------------------------------------------------------------------


def _float(x):
    return np.asarray(x, dtype=np.float64)              # uint8 in, float out: no wrap-around


def mse_per_frame(pred, target):
    """Sum over C*H*W of the squared error of each frame: (n, t, c, h, w) -> (n, t)."""
    return ((_float(pred) - _float(target)) ** 2).sum(axis=(2, 3, 4))


def mae_per_frame(pred, target):
    """Sum over C*H*W of the absolute error of each frame: (n, t, c, h, w) -> (n, t)."""
    return np.abs(_float(pred) - _float(target)).sum(axis=(2, 3, 4))


def psnr_per_frame(pred, target, data_range=None):
    """10*log10(data_range^2 / mean squared error) per frame, in float64: (n, t, c, h, w) -> (n, t).

    data_range defaults to 255 for uint8 input and 1 for float; a perfect frame gives inf."""
    if data_range is None:
        data_range = 255.0 if np.asarray(target).dtype == np.uint8 else 1.0
    mse = ((_float(pred) - _float(target)) ** 2).mean(axis=(2, 3, 4))
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range ** 2 / mse)


def ssim_per_frame(pred, target, data_range):
    """scikit-image SSIM of each frame (channels as channel_axis when c > 1): (n, t, c, h, w) -> (n, t)."""
    pred, target = _float(pred), _float(target)
    n, t, c = pred.shape[:3]
    out = np.empty((n, t))
    for i, j in np.ndindex(n, t):
        if c == 1:
            out[i, j] = structural_similarity(target[i, j, 0], pred[i, j, 0], data_range=data_range)
        else:
            out[i, j] = structural_similarity(target[i, j], pred[i, j], data_range=data_range, channel_axis=0)
    return out


def frame_metric_sums(pred, target):
    """Per-frame metric sums over the sequences of a batch, to be added up and divided by the count."""
    return {"mse": mse_per_frame(pred, target).sum(0), "mae": mae_per_frame(pred, target).sum(0),
            "ssim": ssim_per_frame(pred, target, 2.0).sum(0), "ssim_dr1": ssim_per_frame(pred, target, 1.0).sum(0),
            "psnr": psnr_per_frame(pred, target, 1.0).sum(0)}          # each (t,)


# ----------------------------------------------------------------------------------------------------------------
# Pictures: input / ground truth / prediction (/ |error|) rows, like the paper's Figs. 4, 6, 7
# ----------------------------------------------------------------------------------------------------------------

TILE, GAP, SEQ_GAP, LABEL_W = 64, 2, 8, 48      # minimum tile side, gaps and label margin in pixels


def sample_grid(frames, pred, t_in, with_error=False):
    """frames (n, t_in+t_out, c, h, w), pred (n, t_out, c, h, w) in [0, 1] -> uint8 (H, W) image.

    Per sequence and channel, rows: input (t_in frames), ground truth, prediction [, |error| on the same
    [0, 1] scale]; frames are enlarged by an integer factor to at least TILE pixels."""
    frames, pred = np.clip(_float(frames), 0, 1), np.clip(_float(pred), 0, 1)
    n, t, c, h, w = frames.shape
    scale = max(1, math.ceil(TILE / h))
    sh, sw, cols = h * scale, w * scale, max(t_in, t - t_in)
    rows = []                                                   # (label, [frames (h, w)], top pixel)
    top = GAP
    for i in range(n):
        for ch in range(c):
            truth, guess = frames[i, t_in:, ch], pred[i, :, ch]
            block = [("input", frames[i, :t_in, ch]), ("truth", truth), ("pred", guess)]
            if with_error:
                block.append(("|error|", np.abs(guess - truth)))
            for label, tiles in block:
                rows.append((label if c == 1 else f"{label} c{ch}", tiles, top))
                top += sh + GAP
        top += SEQ_GAP
    image = np.full((top - SEQ_GAP, LABEL_W + cols * (sw + GAP) + GAP), 255, np.uint8)
    for _, tiles, y in rows:
        for k, tile in enumerate(tiles):
            x = LABEL_W + GAP + k * (sw + GAP)
            image[y:y + sh, x:x + sw] = np.kron(tile * 255 + 0.5, np.ones((scale, scale))).astype(np.uint8)
    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    for label, _, y in rows:
        draw.text((2, y + sh // 2 - 5), label, fill=0)
    return np.asarray(picture)


def write_png(path, image):
    """Write atomically: a temporary file in the same folder, then os.replace."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())


def write_bytes(path, payload):
    """Write atomically: the file is either the old one or the whole new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)                     # only left when the write failed


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints, RNG states, log, signals
# ----------------------------------------------------------------------------------------------------------------


def save_checkpoint(path, obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def rng_state():
    """Every RNG the run draws from, as plain Python values and CPU tensors (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    s = state["numpy"]
    np.random.set_state((s["kind"], np.array(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"], s["gauss"]))
    s = state["python"]
    random.setstate((s["version"], tuple(s["internal"]), s["gauss_next"]))


class CsvLog:
    """log.csv: a header, then one row per log line and per evaluation, flushed as written.

    keep_until_step=None starts a clean log (a new run); a step (--resume) keeps the complete rows up to the
    checkpoint's step and drops the rest, including a last line torn by a crash."""

    def __init__(self, path, keep_until_step=None):
        self.path = Path(path)
        rows = []
        if keep_until_step is not None and self.path.exists():
            text = self.path.read_text(errors="replace")
            if not text.endswith("\n"):
                text = text[:text.rfind("\n") + 1]       # a torn last line
            for row in csv.DictReader(io.StringIO(text)):
                complete = None not in row and None not in row.values() and row["kind"] in ("train", "eval")
                if complete and row["step"].isdigit() and int(row["step"]) <= keep_until_step:
                    rows.append(row)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, CSV_FIELDS, extrasaction="ignore")   # a column since removed: dropped
        writer.writeheader()
        writer.writerows(rows)
        write_bytes(self.path, buffer.getvalue().encode())
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, CSV_FIELDS)

    def write(self, **row):
        if "mse_per_frame" in row:
            row["mse_per_frame"] = " ".join(f"{v:.6g}" for v in row["mse_per_frame"])
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.file.flush()

    def close(self):
        self.file.close()


class StopSignal:
    """While active, SIGINT (Ctrl-C) and SIGTERM set `.requested` (the signal's name) instead of killing the run:
    the loop saves and exits between steps. A second signal exits at once, without saving. Handlers can only be
    installed in the main thread; elsewhere this does nothing."""

    def __init__(self):
        self.requested, self.number, self.previous = None, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame):
        if self.requested is not None:
            raise SystemExit(f"error: second {signal.Signals(number).name}: stopped at once, without saving")
        self.requested, self.number = signal.Signals(number).name, number


def worker_ignores_signals(worker_id):
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which saves and then shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------------------------
# Model, loss, schedule
# ----------------------------------------------------------------------------------------------------------------


def build_model(cfg, channels, image_size):
    common = dict(img_size=image_size, patch_size=cfg["patch_size"], in_chans=channels,
                  embed_dim=cfg["embed_dim"], drop_path_rate=cfg["drop_path"], cell_update=cfg["cell_update"])
    try:
        if cfg["model"] == "vmrnn-b":
            return VMRNN_B(depth=cfg["depths"][0], **common)
        d = cfg["depths"]
        return VMRNN_D(depths_down=tuple(d[:len(d) // 2]), depths_up=tuple(d[len(d) // 2:]), **common)
    except ValueError as e:                              # sizes that do not fit: one line, no traceback
        raise SystemExit(f"error: model config: {e}") from None


def compute_loss(pred, target, kind):
    """Mean over every next-frame prediction: MSE (paper) or MSE + L1 (the authors' Moving MNIST script)."""
    loss = F.mse_loss(pred, target)
    return loss + F.l1_loss(pred, target) if kind == "mse+l1" else loss


def learning_rate(epoch, cfg):
    """lr of 0-based `epoch`: constant, or timm's cosine with linear warm-up as OpenSTL steps it (per epoch).
    A pure function of (epoch, cfg): the optimiser's lr is set from it at every epoch, so --resume --lr X applies."""
    lr, warmup = cfg["lr"], cfg["warmup_epochs"]
    if cfg["schedule"] == "constant":
        return lr
    if epoch < warmup:
        return WARMUP_LR + epoch * (lr - WARMUP_LR) / warmup
    return MIN_LR + 0.5 * (lr - MIN_LR) * (1 + math.cos(math.pi * epoch / cfg["epochs"]))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def load_weights(model, ckpt, path):
    """Our checkpoint ({"model": ...}), an authors' file ({"state_dict": ...}), or a bare state dict of either.
    A mismatch is one line naming the first key that does not fit (and both shapes)."""
    state = ckpt.get("model", ckpt.get("state_dict", ckpt)) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"error: --ckpt {path} holds neither a train.py checkpoint nor a state dict (a dict of "
                         f"tensors); pass one of those")
    authors = any(k.removeprefix("module.").startswith(("ST.", "Downsample.", "Upsample.")) for k in state)
    try:
        if authors:
            load_official_state_dict(model, state)
            return "authors'"
        vmrnn.check_state_dict(model, state)
        model.load_state_dict(state)
        return "ours"
    except ValueError as e:
        reason = first_line(e).split("; check ")[0]      # vmrnn's hint names Python arguments; ours, flags
        raise SystemExit(f"error: --ckpt {path} does not fit this model: {reason}; pass the "
                         f"--model, --depths, --embed-dim, --patch-size it was trained with") from None


# ----------------------------------------------------------------------------------------------------------------
# The training step
# ----------------------------------------------------------------------------------------------------------------


def make_train_step(model, optimizer, scaler, ctx, cfg, t_in, t_out):
    """One optimiser step as a function: step(frames) -> the loss, a detached 0-d tensor.

    frames: (b, t_in + t_out, c, h, w) on the model's device. The step is rollout (model(frames[:, :t_in], t_out))
    -> loss against frames[:, 1:] -> zero_grad -> backward (scaled by the fp16 GradScaler) -> clip the gradient
    norm -> optimiser step -> scaler update. cfg: "loss", "grad_clip" (0 = off), "cuda_graphs" (optional). Used by
    train.py's loop and by bench.py; `step.path` says what ran: "eager", or "cuda graph" / "eager (capture failed)"
    once a graphed step has been called.

    cfg["cuda_graphs"] (opt-in; CUDA, one process, amp none or bf16, `ctx` built with cache_enabled=False): the
    first call runs 3 warm-up forward + backward passes of its batch on a side stream (no optimiser step, so the
    weights do not move), then captures forward + backward in a CUDA graph with a static input buffer; later calls
    copy the batch into that buffer and replay the graph, and clipping and the optimiser step run outside the graph
    on the gradients it wrote. A batch of another shape (a last partial batch) runs eagerly, without re-capture. A
    capture that raises is reported once on stderr and training continues eagerly.
    Note: the graph path is UNVERIFIED on a GPU (written in a session without one); only eager is tested.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    graph = static = static_loss = None

    def rollout_loss(frames):
        with ctx:
            pred = model(frames[:, :t_in], t_out)                 # (b, t_in - 1 + t_out, c, h, w)
        return compute_loss(pred.float(), frames[:, 1:], cfg["loss"])

    def update():                                                 # clip -> step -> scaler update, on p.grad
        if cfg["grad_clip"]:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()

    def eager(frames):
        loss = rollout_loss(frames)
        optimizer.zero_grad(set_to_none=graph is None)            # a captured graph owns the .grad tensors
        scaler.scale(loss).backward()
        update()
        return loss.detach()

    def capture(frames):
        nonlocal graph, static, static_loss
        static = frames.clone()                                   # the graph's input: copy each batch into it
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        rng = torch.random.fork_rng(devices=[static.device] if static.is_cuda else [])  # resume stays exact
        with torch.cuda.stream(side), rng:
            for _ in range(3):                                    # warm-up: lazy init, kernel choice, workspaces
                rollout_loss(static).backward()
        torch.cuda.current_stream().wait_stream(side)
        optimizer.zero_grad(set_to_none=True)                     # the captured backward allocates .grad
        new_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(new_graph, capture_error_mode="thread_local"):   # the loader's pinning thread runs on
            static_loss = rollout_loss(static)
            static_loss.backward()
        graph = new_graph

    def graphed(frames):
        nonlocal graph, static, static_loss
        if graphed.path == "not captured yet":
            try:
                capture(frames)
                graphed.path = "cuda graph"
            except Exception as e:                                # any capture failure: eager from now on
                graphed.path = "eager (capture failed)"
                graph = static = static_loss = None               # free a half-captured rollout's activations
                optimizer.zero_grad(set_to_none=True)
                print(f"warning: CUDA graph capture failed ({type(e).__name__}: {first_line(e)}); training "
                      f"eagerly", file=sys.stderr)
        if graph is None or frames.shape != static.shape:
            return eager(frames)
        static.copy_(frames)
        graph.replay()
        update()
        return static_loss.detach().clone()

    eager.path, graphed.path = "eager", "not captured yet"
    return graphed if cfg.get("cuda_graphs") else eager


def agree(loss, flags, ddp):
    """(loss averaged over ranks, each flag OR-ed over ranks) in one all_reduce, so that every rank sees a NaN,
    saves and stops at the same step. One process: (loss.item(), flags)."""
    if not ddp:
        return loss.item(), flags
    values = torch.cat([loss.float().reshape(1), torch.tensor(flags, dtype=torch.float32, device=loss.device)])
    dist.all_reduce(values)
    values = values.tolist()
    return values[0] / dist.get_world_size(), [v > 0 for v in values[1:]]


def format_progress(step, total, epoch, loss, lr, per_step, rate, eta_s, peak_gb):
    """One training line: step/total, loss, lr, s/step, sequences/s, peak GPU memory (CUDA), ETA of the run."""
    peak = "" if peak_gb is None else f"  peak {peak_gb:.2f} GB"
    eta = (f"{eta_s:.0f} s" if eta_s < 120 else f"{eta_s / 60:.1f} min" if eta_s < 7200 else
           f"{eta_s / 3600:.1f} h" if eta_s < 172800 else f"{eta_s / 86400:.1f} days")
    return (f"step {step}/{total}  epoch {epoch}  loss {loss:.6f}  lr {lr:.2e}  {per_step:.3f} s/step  "
            f"{rate:.1f} seq/s{peak}  eta {eta}")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, val, cfg, ctx, device, rank, world, stop=None, log=print):
    """Metrics on the last t_out frames of the first --val-samples sequences (sharded over ranks, all-reduced).
    Prints progress every --log-seconds; returns None if `stop` (a StopSignal) is requested midway."""
    model.eval()
    t_in, t_out = val.input_frames, val.output_frames
    n = len(val) if cfg["val_samples"] is None else min(cfg["val_samples"], len(val))
    loader = DataLoader(val, batch_size=cfg["batch_size"], sampler=list(range(rank, n, world)),
                        num_workers=cfg["num_workers"], pin_memory=device.type == "cuda",
                        worker_init_fn=worker_ignores_signals,
                        generator=torch.Generator().manual_seed(0))   # leaves the global RNG alone
    keys = ["mae", "mse", "psnr", "ssim", "ssim_dr1"]
    sums, count = {k: np.zeros(t_out) for k in keys}, 0
    start = last_line = time.time()
    for frames in loader:
        if stop is not None and stop.requested:
            model.train()
            return None
        frames = frames.to(device, non_blocking=True)
        with ctx:
            pred = model(frames[:, :t_in], t_out)[:, t_in - 1:]          # (b, t_out, c, h, w)
        batch = frame_metric_sums(pred.float().cpu().numpy(), frames[:, t_in:].cpu().numpy())
        sums = {k: sums[k] + batch[k] for k in keys}
        count += len(frames)
        if 0 < cfg["log_seconds"] <= time.time() - last_line:
            log(f"eval: {min(count * world, n)}/{n} sequences, {time.time() - start:.0f} s")
            last_line = time.time()
    total = torch.tensor(np.stack([sums[k] for k in keys] + [np.full(t_out, count)]), dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total)                          # gloo and NCCL both sum float64
    per_frame = dict(zip(keys, (total[:-1] / total[-1]).tolist()))     # each a list over the t_out frames
    metrics = {k: float(np.mean(v)) for k, v in per_frame.items()}
    metrics["mse_per_frame"] = per_frame["mse"]
    metrics["sequences"] = int(total[-1, 0])
    model.train()
    return metrics


@torch.no_grad()
def draw_samples(model, val, cfg, ctx, device):
    frames = torch.stack([val[i] for i in range(min(FIGURE_SEQUENCES, len(val)))]).to(device)
    t_in, t_out = val.input_frames, val.output_frames
    model.eval()
    with ctx:
        pred = model(frames[:, :t_in], t_out)[:, t_in - 1:]
    model.train()
    return sample_grid(frames.cpu().numpy(), pred.float().cpu().numpy(), t_in, with_error=cfg["data"] == "taxibj")


def format_metrics(m):
    return (f"MSE {m['mse']:.4f}  MAE {m['mae']:.4f}  SSIM {m['ssim']:.4f} (data_range=2, paper)  "
            f"{m['ssim_dr1']:.4f} (data_range=1)  PSNR {m['psnr']:.2f} dB  [{m['sequences']} sequences]")


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def train_batches(train, cfg, epoch, rank, world, skip, device):
    """Epoch `epoch`'s batches for this rank, a function of (seed, epoch) only, minus the first `skip`."""
    train.set_epoch(epoch)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"],
                                 drop_last=True)
    sampler.set_epoch(epoch)
    b = cfg["batch_size"]
    indices = list(sampler)
    indices = indices[:len(indices) // b * b][skip * b:]        # whole batches only
    generator = torch.Generator().manual_seed(cfg["seed"] * 100_003 + epoch)   # worker seeds, not global RNG
    return DataLoader(train, batch_size=b, sampler=indices, num_workers=cfg["num_workers"], drop_last=True,
                      pin_memory=device.type == "cuda", generator=generator, worker_init_fn=worker_ignores_signals)


def resume_command(cfg, world):
    launcher = ["python"] if world == 1 else ["torchrun", f"--nproc_per_node={world}"]
    return shlex.join(launcher + ["train.py", "--resume", "--out", cfg["out"], "--device", cfg["device"]])


def run(cfg, ckpt):
    # -- processes and devices, decided once ---------------------------------------------------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = torch.device(cfg["device"])
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
    if ddp and cfg["cuda_graphs"] and not cfg["eval_only"]:
        raise SystemExit("error: --cuda-graphs runs in one process only, not under torchrun; leave it out")
    master = rank == 0
    torch.set_num_threads(cfg["threads"])
    vmrnn.set_scan_compile(cfg["scan_compile"])        # torch.compile the selective scan only (auto: on CUDA)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["amp"]]
    ctx = nullcontext() if amp_dtype is None else \
        torch.autocast(device.type, dtype=amp_dtype, cache_enabled=not cfg["cuda_graphs"])
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16")
    log = partial(print, flush=True) if master else (lambda *a, **k: None)

    # -- data and model ------------------------------------------------------------------------------------------
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    options = {k: cfg[k] for k in ("input_frames", "output_frames", "image_size", "channels", "digits_file",
                                   "train_length") if cfg[k] is not None}
    try:
        train, val = build_datasets(cfg["data"], cfg["data_dir"], seed=cfg["seed"], download=not cfg["no_download"],
                                    **options)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    except ValueError as e:                             # an option that does not apply to this dataset
        raise SystemExit(f"error: --data {cfg['data']}: {e}") from None
    cfg["input_frames"], cfg["output_frames"] = train.input_frames, train.output_frames   # saved as used
    log(f"train: {train.describe()}\nval:   {val.describe()}")
    raw_model = build_model(cfg, train.channels, train.image_size).to(device)
    raw_model.checkpoint_steps = cfg["checkpoint_steps"]   # activation checkpointing per frame step
    log(f"model: {cfg['model']} depths {cfg['depths']} embed {cfg['embed_dim']} patch {cfg['patch_size']}, "
        f"{sum(p.numel() for p in raw_model.parameters()):,} parameters; device {device}, amp {cfg['amp']}, "
        f"{cfg['threads']} thread(s), {world} process(es)")
    out = Path(cfg["out"] or ".")

    if cfg["eval_only"]:
        kind = load_weights(raw_model.cpu(), ckpt, cfg["ckpt"])
        raw_model.to(device)
        metrics = evaluate(raw_model, val, cfg, ctx, device, rank, world, log=log)
        log(f"eval of {cfg['ckpt']} ({kind} weights): {format_metrics(metrics)}")
        if master and cfg["out"] is not None:
            out.mkdir(parents=True, exist_ok=True)
            write_png(out / "samples_eval.png", draw_samples(raw_model, val, cfg, ctx, device))
        return {"metrics": metrics, "step": None, "epoch": None, "out": str(out), "model": raw_model}

    optimizer = torch.optim.Adam(raw_model.parameters(), lr=cfg["lr"])
    step = epoch = batch_in_epoch = 0
    best_mse, metrics, elapsed, saved_at = math.inf, None, 0.0, None
    if ckpt is not None:                                # --resume
        path = out / "ckpt_last.pt"
        try:
            vmrnn.check_state_dict(raw_model, ckpt["model"])
        except ValueError as e:
            raise SystemExit(f"error: --resume: {path} does not fit the model its own config describes "
                             f"({first_line(e).split('; check ')[0]}); the file was replaced or edited: start a "
                             f"new run with another --out") from None
        try:
            raw_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt["scaler"] and scaler.is_enabled():   # empty when saved with fp16 off (--amp changed)
                scaler.load_state_dict(ckpt["scaler"])
            if ckpt["world_size"] == world:
                set_rng_state(ckpt["rng"][rank])
            else:
                log(f"warning: checkpoint from {ckpt['world_size']} process(es), now {world}: RNG states not "
                    f"restored")
        except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as e:
            raise SystemExit(f"error: --resume: {path} is damaged ({type(e).__name__}: {first_line(e)}); "
                             f"start a new run with another --out, or restore the file from a copy") from None
        step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        best_mse, metrics, elapsed, saved_at = ckpt["best_mse"], ckpt["metrics"], ckpt.get("elapsed_s", 0.0), step
        log(f"resumed {out} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    elif master:
        if (out / "log.csv").exists():
            log(f"note: {out} holds a log but no checkpoint (a run stopped before its first save): a clean log "
                f"starts")
        out.mkdir(parents=True, exist_ok=True)
    set_lr(optimizer, learning_rate(epoch, cfg))        # the schedule of the flags given now (--resume --lr X)
    if rank:
        torch.manual_seed(cfg["seed"] + rank)           # different drop-path draws per rank, same weights
    model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else raw_model
    csv_log = CsvLog(out / "log.csv", keep_until_step=step if ckpt is not None else None) if master else None

    def check_finite():
        """An update can blow the weights up at a finite loss: before a save, predict the last batch again (eval
        mode, no RNG drawn) and stop, keeping the previous checkpoint, if that is not finite."""
        with torch.no_grad(), ctx:
            raw_model.eval()
            probe, _ = agree(raw_model(last_frames[:, :t_in], t_out).float().sum(), [], ddp)
            raw_model.train()
        if not math.isfinite(probe):
            raise SystemExit(nan_message("the weights predict non-finite frames", step, epoch, cfg, out, saved_at,
                                         world))

    def save(name):
        nonlocal saved_at, last_save
        if last_frames is not None:
            check_finite()                              # never save a state that cannot continue
        states = [None] * world
        if ddp:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if master:
            config = {k: v for k, v in cfg.items() if k not in NOT_SAVED}
            save_checkpoint(out / name, {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step,
                "elapsed_s": time.time() - start, "best_mse": best_mse, "metrics": metrics, "rng": states,
                "world_size": world, "config": config})
        if name == "ckpt_last.pt":
            saved_at, last_save = step, time.time()

    def report(loss):
        """A training line on stdout and a row in log.csv; rates over the steps since the last line."""
        nonlocal tick, tick_step, seen
        now = time.time()
        lr, per_step, rate = optimizer.param_groups[0]["lr"], (now - tick) / (step - tick_step), seen / (now - tick)
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        log(format_progress(step, total_steps, epoch, loss, lr, per_step, rate, per_step * (total_steps - step), peak))
        csv_log.write(kind="train", step=step, epoch=epoch, time_s=now - start, lr=lr, loss=loss, seq_per_s=rate)
        tick, tick_step, seen = now, step, 0

    def stop_now():                                     # after a SIGINT/SIGTERM: save, one line, exit
        save("ckpt_last.pt")
        if master:
            print(f"stopped by {stop.requested or 'a signal'} at step {step}: saved {out / 'ckpt_last.pt'}; resume "
                  f"with: {resume_command(cfg, world)}", file=sys.stderr, flush=True)
        raise SystemExit(128 + (stop.number or signal.SIGTERM))

    def evaluate_and_save():
        nonlocal metrics, best_mse
        result = evaluate(raw_model, val, cfg, ctx, device, rank, world, stop=stop if world == 1 else None, log=log)
        if result is None:                              # a signal came during the evaluation
            stop_now()
        if not math.isfinite(result["mse"]):
            raise SystemExit(nan_message(f"the validation MSE is {result['mse']}", step, epoch, cfg, out, saved_at,
                                         world))
        metrics = result
        metrics["step"] = step
        trained_epoch = epoch - 1 if batch_in_epoch == 0 else epoch      # the epoch whose training this follows
        log(f"eval step {step} epoch {trained_epoch}: {format_metrics(metrics)}")
        is_best = metrics["mse"] < best_mse
        best_mse = min(best_mse, metrics["mse"])
        if master:
            csv_log.write(kind="eval", step=step, epoch=trained_epoch, time_s=time.time() - start,
                          **{k: metrics[k] for k in ("mse", "mae", "ssim", "ssim_dr1", "psnr", "mse_per_frame")})
            image = draw_samples(raw_model, val, cfg, ctx, device)
            write_png(out / "samples.png", image)
            if is_best:
                write_png(out / "samples_best.png", image)
        if is_best:
            save("ckpt_best.pt")
        save("ckpt_last.pt")

    # -- the loop: rollout -> loss -> step -> log -> evaluate -> save --------------------------------------------
    t_in, t_out = train.input_frames, train.output_frames
    steps_per_epoch = len(train) // world // cfg["batch_size"]
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train)} training sequences make no batch of {cfg['batch_size']} "
                         f"per process ({world} processes)")
    total_steps = cfg["epochs"] * steps_per_epoch
    if cfg["max_steps"] is not None:
        total_steps = min(total_steps, cfg["max_steps"])
    train_step = make_train_step(model, optimizer, scaler, ctx, cfg, t_in, t_out)
    start = time.time() - elapsed                       # time_s continues across resumes
    tick = last_save = time.time()
    first_step, tick_step, seen, evaluated_at = step, step, 0, None if metrics is None else metrics["step"]
    last_frames = None
    model.train()
    try:
        with StopSignal() as stop:
            while step < total_steps:
                for frames in train_batches(train, cfg, epoch, rank, world, batch_in_epoch, device):
                    last_frames = frames.to(device, non_blocking=True)     # (b, t_in + t_out, c, h, w)
                    loss = train_step(last_frames)                            # rollout -> loss -> Adam step
                    step, batch_in_epoch, seen = step + 1, batch_in_epoch + 1, seen + len(frames) * world
                    late = 0 < cfg["save_minutes"] * 60 <= time.time() - last_save
                    loss, (late, stopping) = agree(loss, [late, stop.requested is not None], ddp)
                    if not math.isfinite(loss):
                        raise SystemExit(nan_message(f"the training loss is {loss}", step, epoch, cfg, out,
                                                     saved_at, world))
                    if master and (step == first_step + 1 or step % cfg["log_every"] == 0
                                   or 0 < cfg["log_seconds"] <= time.time() - tick):
                        report(loss)                  # the first step, then every N steps or S seconds
                    if stopping:
                        stop_now()
                    if late or (cfg["save_every"] and step % cfg["save_every"] == 0):
                        save("ckpt_last.pt")
                    if step >= total_steps:
                        break
                if batch_in_epoch >= steps_per_epoch:   # the epoch is complete
                    epoch, batch_in_epoch = epoch + 1, 0
                    set_lr(optimizer, learning_rate(epoch, cfg))
                    if epoch % cfg["eval_every"] == 0 or epoch == cfg["epochs"]:
                        evaluate_and_save()
                        evaluated_at = step
                    else:
                        save("ckpt_last.pt")
                    tick, tick_step, seen = time.time(), step, 0      # throughput counts training only
            if evaluated_at != step:                    # stopped mid-epoch or between evaluations
                evaluate_and_save()
    finally:
        if csv_log is not None:
            csv_log.close()
    log(f"done: step {step}, epoch {epoch}, best val MSE {best_mse:.4f}; run folder {out}")
    return {"metrics": metrics, "step": step, "epoch": epoch, "best_mse": best_mse, "out": str(out),
            "model": raw_model}


def nan_message(problem, step, epoch, cfg, out, saved_at, world):
    """The one line printed when training diverged: where the last good state is, and the command to use."""
    lower = f"--lr {cfg['lr'] / 10:g} --grad-clip 1" + (" --amp none" if cfg["amp"] != "none" else "")
    head = f"error: {problem} at step {step} (epoch {epoch}); stopped without saving."
    if saved_at is None:
        return (f"{head} No checkpoint was saved yet: start again (the same --out is fine: the log starts afresh) "
                f"with a lower learning rate, e.g. {lower}")
    return (f"{head} {out / 'ckpt_last.pt'} holds step {saved_at}: continue from it with a lower learning rate: "
            f"{resume_command(cfg, world)} {lower}")


def main(argv=None):
    """Parse flags, train (or evaluate), return {"metrics", "step", "epoch", "best_mse", "out", "model"}."""
    threads = torch.get_num_threads()
    try:
        cfg, ckpt = parse_args(argv)
        return run(cfg, ckpt)
    except KeyboardInterrupt:                           # outside the training loop (data, model, --eval-only)
        print("error: interrupted outside the training loop (while preparing, or in --eval-only); checkpoints "
              "already in the run folder are intact", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        torch.set_num_threads(threads)                  # main() may be called again in the same process
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
