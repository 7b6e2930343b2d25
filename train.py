"""Train and evaluate VMRNN (vmrnn.py) on Moving MNIST, KTH, TaxiBJ or the offline toy set "shapes".

    python train.py --data shapes                          # offline quick start: a tiny model, a minute on a CPU
    python train.py --data mmnist --device cuda            # the paper's Moving MNIST run (Table 1)
    torchrun --nproc_per_node=4 train.py --data taxibj     # DistributedDataParallel; --batch-size per process
    python train.py --resume --out runs/mmnist [--lr 1e-5]  # continue exactly; the flags given apply
    python train.py --eval-only --ckpt FILE --data mmnist  # our checkpoint, or a state dict of the authors'

Options left out take the values saved in the checkpoint (--resume, --eval-only), else the defaults of --data
(P: the paper's Table 1, C: the authors' code; d_state 16, drop path 0.1, Adam):

    data    model    depths   width  patch  frames  lr        batch  epochs  loss      schedule             amp (CUDA)
    mmnist  VMRNN-D  2 6 6 2  128 P  2 P    10->10  5e-5 P,C  8 P,C  2000 P  MSE+L1 C  constant C           fp16 C
    kth     VMRNN-B  6 P      128 P  2 P    10->20  5e-4 P    2 P    100 P   MSE P,C   cosine, 5 warm-up C  none
    taxibj  VMRNN-B  12 P     128 P  4 P    4->4    4e-4 P,C  16 P,C 200 P,C MSE P,C   cosine, 5 warm-up C  none
    shapes  VMRNN-B  1        16     4      5->5    2e-3      8      3       MSE       constant             none

shapes (32x32, generated) is for trying things out, not a benchmark. KTH 10->40: --output-frames 40 --lr 1e-4
--batch-size 1. Cosine is timm's schedule stepped per epoch (OpenSTL). mmnist is evaluated every 5 epochs, the others
every epoch, every run at its end. The run folder (--out, default runs/DATA) holds ckpt_last.pt, log.csv, samples.png.
"""

import argparse
import csv
import gc
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import structural_similarity
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

import vmrnn
from data import DataError, build_datasets

OPENSTL = dict(model="vmrnn-b", embed_dim=128, loss="mse", schedule="cosine", warmup_epochs=5, amp="none",
               eval_every=1, num_workers=4)     # the authors' OpenSTL configs (kth, taxibj)
PRESETS = {                              # the table above
    "mmnist": dict(OPENSTL, model="vmrnn-d", depths=[2, 6, 6, 2], patch_size=2, lr=5e-5, batch_size=8, epochs=2000,
                   loss="mse+l1", schedule="constant", amp="fp16", eval_every=5),   # the authors' mmnist script
    "kth": dict(OPENSTL, depths=[6], patch_size=2, lr=5e-4, batch_size=2, epochs=100),
    "taxibj": dict(OPENSTL, depths=[12], patch_size=4, lr=4e-4, batch_size=16, epochs=200),
    "shapes": dict(OPENSTL, depths=[1], embed_dim=16, patch_size=4, lr=2e-3, batch_size=8, epochs=3,
                   schedule="constant", num_workers=0),    # 0: data made in this process, no competing workers
}
WARMUP_LR, MIN_LR = 1e-5, 1e-6          # OpenSTL's settings of timm's cosine schedule
DATA_FLAGS = ("digits_file", "image_size", "input_frames", "output_frames", "train_length")
FIXED_ON_RESUME = ("data", *DATA_FLAGS, "model", "depths", "embed_dim", "patch_size", "batch_size", "seed")
PER_INVOCATION = ("resume", "eval_only", "ckpt", "device", "out")     # never taken from a checkpoint
METRICS = ("mse", "mae", "ssim", "ssim_dr1", "psnr")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# Command line ------------------------------------------------------------------------------------------------------
def fail(message):
    """Every mistake ends here: one line on stderr, no traceback, exit status 1."""
    raise SystemExit(f"error: {message}")


class Parser(argparse.ArgumentParser):
    def error(self, message):                       # argparse's own errors too: one line, no usage block
        fail(f"{message} (python train.py -h lists every option)")


def number(kind, low, high=math.inf, above=False):
    """An argparse type: kind(text) in [low, high), or in (low, high) with above=True."""
    def parse(text):
        value = kind(text)
        if not (value > low if above else value >= low) or not value < high:
            raise argparse.ArgumentTypeError(f"{text} is out of range {'(' if above else '['}{low}, {high})")
        return value
    parse.__name__ = kind.__name__                  # argparse names it in "invalid int value"
    return parse


