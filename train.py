"""Train and evaluate VMRNN (vmrnn.py) on Moving MNIST, KTH, TaxiBJ or the offline "shapes" toy set.

Quick start (CPU, offline, about 75 s on 2 cores; MNIST t10k digits instead of the train file; a tiny
VMRNN-D with patch 8 and 5->5 frames, NOT the paper's setting):

    python train.py --data mmnist --digits-file ../shared/data/t10k-images-idx3-ubyte.gz --device cpu \\
        --embed-dim 16 --depths 1 1 1 1 --patch-size 8 --input-frames 5 --output-frames 5 --batch-size 4 \\
        --lr 1e-3 --max-steps 400 --val-samples 64 --log-every 50 --num-workers 0 --out runs/quick

Paper runs (Table 1): `python train.py --data mmnist` (or kth, taxibj); several GPUs:
`torchrun --nproc_per_node=4 train.py --data taxibj` (DistributedDataParallel, --batch-size is per process).

Reading guide, top to bottom: defaults (the table below) -> command line -> metrics (small pure functions)
-> pictures -> checkpoints and log -> evaluate -> train -> main. One training step is
rollout (model(frames[:, :t_in], t_out), SPEC section 5) -> loss over all t_in-1+t_out next-frame predictions
against frames[:, 1:] -> Adam step -> log -> (at epoch ends) evaluate -> save.

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

Resume is at step granularity: ckpt_last.pt holds the epoch, the batch within it, and every RNG state (of every
rank); the data order of epoch e is a function of (seed, e), so `--resume` continues exactly where a run stopped
(after --max-steps, at an epoch end, or from the last save before a crash). Flags given with --resume override the
saved config (e.g. a larger --max-steps); everything else comes from the checkpoint.

Run folder (--out): ckpt_last.pt and ckpt_best.pt (best validation MSE); log.csv (one row per log step and per
evaluation); samples.png and samples_best.png (input / ground truth / prediction rows, plus |error| for TaxiBJ).
Checkpoints load with torch.load(path, weights_only=True): {"model", "optimizer", "scaler", "scheduler", "epoch",
"batch_in_epoch", "step", "best_mse", "metrics", "rng" (one dict per rank), "world_size", "config"}.
"""

import argparse
import csv
import io
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from skimage.metrics import structural_similarity
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

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
NOT_SAVED = ("resume", "eval_only", "ckpt", "device", "num_workers", "out")   # per-invocation flags

# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(description="Train or evaluate VMRNN. Unset options take the dataset's defaults "
                                            "(module docstring).")
    p.add_argument("--data", choices=sorted(PRESETS), help="dataset (required unless --resume)")
    p.add_argument("--data-dir", default="data", help="where the dataset files are (default: data)")
    p.add_argument("--digits-file", help="mmnist: train on this MNIST idx file (its last 30%% = validation); "
                                         "NOT the paper protocol")
    p.add_argument("--no-download", action="store_true", help="never download missing MNIST files")
    p.add_argument("--input-frames", type=int, help="frames the model sees (default: per dataset)")
    p.add_argument("--output-frames", type=int, help="frames it predicts (default: per dataset)")
    p.add_argument("--image-size", type=int, help="mmnist canvas, kth resize, shapes size")
    p.add_argument("--channels", type=int, help="shapes only: channels per frame (default 1)")
    p.add_argument("--train-length", type=int, help="mmnist/shapes: generated training sequences per epoch")
    p.add_argument("--model", choices=["vmrnn-b", "vmrnn-d"])
    p.add_argument("--depths", type=int, nargs="+", help="VMRNN-B: one int; VMRNN-D: down then up, e.g. 2 6 6 2")
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--cell-update", choices=["code", "paper"], default="code",
                   help="cell-state update: the authors' code (default) or the paper's Eq. (5)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps in total")
    p.add_argument("--batch-size", type=int, help="sequences per step and process")
    p.add_argument("--lr", type=float)
    p.add_argument("--schedule", choices=["constant", "cosine"])
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--loss", choices=["mse", "mse+l1"])
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (0 = off)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], help="autocast dtype (default: per dataset on "
                                                                   "CUDA, none on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--val-samples", type=int, help="evaluate on the first N validation sequences (default: all)")
    p.add_argument("--eval-every", type=int, help="evaluate every N epochs (and always at the end)")
    p.add_argument("--log-every", type=int, default=50, help="log every N steps")
    p.add_argument("--out", help="run folder (default: runs/DATA)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its ckpt_last.pt")
    p.add_argument("--eval-only", action="store_true", help="evaluate --ckpt on the validation set and stop")
    p.add_argument("--ckpt", help="checkpoint for --eval-only: ours, or the authors' state dict")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    return p