def build_parser():
    positive, per_data = number(int, 1), "(default: per --data)"
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--data", choices=sorted(PRESETS), help="dataset")
    add("--data-dir", type=os.path.abspath, default="data", help="dataset folder (default: %(default)s)")
    add("--digits-file", type=os.path.abspath, help="mmnist: digits of this idx file, 30%% held out (NOT the paper's)")
    add("--image-size", type=positive, help=f"mmnist canvas, kth resize, shapes size {per_data}")
    add("--input-frames", type=positive, help=f"frames the model sees {per_data}")
    add("--output-frames", type=positive, help=f"frames it predicts {per_data}")
    add("--train-length", type=positive, help="mmnist, shapes: generated training sequences per epoch")
    add("--model", choices=["vmrnn-b", "vmrnn-d"], help=per_data)
    add("--depths", type=positive, nargs="+", help=f"VMRNN-B: one number; VMRNN-D: down then up {per_data}")
    add("--embed-dim", type=positive, help=f"model width {per_data}")
    add("--patch-size", type=int, choices=[2, 4, 8], help=per_data)
    add("--drop-path", type=number(float, 0, 1), default=0.1, help="stochastic depth rate (default: %(default)s)")
    add("--epochs", type=positive, help=per_data)
    add("--max-steps", type=positive, help="stop after this many optimiser steps in all (default: none)")
    add("--batch-size", type=positive, help=f"sequences per step and process {per_data}")
    add("--lr", type=number(float, 0, above=True), help=f"peak learning rate {per_data}")
    add("--loss", choices=["mse", "mse+l1"], help=per_data)
    add("--grad-clip", type=number(float, 0), default=0.0, help="clip the gradient norm, 0 = off (default: 0)")
    add("--amp", choices=["none", "bf16", "fp16"], help="autocast (default: per --data on CUDA, none elsewhere)")
    add("--seed", type=int, default=0, help="weights, data order, drop path (default: %(default)s)")
    add("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    add("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile every SS2D")
    add("--checkpoint-steps", action=argparse.BooleanOptionalAction, default=False, help="less memory, more time")
    add("--num-workers", type=number(int, 0), help=f"data-loading processes {per_data}")
    add("--out", help="run folder (default: runs/DATA; runs/DATA-eval for --eval-only)")
    add("--resume", action="store_true", help="continue the run in --out from its ckpt_last.pt")
    add("--save-every", type=number(int, 0), default=500, help="save every N steps, 0 = off (default: %(default)s)")
    add("--save-minutes", type=number(float, 0), default=10.0, help="and every M minutes (default: %(default)s)")
    add("--log-every", type=positive, default=50, help="a progress line every N steps (default: %(default)s)")
    add("--val-samples", type=positive, help="evaluate on the first N validation sequences (default: all)")
    add("--eval-only", action="store_true", help="evaluate --ckpt and stop")
    add("--ckpt", help="for --eval-only: a checkpoint of train.py, or a state dict of the authors' code")
    return p


def parse_args(argv=None):
    """Flags -> (config dict, loaded checkpoint or None). A flag left out takes the value saved in the checkpoint
    (--resume, --eval-only of ours), else its dataset's default; --resume refuses to change FIXED_ON_RESUME."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and (args.eval_only or args.out is None):
        fail("--resume takes --out, the folder of the run to continue, and excludes --eval-only")
    if args.eval_only != (args.ckpt is not None):
        fail("--eval-only and --ckpt FILE go together (--resume --out RUN continues a training run)")
    ckpt, saved = None, {}
    if args.resume or args.eval_only:               # torch.load(weights_only=True) of a dict, or one line
        path = Path(args.out) / "ckpt_last.pt" if args.resume else Path(args.ckpt)
        fix = "is --out the run's folder?" if args.resume else "pass a checkpoint of train.py or the authors' weights"
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:                      # missing, empty, truncated, not torch.save's, Python objects
            why = "no such file" if not path.is_file() else "empty" if not path.stat().st_size else f"{e!r:.150}"
            fail(f"{path} is not a checkpoint torch.load can read ({why}); {fix}")
        if not isinstance(ckpt, dict):
            fail(f"{path} holds a {type(ckpt).__name__}, not a checkpoint; {fix}")
        if args.resume and "config" not in ckpt:
            fail(f"{path} holds weights only, no run of train.py: evaluate it with --eval-only --ckpt {path}")
        saved = {k: v for k, v in ckpt.get("config", {}).items() if k in vars(args) and k not in PER_INVOCATION}
    data = args.data or saved.get("data")
    if data is None:
        fail("--data is required")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    parser.set_defaults(**PRESETS[data] | saved)    # the run's own values, over the dataset's
    if not device.startswith("cuda") and parser.get_default("amp") == "fp16":
        parser.set_defaults(amp="none")             # fp16 with a gradient scaler is for CUDA: elsewhere, when typed
    cfg = vars(parser.parse_args(argv)) | {"device": device}
    for key in FIXED_ON_RESUME if args.resume else ():
        if cfg[key] != saved.get(key, cfg[key]):    # differs from the default it had: typed
            flag = "--" + key.replace("_", "-")
            fail(f"{flag} cannot change on --resume: the run in {args.out} has {saved[key]}, you gave {cfg[key]}; "
                 f"leave {flag} out to continue it, or start a new run with another --out")
    try:                                            # the device is there: checked before any data is built
        torch.empty(0, device=device)
    except Exception as e:
        fail(f"--device {device}: {e!r:.200}; use --device cpu")
    n_depths = len(cfg["depths"])
    if n_depths != 1 if cfg["model"] == "vmrnn-b" else n_depths % 2 == 1:
        fail(f"--depths: vmrnn-b takes one number, vmrnn-d an even count (down, then up: 2 6 6 2), not {cfg['depths']}")
    cfg["out"] = cfg["out"] or f"runs/{data}" + ("-eval" if args.eval_only else "")
    if not (args.resume or args.eval_only) and (Path(cfg["out"]) / "ckpt_last.pt").exists():
        fail(f"{cfg['out']} already holds a run: pass --resume to continue it, or choose another --out")
    return cfg, ckpt


# Compiling, schedule, metrics, files --------------------------------------------------------------------------------
def compile_ss2d(model, device):
    """--compile: torch.compile every SS2D (the scan is one custom op in it); where it cannot work, a warning."""
    try:
        torch.compile(torch.mul, fullgraph=True)(torch.ones(2, device=device), 2)
    except Exception as e:                          # no C++ compiler, no Triton, an old torch or device
        print(f"warning: --compile: torch.compile fails here ({e!r:.200}); running eagerly", file=sys.stderr)
        return
    for module in model.modules():
        if isinstance(module, vmrnn.SS2D):
            module.compile(fullgraph=True, dynamic=False)


def learning_rate(epoch, cfg):
    """The lr of 0-based `epoch`: constant, or timm's cosine with linear warm-up as OpenSTL steps it, per epoch.
    Set from (epoch, cfg) at every epoch, so that --resume --lr X changes the rest of the schedule."""
    lr, warmup = cfg["lr"], cfg["warmup_epochs"]
    if cfg["schedule"] == "constant":
        return lr
    if epoch < warmup:
        return WARMUP_LR + epoch * (lr - WARMUP_LR) / warmup
    return MIN_LR + 0.5 * (lr - MIN_LR) * (1 + math.cos(math.pi * epoch / cfg["epochs"]))


def frame_metrics(pred, target):
    """OpenSTL's metrics of pred, target (n, t, c, h, w) in [0, 1] -> {metric: (n, t)}: MSE and MAE summed over
    C*H*W, SSIM with data_range 2 ("ssim", as the published tables) and 1 ("ssim_dr1"), PSNR 10 log10(1 / MSE)."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    error = pred - target
    ssim = lambda data_range: np.array([[structural_similarity(t, p, data_range=data_range, channel_axis=0)
                                         for p, t in zip(ps, ts)] for ps, ts in zip(pred, target)])
    with np.errstate(divide="ignore"):              # a perfect frame has infinite PSNR
        psnr = -10 * np.log10((error ** 2).mean(axis=(2, 3, 4)))
    return {"mse": (error ** 2).sum(axis=(2, 3, 4)), "mae": np.abs(error).sum(axis=(2, 3, 4)),
            "ssim": ssim(2.0), "ssim_dr1": ssim(1.0), "psnr": psnr}


def atomic_write(path, write):
    """write(a temporary file), then rename it to path: path is the old file or the whole new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_samples(path, frames, pred, t_in, with_error=False):
    """frames (n, t_in + t_out, c, h, w), pred (n, t_out, c, h, w) -> a PNG: per sequence the rows input, truth,
    prediction (and |error|), each per channel, frames enlarged to at least 64 pixels, 2-pixel white gaps."""
    frames, pred = np.clip(frames, 0, 1), np.clip(pred, 0, 1)
    cols, rows = max(t_in, frames.shape[1] - t_in), []
    for seq, guess in zip(frames, pred):
        for part in [seq[:t_in], seq[t_in:], guess] + ([np.abs(guess - seq[t_in:])] if with_error else []):
            for tiles in part.transpose(1, 0, 2, 3):                        # one channel: (k, h, w)
                tiles = np.pad(tiles, ((0, cols - len(tiles)), (1, 1), (1, 1)), constant_values=1)
                rows.append(np.hstack(list(tiles)))                         # (h + 2, cols * (w + 2))
    scale = -(-64 // frames.shape[-2])
    image = Image.fromarray((np.kron(np.vstack(rows), np.ones((scale, scale))) * 255).round().astype(np.uint8))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


# Data, evaluation, checkpoints -------------------------------------------------------------------------------------
def quiet_worker(worker_id):
    """A DataLoader worker ignores SIGINT and SIGTERM sent to its process group: they are the main process's."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@torch.no_grad()
def evaluate(model, val, cfg, ctx, device, label="eval", rank=0, world=1):
    """Prints and returns the metrics of the last t_out frames of the first --val-samples validation sequences, per
    frame averaged over the sequences, then over the frames (under torchrun rank r scores every world-th sequence);
    writes 3 of them to samples.png. A partial batch is padded (not scored): a compiled model meets one size."""
    model.eval()
    t_in, t_out, b = val.input_frames, val.output_frames, cfg["batch_size"]
    n = min(cfg["val_samples"] or len(val), len(val))
    sums, first = torch.zeros(len(METRICS) + 1, t_out, dtype=torch.float64), None
    for frames in DataLoader(val, b, sampler=range(rank, n, world), num_workers=cfg["num_workers"],
                             worker_init_fn=quiet_worker):
        k = len(frames)
        padded = torch.cat([frames, frames[-1:].expand(b - k, *frames.shape[1:])]).to(device)
        with ctx:
            pred = model(padded[:, :t_in], t_out)[:k, t_in - 1:].float().cpu().numpy()   # (k, t_out, c, h, w)
        first = first or (frames[:3].numpy(), pred[:3])
        m = frame_metrics(pred, frames[:, t_in:].numpy())
        sums += torch.from_numpy(np.stack([m[key].sum(0) for key in METRICS] + [np.full(t_out, k)]))
    if world > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
    per_frame = (sums[:-1] / sums[-1]).tolist()                                   # each over the t_out frames
    model.train()
    m = {key: float(np.mean(v)) for key, v in zip(METRICS, per_frame)} | {"sequences": int(sums[-1, 0])}
    if rank == 0:
        print(f"{label}: MSE {m['mse']:.4f}  MAE {m['mae']:.4f}  SSIM {m['ssim']:.4f} (data_range 2, as published) "
              f"{m['ssim_dr1']:.4f} (data_range 1)  PSNR {m['psnr']:.2f} dB  [{m['sequences']} sequences]", flush=True)
        write_samples(Path(cfg["out"]) / "samples.png", *first, t_in, with_error=cfg["data"] == "taxibj")
    return m | {"mse_per_frame": per_frame[0]}


# The run -----------------------------------------------------------------------------------------------------------
def run(cfg, ckpt):
    ddp = "RANK" in os.environ                      # started by torchrun
    device = torch.device(cfg["device"])
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if device.type == "cuda" else device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    log = print if rank == 0 else lambda *args, **kwargs: None
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["amp"]]
    ctx = torch.autocast(device.type, dtype=amp, enabled=amp is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16")

    torch.manual_seed(cfg["seed"])                  # the same weights on every rank
    try:
        train, val = build_datasets(cfg["data"], cfg["data_dir"], seed=cfg["seed"],
                                    **{k: cfg[k] for k in DATA_FLAGS if cfg[k] is not None})
    except (DataError, ValueError) as e:            # ValueError: an option that does not apply to this dataset
        fail(f"--data {cfg['data']}: {e}")
    cfg["input_frames"], cfg["output_frames"] = t_in, t_out = train.input_frames, train.output_frames
    log(f"train: {train.describe()}\nval:   {val.describe()}")
    d, kw = cfg["depths"], dict(img_size=train.image_size, patch_size=cfg["patch_size"], in_chans=train.channels,
                                embed_dim=cfg["embed_dim"], drop_path_rate=cfg["drop_path"])
    try:
        model = (vmrnn.VMRNN_B(depth=d[0], **kw) if cfg["model"] == "vmrnn-b" else
                 vmrnn.VMRNN_D(depths_down=d[:len(d) // 2], depths_up=d[len(d) // 2:], **kw)).to(device)
    except ValueError as e:                         # sizes that do not fit each other
        fail(f"model: {e}")
    model.checkpoint_steps = cfg["checkpoint_steps"]
    log(f"model: {cfg['model']} depths {cfg['depths']} width {cfg['embed_dim']} patch {cfg['patch_size']}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; {device}, amp {cfg['amp']}, {world} process(es)")
    if cfg["compile"]:
        compile_ss2d(model, device)
    out = Path(cfg["out"])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    step = saved_step = 0                           # optimiser steps done; the step that ckpt_last.pt holds
    if ckpt is not None:                            # the weights (ours or the authors'); with --resume, the rest
        path, state = cfg["ckpt"] or f"{out}/ckpt_last.pt", ckpt.get("model", ckpt.get("state_dict", ckpt))
        try:
            vmrnn.load_official_state_dict(model, state)    # the authors' names are mapped, ours pass as they are
            if cfg["resume"]:
                optimizer.load_state_dict(ckpt["optimizer"])
                if ckpt["scaler"]:                  # empty when saved with fp16 off; ignored when it is off now
                    scaler.load_state_dict(ckpt["scaler"])
                step = saved_step = ckpt["step"]
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
            fix = "restore it from a copy" if cfg["resume"] else "pass the model's flags: --model, --depths, ..."
            fail(f"{path} does not fit this model ({type(e).__name__}: {str(e).split('; check ')[0][:200]}); {fix}")
    if cfg["eval_only"]:
        metrics = evaluate(model, val, cfg, ctx, device, f"eval of {cfg['ckpt']}", rank, world)
        return {"metrics": metrics, "model": model}
    steps_per_epoch = len(train) // (world * cfg["batch_size"])
    if steps_per_epoch == 0:
        fail(f"{len(train)} training sequences make no batch of {cfg['batch_size']} per process")
    total = min(cfg["epochs"] * steps_per_epoch, cfg["max_steps"] or math.inf)
    if step >= total:
        fail(f"the run in {out} has done its {total} steps: raise --epochs or --max-steps to train on")
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
    log_row = lambda row: None
    if rank == 0:                                   # log.csv: a row per progress line and per evaluation
        out.mkdir(parents=True, exist_ok=True)
        log_file = open(out / "log.csv", "a" if ckpt else "w", newline="", buffering=1)   # flushed line by line
        log_csv = csv.DictWriter(log_file, ("kind", "step", "epoch", "lr", "loss", "seq_per_s", *METRICS),
                                 extrasaction="ignore", lineterminator="\n")
        if log_file.tell() == 0:
            log_csv.writeheader()
        log_row = log_csv.writerow

    # The loop: rollout -> loss -> step -> log -> evaluate -> save. Epoch e is the steps e*E+1 .. (e+1)*E.
    resume = f"{'python' if world == 1 else f'torchrun --nproc_per_node={world}'} train.py --resume --out {out}"
    lower = f"--lr {cfg['lr'] / 10:g} --grad-clip 1" + (" --amp none" if cfg["amp"] != "none" else "")
    stop = []                                       # the signal that asked the run to stop

    def on_signal(signum, frame):                   # finish the step, save, exit; a second signal interrupts
        stop.append(signum)
        for s in STOP_SIGNALS:
            signal.signal(s, signal.default_int_handler)

    def diverged(problem):                          # one line: stopped without saving; how to go on
        how = f"{out}/ckpt_last.pt holds step {saved_step}: {resume}" if saved_step else "start again with"
        fail(f"{problem} at step {step}; stopped without saving. Lower the learning rate: {how} {lower}")

    handlers = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    tick = last_save = time.time()
    first_step = tick_step = step
    loss_sum = 0.0
    try:
        while step < total:
            epoch, done = divmod(step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(epoch, cfg)     # from the flags given now: --resume --lr X applies
            train.set_epoch(epoch)                  # the epoch's data and order: a function of (seed, epoch)
            sampler = DistributedSampler(train, world, rank, shuffle=True, seed=cfg["seed"], drop_last=True)
            sampler.set_epoch(epoch)
            b = cfg["batch_size"]
            for frames in DataLoader(train, b, sampler=list(sampler)[done * b:steps_per_epoch * b],
                                     num_workers=cfg["num_workers"], worker_init_fn=quiet_worker,
                                     pin_memory=device.type == "cuda"):
                frames = frames.to(device, non_blocking=True)           # (b, t_in + t_out, c, h, w)
                torch.manual_seed((cfg["seed"] * 1_000_003 + step) * world + rank)  # drop path, resumable
                with ctx:
                    pred = net(frames[:, :t_in], t_out).float()         # (b, t_in - 1 + t_out, c, h, w)
                loss = F.mse_loss(pred, frames[:, 1:])      # over every next-frame prediction
                if cfg["loss"] == "mse+l1":                 # the authors' Moving MNIST script
                    loss = loss + F.l1_loss(pred, frames[:, 1:])
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg["grad_clip"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
                scaler.step(optimizer)
                scaler.update()
                step, now = step + 1, time.time()
                loss, stopping = loss.item(), bool(stop)
                late = 0 < cfg["save_minutes"] * 60 <= now - last_save        # time for a timed save
                if ddp:                                 # every rank logs, saves and stops at the same step
                    agreed = torch.tensor([loss, late, stopping], device=device)
                    dist.all_reduce(agreed)
                    loss, late, stopping = agreed[0].item() / world, agreed[1].item() > 0, agreed[2].item() > 0
                if not math.isfinite(loss):
                    diverged(f"the training loss is {loss}")
                loss_sum += loss
                if step % cfg["log_every"] == 0 or step == first_step + 1:
                    per_step, lr = (now - tick) / (step - tick_step), optimizer.param_groups[0]["lr"]
                    row = dict(kind="train", step=step, epoch=epoch, lr=lr, loss=loss_sum / (step - tick_step),
                               seq_per_s=b * world / per_step)
                    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
                    log(f"step {step}/{total}  epoch {epoch}  loss {row['loss']:.6f}  lr {lr:.2e}  {per_step:.3f} "
                        f"s/step  {row['seq_per_s']:.1f} seq/s  eta {per_step * (total - step) / 60:.1f} min"
                        + (f"  peak {peak:.2f} GB" if peak else ""), flush=True)
                    log_row(row)
                    tick, tick_step, loss_sum = now, step, 0.0
                epoch_end, finished = step % steps_per_epoch == 0, step >= total
                if not stopping and (finished or epoch_end and (epoch + 1) % cfg["eval_every"] == 0):
                    metrics = evaluate(model, val, cfg, ctx, device, f"eval at step {step}", rank, world)
                    log_row(dict(kind="eval", step=step, epoch=epoch, **metrics))
                    tick += time.time() - now               # throughput counts training only
                if stopping or finished or epoch_end or late or cfg["save_every"] and step % cfg["save_every"] == 0:
                    if not all(torch.isfinite(p).all() for p in model.parameters()):   # never over a good one
                        diverged("the weights are not finite")
                    if rank == 0:
                        state = dict(step=step, model=model.state_dict(), optimizer=optimizer.state_dict(),
                                     scaler=scaler.state_dict(), config=cfg)
                        atomic_write(out / "ckpt_last.pt", lambda tmp: torch.save(state, tmp))
                    saved_step, last_save = step, time.time()
                if stopping:
                    signum = stop[0] if stop else signal.SIGTERM        # under torchrun, maybe another rank's
                    log(f"stopped by {signal.Signals(signum).name} at step {step}: saved {out}/ckpt_last.pt; "
                        f"resume with: {resume}", file=sys.stderr, flush=True)
                    raise SystemExit(128 + signum)
                if finished:
                    break
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if rank == 0:
            log_file.close()
    log(f"done: {step} steps; run folder {out}")
    return {"step": step, "metrics": metrics, "out": str(out), "model": model}


def main(argv=None):
    """Parse the flags, then train (or evaluate); returns the final position (or the metrics) and the model."""
    try:
        return run(*parse_args(argv))
    except KeyboardInterrupt:                       # a second signal, or one before the training loop
        raise SystemExit("error: interrupted; the checkpoints already in the run folder are intact") from None
    finally:
        if dist.is_initialized():
            gc.collect()    # DDP's reference cycles, freed while the group lives: at exit, gloo may abort (SIGABRT)
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