def parse_args(argv=None):
    """Flags -> (config dict of plain Python values, loaded checkpoint or None). Bad flags: parser.error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    ckpt = None
    if args.resume and args.eval_only:
        parser.error("--resume and --eval-only exclude each other")
    if args.resume:
        if args.out is None:
            parser.error("--resume needs --out, the folder of the run to continue")
        path = Path(args.out) / "ckpt_last.pt"
        if not path.is_file():
            parser.error(f"--resume: no checkpoint {path}")
        ckpt = load_checkpoint_file(path, parser)
    elif args.eval_only:
        if args.ckpt is None:
            parser.error("--eval-only needs --ckpt PATH")
        if not Path(args.ckpt).is_file():
            parser.error(f"--ckpt: no such file {args.ckpt}")
        ckpt = load_checkpoint_file(Path(args.ckpt), parser)
    elif args.ckpt is not None:
        parser.error("--ckpt goes with --eval-only (use --resume --out RUN to continue training)")
    if ckpt is not None and "model" in ckpt and "config" in ckpt:   # ours: its config fills what is not given
        parser.set_defaults(**{k: v for k, v in ckpt["config"].items() if k not in NOT_SAVED})
        args = parser.parse_args(argv)
    if args.data is None:
        parser.error("--data is required")
    cfg = vars(args)
    cfg["device"] = cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg["amp"] is None and not cfg["device"].startswith("cuda"):
        cfg["amp"] = "none"                             # autocast is a GPU speed-up; CPU runs in fp32
    for key, value in PRESETS[cfg["data"]].items():
        if cfg[key] is None:
            cfg[key] = value
    want = 1 if cfg["model"] == "vmrnn-b" else 4
    if len(cfg["depths"]) != want or min(cfg["depths"]) < 1:
        parser.error(f"--depths: {cfg['model']} takes {want} positive int(s) "
                     f"({'the blocks of its one cell' if want == 1 else 'down then up, e.g. 2 6 6 2'}), "
                     f"got {' '.join(map(str, cfg['depths']))}")
    for key in ("epochs", "batch_size", "embed_dim", "eval_every", "log_every", "max_steps", "val_samples",
                "input_frames", "output_frames", "train_length"):
        if cfg[key] is not None and cfg[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if cfg["lr"] <= 0 or cfg["grad_clip"] < 0 or cfg["warmup_epochs"] < 0 or cfg["num_workers"] < 0:
        parser.error("--lr must be > 0, and --grad-clip, --warmup-epochs, --num-workers >= 0")
    if cfg["digits_file"] is not None and cfg["data"] != "mmnist":
        parser.error("--digits-file applies to --data mmnist only")
    if not cfg["eval_only"]:
        cfg["out"] = cfg["out"] or f"runs/{cfg['data']}"
    return cfg, ckpt


def load_checkpoint_file(path, parser):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                              # pickle, zip or weights_only errors: one line
        parser.error(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}")


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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints, RNG states, log
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
    """log.csv: a header, then one row per log step and per evaluation, flushed as written."""

    def __init__(self, path, keep_until_step=None):
        self.path = Path(path)
        if keep_until_step is not None and self.path.exists():   # resume: drop rows after the checkpoint
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until_step]
            text = io.StringIO()
            writer = csv.DictWriter(text, CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
            write_bytes(self.path, text.getvalue().encode())
        new = not self.path.exists()
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, CSV_FIELDS)
        if new:
            self.writer.writeheader()
            self.file.flush()

    def write(self, **row):
        if "mse_per_frame" in row:
            row["mse_per_frame"] = " ".join(f"{v:.6g}" for v in row["mse_per_frame"])
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.file.flush()

    def close(self):
        self.file.close()


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
    """lr of 0-based `epoch`: constant, or timm's cosine with linear warm-up as OpenSTL steps it (per epoch)."""
    lr, warmup = cfg["lr"], cfg["warmup_epochs"]
    if cfg["schedule"] == "constant":
        return lr
    if epoch < warmup:
        return WARMUP_LR + epoch * (lr - WARMUP_LR) / warmup
    return MIN_LR + 0.5 * (lr - MIN_LR) * (1 + math.cos(math.pi * epoch / cfg["epochs"]))


def load_weights(model, ckpt):
    """Our checkpoint ({"model": ...}), an authors' file ({"state_dict": ...}), or a bare state dict of either."""
    state = ckpt.get("model", ckpt.get("state_dict", ckpt))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit("error: --ckpt holds neither our checkpoint nor a state dict")
    try:
        if set(state) == set(model.state_dict()):
            model.load_state_dict(state)
            return "ours"
        load_official_state_dict(model, state)
        return "authors'"
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: the checkpoint does not fit this model ({str(e).splitlines()[0]}); "
                         f"check --model, --depths, --embed-dim, --patch-size") from None


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, val, cfg, ctx, device, rank, world):
    """Metrics on the last t_out frames of the first --val-samples sequences (sharded over ranks, all-reduced)."""
    model.eval()
    t_in, t_out = val.input_frames, val.output_frames
    n = len(val) if cfg["val_samples"] is None else min(cfg["val_samples"], len(val))
    loader = DataLoader(val, batch_size=cfg["batch_size"], sampler=list(range(rank, n, world)),
                        num_workers=cfg["num_workers"], pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(0))   # leaves the global RNG alone
    keys = ["mae", "mse", "psnr", "ssim", "ssim_dr1"]
    sums, count = {k: np.zeros(t_out) for k in keys}, 0
    for frames in loader:
        frames = frames.to(device, non_blocking=True)
        with ctx:
            pred = model(frames[:, :t_in], t_out)[:, t_in - 1:]          # (b, t_out, c, h, w)
        batch = frame_metric_sums(pred.float().cpu().numpy(), frames[:, t_in:].cpu().numpy())
        sums = {k: sums[k] + batch[k] for k in keys}
        count += len(frames)
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


def train_batches(train, cfg, epoch, rank, world, skip):
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
                      pin_memory=cfg["device"].startswith("cuda"), generator=generator)


def run(cfg, ckpt):
    # -- processes and devices, decided once ---------------------------------------------------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        backend = "nccl" if cfg["device"].startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg["device"].startswith("cuda"):
            cfg["device"] = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(cfg["device"])
    else:
        rank, world = 0, 1
    master = rank == 0
    device = torch.device(cfg["device"])
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["amp"]]
    ctx = nullcontext() if amp_dtype is None else torch.autocast(device.type, dtype=amp_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16")
    log = print if master else (lambda *a, **k: None)

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
    log(f"train: {train.describe()}\nval:   {val.describe()}")
    raw_model = build_model(cfg, train.channels, train.image_size).to(device)
    log(f"model: {cfg['model']} depths {cfg['depths']} embed {cfg['embed_dim']} patch {cfg['patch_size']}, "
        f"{sum(p.numel() for p in raw_model.parameters()):,} parameters; device {device}, amp {cfg['amp']}, "
        f"{world} process(es)")
    out = Path(cfg["out"] or ".")

    if cfg["eval_only"]:
        kind = load_weights(raw_model.cpu(), ckpt)
        raw_model.to(device)
        metrics = evaluate(raw_model, val, cfg, ctx, device, rank, world)
        log(f"eval of {cfg['ckpt']} ({kind} weights): {format_metrics(metrics)}")
        if master and cfg["out"] is not None:
            out.mkdir(parents=True, exist_ok=True)
            write_png(out / "samples_eval.png", draw_samples(raw_model, val, cfg, ctx, device))
        return {"metrics": metrics, "step": None, "epoch": None, "out": str(out), "model": raw_model}

    optimizer = torch.optim.Adam(raw_model.parameters(), lr=cfg["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: learning_rate(e, cfg) / cfg["lr"])
    step = epoch = batch_in_epoch = 0
    best_mse, metrics = math.inf, None
    if ckpt is not None:                                # --resume
        try:
            raw_model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise SystemExit(f"error: {out / 'ckpt_last.pt'} does not fit the model "
                             f"({str(e).splitlines()[0]})") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        best_mse, metrics = ckpt["best_mse"], ckpt["metrics"]
        if ckpt["world_size"] == world:
            set_rng_state(ckpt["rng"][rank])
        else:
            log(f"warning: checkpoint from {ckpt['world_size']} process(es), now {world}: RNG states not restored")
        log(f"resumed {out} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    elif master:
        if (out / "ckpt_last.pt").exists():
            raise SystemExit(f"error: {out} already holds a run; pass --resume to continue it or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
    if rank:
        torch.manual_seed(cfg["seed"] + rank)           # different drop-path draws per rank, same weights
    eval_model = torch.compile(raw_model) if cfg["compile"] else raw_model     # evaluation needs no DDP
    model = DDP(eval_model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else eval_model
    csv_log = CsvLog(out / "log.csv", keep_until_step=step if ckpt is not None else None) if master else None

    def save(name):
        states = [None] * world
        if ddp:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if master:
            config = {k: v for k, v in cfg.items() if k not in NOT_SAVED}
            save_checkpoint(out / name, {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "step": step, "best_mse": best_mse, "metrics": metrics,
                "rng": states, "world_size": world, "config": config})

    def evaluate_and_save():
        nonlocal metrics, best_mse
        metrics = evaluate(eval_model, val, cfg, ctx, device, rank, world)
        metrics["step"] = step
        log(f"eval step {step} epoch {epoch}: {format_metrics(metrics)}")
        is_best = metrics["mse"] < best_mse
        best_mse = min(best_mse, metrics["mse"])
        if master:
            csv_log.write(kind="eval", step=step, epoch=epoch, time_s=time.time() - start,
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
    start = tick = time.time()
    first_step, seen, evaluated_at = step, 0, None if metrics is None else metrics["step"]
    model.train()
    try:
        while step < total_steps:
            for frames in train_batches(train, cfg, epoch, rank, world, skip=batch_in_epoch):
                frames = frames.to(device, non_blocking=True)                # (b, t_in + t_out, c, h, w)
                with ctx:
                    pred = model(frames[:, :t_in], t_out)                    # (b, t_in - 1 + t_out, c, h, w)
                loss = compute_loss(pred.float(), frames[:, 1:], cfg["loss"])
                reported = loss.detach().clone()
                if ddp:
                    dist.all_reduce(reported)                                # every rank sees a NaN anywhere
                    reported /= world
                if not math.isfinite(reported.item()):
                    raise SystemExit(f"error: the training loss is {reported.item()} at step {step + 1} (epoch "
                                     f"{epoch}); stopped. {out / 'ckpt_last.pt'} holds the last good state: try "
                                     f"a lower --lr, --grad-clip 1, or --amp none")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg["grad_clip"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"])
                scaler.step(optimizer)
                scaler.update()
                step, batch_in_epoch, seen = step + 1, batch_in_epoch + 1, seen + len(frames) * world

                if step % cfg["log_every"] == 0 and master:
                    now = time.time()
                    rate, eta = seen / (now - tick), (now - start) / (step - first_step) * (total_steps - step)
                    lr = optimizer.param_groups[0]["lr"]
                    print(f"step {step}/{total_steps}  epoch {epoch}  loss {reported.item():.6f}  lr {lr:.2e}  "
                          f"{rate:.1f} seq/s  eta {eta / 60:.1f} min")
                    csv_log.write(kind="train", step=step, epoch=epoch, time_s=now - start, lr=lr,
                                  loss=reported.item(), seq_per_s=rate)
                    tick, seen = now, 0
                if step >= total_steps:
                    break
            if batch_in_epoch >= steps_per_epoch:       # the epoch is complete
                epoch, batch_in_epoch = epoch + 1, 0
                scheduler.step()
                if epoch % cfg["eval_every"] == 0 or epoch == cfg["epochs"]:
                    evaluate_and_save()
                    evaluated_at, tick, seen = step, time.time(), 0     # throughput counts training only
                else:
                    save("ckpt_last.pt")
        if evaluated_at != step:                        # stopped mid-epoch or between evaluations
            evaluate_and_save()
    finally:
        if csv_log is not None:
            csv_log.close()
    log(f"done: step {step}, epoch {epoch}, best val MSE {best_mse:.4f}; run folder {out}")
    return {"metrics": metrics, "step": step, "epoch": epoch, "best_mse": best_mse, "out": str(out),
            "model": raw_model}


def main(argv=None):
    """Parse flags, train (or evaluate), return {"metrics", "step", "epoch", "best_mse", "out", "model"}."""
    cfg, ckpt = parse_args(argv)
    try:
        return run(cfg, ckpt)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
