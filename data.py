"""Datasets for VMRNN: the paper's three benchmarks and an offline toy set.

Reading guide
-------------
One entry point, used by train.py:

    train, val = build_datasets(name, data_dir, input_frames=None, output_frames=None, ..., download=True)

Both are torch Datasets whose items are float32 tensors (t, c, h, w) in [0, 1], t = input_frames + output_frames
(the model reads the first input_frames and predicts the rest). Each has describe() (one line: source file,
protocol, length), set_epoch(epoch) (a no-op except for generated training data) and the attributes
input_frames, output_frames, channels, image_size.

    name     train                                         val                                    item (t, c, h, w)
    mmnist   Moving MNIST, 10,000 sequences generated      mnist_test_seq.npy when present, else  (20, 1, 64, 64)
             afresh each epoch from MNIST train digits     3,000 generated from digits 10000..12999
             0..9999                                       with a fixed seed
    taxibj   TaxiBJ dataset.npz (OpenSTL), X_train+Y_train X_test + Y_test                        (8, 2, 32, 32)
    kth      KTH frames (OpenSTL layout), persons 01-16    persons 17-25                          (30, 1, 128, 128)
    shapes   bouncing squares and discs, no files:         the same, another seed                 (20, 1, 64, 64)
             a smoke-test set, NOT a benchmark

The protocols (SPEC.md section 7) are stated in each dataset's docstring; in file order:
  files      read_idx_images (MNIST idx parser), download_file (md5-verified, resumable), fetch_mnist,
             fetch_mnist_test_seq
  mmnist     bouncing_trajectories (the SwinLSTM motion rule), MovingMNIST, MovingMNISTFixed
  taxibj     read_taxibj, TaxiBJ
  kth        kth_window_starts (OpenSTL's window rule), KTH
  shapes     Shapes
  entry      build_datasets

Every problem with a file (missing, truncated, corrupt, wrong shape, failed download) raises DataError with one
line naming the file, the problem and the fix; train.py prints it without a traceback. Nothing is ever written
under a final file name until it is complete and verified (downloads go to NAME.part and are renamed).
Generated data depend only on (seed, epoch, index), never on the number of DataLoader workers.

Where this file differs from the reference code, on purpose: Moving MNIST randomness comes from per-epoch seeded
generators instead of the global RNG (reproducible, worker-independent), and the fallback validation set is fixed
(the authors' is re-drawn at every evaluation); KTH frames are read per item rather than all held in RAM and are
resized with scikit-image's bilinear resize instead of cv2's; TaxiBJ values are clamped to [0, 1] after mapping.
"""

import gzip
import hashlib
import http.client
import os
import re
import struct
import sys
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from skimage.draw import disk, rectangle
from skimage.transform import resize

# ---- constants ------------------------------------------------------------------------------------------------

IDX_HEADER_BYTES = 16          # big-endian uint32 magic, count, rows, cols
IDX_IMAGES_MAGIC = 2051        # idx3 of unsigned bytes (labels files have 2049)
GZIP_MAGIC = b"\x1f\x8b"
DIGIT_SIZE = 28                # MNIST digits are 28 x 28
CANVAS_SIZE = 64               # Moving MNIST canvas is 64 x 64
STEP_LENGTH = 0.1              # per-frame step, as a fraction of the free range CANVAS_SIZE - DIGIT_SIZE
NUM_DIGITS = 2
MMNIST_TRAIN_DIGITS = (0, 10_000)        # [start, stop) indices into the MNIST train file (SwinLSTM/VMRNN code)
MMNIST_VAL_DIGITS = (10_000, 13_000)
MMNIST_EPOCH = 10_000                    # training sequences per epoch
DIGITS_FILE_VAL_FRACTION = 0.3           # digits_file=...: its last 30 % are the validation digits
VAL_SEED = 0                             # generated validation sets use this seed whatever the training seed
TRAIN_STREAM, VAL_STREAM = 0, 1          # second key of the random generator, so train and val never coincide

MNIST_TRAIN_FILE = "train-images-idx3-ubyte.gz"
MNIST_MD5 = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3"}
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",    # yann.lecun.com answers 403
                 "https://storage.googleapis.com/cvdf-datasets/mnist/")
MNIST_TEST_SEQ_FILE = "mnist_test_seq.npy"
MNIST_TEST_SEQ_URL = "http://www.cs.toronto.edu/~nitish/unsupervised_video/mnist_test_seq.npy"
MNIST_TEST_SEQ_MD5 = "be083ec986bfe91a449d63653c411eb2"
MNIST_TEST_SEQ_FRAMES = 20               # the file is uint8 (20, 10000, 64, 64), time-major
DOWNLOAD_TIMEOUT_S = 30
DOWNLOAD_CHUNK = 1 << 20

TAXIBJ_FILE = "dataset.npz"
TAXIBJ_FRAME = (2, 32, 32)               # (inflow/outflow, h, w)

KTH_ACTIONS = ("boxing", "handclapping", "handwaving", "walking", "jogging", "running")
KTH_FAST_ACTIONS = ("jogging", "running")  # OpenSTL's "category 2": windows every 3 frames
KTH_FAST_STRIDE = 3
KTH_TRAIN_PERSONS = tuple(range(1, 17))
KTH_TEST_PERSONS = tuple(range(17, 26))
KTH_SIZE = 128

DEFAULT_FRAMES = {"mmnist": (10, 10), "taxibj": (4, 4), "kth": (10, 20), "shapes": (10, 10)}


class DataError(Exception):
    """A data file is missing, truncated, corrupt or could not be downloaded. The message is one line."""


class SequenceDataset(torch.utils.data.Dataset):
    """Base of every dataset here: items are float32 (t, c, h, w) in [0, 1]."""

    input_frames: int
    output_frames: int
    channels: int
    image_size: int

    def set_epoch(self, epoch: int) -> None:
        """Select the data of `epoch`; a no-op for data that do not change between epochs."""

    def describe(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.describe()


# ---- files: idx parser, downloads -----------------------------------------------------------------------------

def read_idx_images(path) -> np.ndarray:
    """MNIST idx3 images (gzip or raw, told apart by content) -> uint8 (n, 28, 28); DataError if malformed."""
    path = Path(path)
    fix = "replace it with a good copy (delete it and the download fetches it again)"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the MNIST idx file ({e.strerror}); check the path") from None
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip file ({e}); {fix}") from None
    if len(raw) < IDX_HEADER_BYTES:
        raise DataError(f"{path}: truncated idx file ({len(raw)} bytes, shorter than the "
                        f"{IDX_HEADER_BYTES}-byte header); {fix}")
    magic, count, rows, cols = struct.unpack(">4I", raw[:IDX_HEADER_BYTES])
    if magic != IDX_IMAGES_MAGIC:
        raise DataError(f"{path}: not an idx image file (magic number {magic}, expected {IDX_IMAGES_MAGIC}); "
                        f"pass an *-images-idx3-ubyte file, not a labels file; {fix}")
    if (rows, cols) != (DIGIT_SIZE, DIGIT_SIZE):
        raise DataError(f"{path}: images are {rows}x{cols}, expected {DIGIT_SIZE}x{DIGIT_SIZE} MNIST digits")
    expected = IDX_HEADER_BYTES + count * rows * cols
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "over-long"
        raise DataError(f"{path}: {problem} idx file (header says {count} images = {expected} bytes, "
                        f"found {len(raw)}); {fix}")
    return np.frombuffer(raw, np.uint8, offset=IDX_HEADER_BYTES).reshape(count, rows, cols)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(DOWNLOAD_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _Interrupted(Exception):
    """The server closed the connection before the announced length arrived."""


def _progress(part: Path, done: int, total: int | None, end: str) -> None:
    of = f" of {total / 2**20:.1f}" if total else ""
    print(f"  {part.name}: {done / 2**20:.1f}{of} MiB", end=end, file=sys.stderr, flush=True)


def _fetch(url: str, part: Path, timeout: float) -> None:
    """Append the rest of `url` to `part` (HTTP Range from its current size; from zero if Range is ignored)."""
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:        # nothing left to send: `part` may be complete, the md5 decides
            return
        raise
    with response:
        if start and response.status == 206:
            if not response.headers.get("Content-Range", "").startswith(f"bytes {start}-"):
                part.unlink()
                raise _Interrupted("server answered a different byte range; restarting from zero")
            mode = "ab"
        else:                              # 200: the server ignored Range (or there was none): restart
            mode, start = "wb", 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        done, shown = start, time.monotonic()
        tty = sys.stderr.isatty()
        with open(part, mode) as f:
            while chunk := response.read(DOWNLOAD_CHUNK):
                f.write(chunk)
                done += len(chunk)
                if time.monotonic() - shown > (0.5 if tty else 10):     # progress: in place on a terminal
                    shown = time.monotonic()
                    _progress(part, done, total, end="\r" if tty else "\n")
        _progress(part, done, total, end="\n")
    if total is not None and done < total:
        raise _Interrupted(f"connection closed after {done} of {total} bytes")


def download_file(urls, dest, md5: str, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download `dest` from the first of `urls` that works and verify its md5.

    Bytes go to dest.part (kept after an interruption, so the next call resumes it with HTTP Range); the file
    appears under its final name only when complete and verified. A part that fails the md5 is deleted and the
    next URL starts from zero. Progress goes to stderr. Raises DataError (one line: file, place, URL) if every
    URL fails."""
    dest = Path(dest)
    urls = [urls] if isinstance(urls, str) else list(urls)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        print(f"downloading {url} -> {dest}", file=sys.stderr)
        try:
            _fetch(url, part, timeout)
        except urllib.error.HTTPError as e:
            failures.append(f"{url}: HTTP {e.code}")
            continue
        except urllib.error.URLError as e:
            failures.append(f"{url}: {e.reason}")
            continue
        except (_Interrupted, http.client.HTTPException, OSError) as e:
            failures.append(f"{url}: {e}")
            continue
        got = _md5(part)
        if got == md5:
            os.replace(part, dest)
            return dest
        part.unlink()
        failures.append(f"{url}: md5 {got}, expected {md5}")
    resume = f"; run again to resume the partial download {part}" if part.exists() else ""
    raise DataError(f"{dest.name}: download failed ({'; '.join(failures)}){resume}; or fetch {urls[0]} "
                    f"yourself and place it at {dest} (md5 {md5})")


def _first_existing(data_dir: Path, candidates) -> Path | None:
    return next((data_dir / c for c in candidates if (data_dir / c).is_file()), None)


def fetch_mnist(data_dir, name: str = MNIST_TRAIN_FILE, *, download_missing: bool = True,
                mirrors=None) -> Path:
    """Path of the MNIST idx file `name` (e.g. train-images-idx3-ubyte.gz), downloading it if missing.

    Accepted where users already keep it: data_dir/NAME, data_dir/MNIST/raw/NAME (torchvision's cache),
    data_dir/moving_mnist/NAME (OpenSTL's layout), each gzip or raw. Files found are header-checked when read
    (read_idx_images); the md5 applies to what we download. mirrors=None means MNIST_MIRRORS."""
    data_dir = Path(data_dir)
    plain = name.removesuffix(".gz")
    found = _first_existing(data_dir, [f"{d}{n}" for d in ("", "MNIST/raw/", "moving_mnist/")
                                       for n in (plain + ".gz", plain)])
    if found is not None:
        return found
    urls = [m + plain + ".gz" for m in (MNIST_MIRRORS if mirrors is None else mirrors)]
    if not download_missing:
        raise DataError(f"{data_dir / (plain + '.gz')}: MNIST file not found and downloads are off; fetch "
                        f"{urls[0]} and place it there (gzip or raw idx)")
    return download_file(urls, data_dir / (plain + ".gz"), MNIST_MD5[plain + ".gz"])


def fetch_mnist_test_seq(data_dir, *, download_missing: bool = True, url: str | None = None) -> Path:
    """Path of the fixed Moving MNIST test set mnist_test_seq.npy (data_dir/ or data_dir/moving_mnist/),
    downloading it (about 781 MiB) if missing. url=None means MNIST_TEST_SEQ_URL."""
    data_dir = Path(data_dir)
    found = _first_existing(data_dir, [MNIST_TEST_SEQ_FILE, "moving_mnist/" + MNIST_TEST_SEQ_FILE])
    if found is not None:
        return found
    url = MNIST_TEST_SEQ_URL if url is None else url
    if not download_missing:
        raise DataError(f"{data_dir / MNIST_TEST_SEQ_FILE}: not found and downloads are off; fetch {url} "
                        f"(781 MiB) and place it there")
    return download_file([url], data_dir / MNIST_TEST_SEQ_FILE, MNIST_TEST_SEQ_MD5)


# ---- Moving MNIST (SwinLSTM/VMRNN protocol, SPEC section 7) ---------------------------------------------------

def bouncing_trajectories(start: np.ndarray, theta: np.ndarray, frames: int,
                          step: float = STEP_LENGTH) -> np.ndarray:
    """Positions in [0, 1]^2 of points bouncing in the unit square: the SwinLSTM/VMRNN motion rule.

    start (..., 2) as (y, x) in [0, 1]; theta (...) the direction, velocity (sin theta, cos theta) * step.
    Each frame: p += v; a coordinate that reaches <= 0 or >= 1 is clamped to [0, 1] and its velocity component
    negated. Returns (frames, ..., 2): the positions after steps 1..frames (as in the authors' code, the start
    itself is not a frame). Vectorised over all leading axes, e.g. every digit of an epoch at once."""
    velocity = step * np.stack([np.sin(theta), np.cos(theta)], axis=-1)   # (..., 2)
    position = np.array(start, dtype=np.float64)                          # (..., 2)
    out = np.empty((frames, *position.shape))                             # (t, ..., 2)
    for t in range(frames):
        position += velocity
        bounced = (position <= 0.0) | (position >= 1.0)
        np.clip(position, 0.0, 1.0, out=position)
        np.negative(velocity, out=velocity, where=bounced)
        out[t] = position
    return out


class Trajectories(NamedTuple):
    """Everything random about one epoch of Moving MNIST, drawn at once (n sequences, k digits each)."""
    start: np.ndarray    # (n, k, 2) float, (y, x) in [0, 1)
    theta: np.ndarray    # (n, k) float, direction in [0, 2 pi)
    digit: np.ndarray    # (n, k) int, index into the digit array
    corner: np.ndarray   # (n, t, k, 2) int16, top-left pixel (y, x) of each digit in each frame


class MovingMNIST(SequenceDataset):
    """Moving MNIST generated on the fly: the SwinLSTM/VMRNN protocol (SPEC section 7).

    Each sequence: `num_digits` digits drawn uniformly (with replacement) from `digits` (uint8 (m, 28, 28)),
    each at a uniformly random start in [0, 1]^2 with a uniformly random direction, moving STEP_LENGTH of the
    free range per frame and bouncing (bouncing_trajectories); top-left corners = trunc(position * (canvas - 28));
    digits composited with a pixel-wise max; values / 255. Item i: float32 (input_frames + output_frames, 1,
    canvas, canvas) in [0, 1].

    Randomness: everything of epoch e comes from one generator seeded with (seed, stream, e) and is drawn for all
    `length` sequences at once, so item i does not depend on the worker that builds it or the order of requests,
    and a resumed run sees the same data. resample=True (training): set_epoch(e) selects epoch e's sequences;
    resample=False (validation): always epoch 0, the same sequences every time. Call set_epoch before creating
    the epoch's DataLoader iterator; workers started with persistent_workers=True keep the epoch they were
    started with. `source` and `protocol` are only used by describe()."""

    def __init__(self, digits: np.ndarray, *, length: int = MMNIST_EPOCH, input_frames: int = 10,
                 output_frames: int = 10, num_digits: int = NUM_DIGITS, canvas: int = CANVAS_SIZE,
                 step: float = STEP_LENGTH, seed: int = 0, stream: int = TRAIN_STREAM, resample: bool = True,
                 source: str = "given digits", protocol: str = ""):
        if canvas < DIGIT_SIZE:
            raise ValueError(f"canvas {canvas} is smaller than a {DIGIT_SIZE}-pixel digit")
        if digits.ndim != 3 or digits.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE) or len(digits) == 0:
            raise ValueError(f"digits must be uint8 (m, {DIGIT_SIZE}, {DIGIT_SIZE}), m > 0; got {digits.shape}")
        self.digits = digits
        self.length, self.num_digits, self.canvas, self.step = length, num_digits, canvas, step
        self.input_frames, self.output_frames = input_frames, output_frames
        self.frames = input_frames + output_frames
        self.channels, self.image_size = 1, canvas
        self.seed, self.stream, self.resample = seed, stream, resample
        self.source, self.protocol = source, protocol
        self.epoch = 0
        self._plan: Trajectories | None = None    # drawn lazily, once per process and epoch
        self._plan_key: tuple | None = None

    def set_epoch(self, epoch: int) -> None:
        if self.resample:
            self.epoch = epoch

    @property
    def plan(self) -> Trajectories:
        """The current epoch's trajectories and digit choices (computed on first use in each process)."""
        key = (self.seed, self.stream, self.epoch)
        if self._plan_key != key:
            rng = np.random.default_rng(key)
            n, k = self.length, self.num_digits
            start = rng.random((n, k, 2))                                     # (n, k, 2)
            theta = 2 * np.pi * rng.random((n, k))                            # (n, k)
            digit = rng.integers(0, len(self.digits), (n, k))                 # (n, k)
            position = bouncing_trajectories(start, theta, self.frames, self.step)   # (t, n, k, 2)
            corner = (position * (self.canvas - DIGIT_SIZE)).astype(np.int16)        # truncation, (t, n, k, 2)
            self._plan = Trajectories(start, theta, digit, corner.transpose(1, 0, 2, 3))  # corner (n, t, k, 2)
            self._plan_key = key
        return self._plan

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} sequences")
        plan = self.plan
        digits = [self.digits[j] for j in plan.digit[i]]
        video = np.zeros((self.frames, self.canvas, self.canvas), np.uint8)       # (t, h, w)
        for frame, corners in zip(video, plan.corner[i].tolist()):
            for digit, (y, x) in zip(digits, corners):
                patch = frame[y:y + DIGIT_SIZE, x:x + DIGIT_SIZE]
                np.maximum(patch, digit, out=patch)                               # pixel-wise max compositing
        return torch.from_numpy(video).unsqueeze(1).float().div_(255)             # (t, 1, h, w)

    def describe(self) -> str:
        how = f"generated afresh each epoch (seed {self.seed})" if self.resample else \
            f"generated once with fixed seed {self.seed}"
        return (f"Moving MNIST: {self.length:,} sequences {how} from {self.source}; {self.num_digits} digits on "
                f"{self.canvas}x{self.canvas}, {self.input_frames}->{self.output_frames} frames; {self.protocol}")


class MovingMNISTFixed(SequenceDataset):
    """The fixed Moving MNIST test set mnist_test_seq.npy (Srivastava et al. 2015), the paper's test set.

    uint8 (20, n, 64, 64), time-major, memory-mapped (about 781 MiB). Item i: float32 (20, 1, 64, 64) in [0, 1],
    frames 0..input_frames-1 as input, the rest as target."""

    def __init__(self, path, *, input_frames: int = 10, output_frames: int = 10):
        self.path = Path(path)
        if input_frames + output_frames != MNIST_TEST_SEQ_FRAMES:
            raise ValueError(f"{MNIST_TEST_SEQ_FILE} holds {MNIST_TEST_SEQ_FRAMES} frames per sequence, "
                             f"not {input_frames}+{output_frames}")
        fix = f"delete it and run again to download it ({MNIST_TEST_SEQ_URL})"
        try:
            self.videos = np.load(self.path, mmap_mode="r")                      # (t, n, h, w)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{self.path}: not a readable .npy file or truncated ({e}); {fix}") from None
        v, shape = self.videos, (MNIST_TEST_SEQ_FRAMES, CANVAS_SIZE, CANVAS_SIZE)
        if not isinstance(v, np.ndarray) or v.dtype != np.uint8 or v.ndim != 4 or (v.shape[0], *v.shape[2:]) != shape:
            raise DataError(f"{self.path}: expected uint8 (20, n, 64, 64), found "
                            f"{getattr(v, 'dtype', '?')} {getattr(v, 'shape', '?')}; {fix}")
        self.input_frames, self.output_frames = input_frames, output_frames
        self.channels, self.image_size = 1, CANVAS_SIZE

        self.length = v.shape[1]

    def __getstate__(self):              # workers started by spawn/forkserver re-open the file, not copy it
        return {**self.__dict__, "videos": None}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.videos is None:
            self.videos = np.load(self.path, mmap_mode="r")
        video = np.array(self.videos[:, i])                                       # (t, h, w) uint8
        return torch.from_numpy(video).unsqueeze(1).float().div_(255)             # (t, 1, h, w)

    def describe(self) -> str:
        return (f"Moving MNIST: fixed test set {self.path}, {len(self):,} sequences, "
                f"{self.input_frames}->{self.output_frames} frames (paper protocol)")


def _build_mmnist(data_dir, *, input_frames, output_frames, image_size, num_digits, digits_file, fixed_val,
                  train_length, val_length, seed, download_missing):
    canvas = CANVAS_SIZE if image_size is None else image_size
    num_digits = NUM_DIGITS if num_digits is None else num_digits
    common = dict(input_frames=input_frames, output_frames=output_frames, num_digits=num_digits, canvas=canvas)
    if digits_file is not None:
        if fixed_val:
            raise ValueError("fixed_val=True (mnist_test_seq.npy) belongs to the paper protocol; "
                             "it does not combine with digits_file")
        path = Path(digits_file)
        digits = read_idx_images(path)
        n_val = round(len(digits) * DIGITS_FILE_VAL_FRACTION)
        if not 0 < n_val < len(digits):
            raise DataError(f"{path}: {len(digits)} digits are too few to split into train and validation")
        n_train = len(digits) - n_val
        note = "NOT the paper protocol (digits_file)"
        train_src, val_src = f"digits 0..{n_train - 1} of {path}", f"digits {n_train}..{len(digits) - 1} of {path}"
        train_digits, val_digits = digits[:n_train], digits[n_train:]
        fixed = None
    else:
        path = fetch_mnist(data_dir, MNIST_TRAIN_FILE, download_missing=download_missing)
        digits = read_idx_images(path)
        if len(digits) < MMNIST_VAL_DIGITS[1]:
            raise DataError(f"{path}: {len(digits)} digits, the protocol needs {MMNIST_VAL_DIGITS[1]:,} (digits "
                            f"0..12999 of the MNIST train file); use the real {MNIST_TRAIN_FILE} or digits_file=")
        (a, b), (c, d) = MMNIST_TRAIN_DIGITS, MMNIST_VAL_DIGITS
        note = "paper protocol"
        train_src, val_src = f"digits {a}..{b - 1} of {path}", f"digits {c}..{d - 1} of {path}"
        train_digits, val_digits = digits[a:b], digits[c:d]
        fits = input_frames + output_frames == MNIST_TEST_SEQ_FRAMES and canvas == CANVAS_SIZE and num_digits == 2
        if fixed_val and not fits:
            raise ValueError(f"fixed_val=True needs the fixed set's 20 frames, 64x64 canvas and 2 digits, not "
                             f"{input_frames}+{output_frames} frames, {canvas}x{canvas}, {num_digits} digits")
        if fixed_val:
            fixed = fetch_mnist_test_seq(data_dir, download_missing=download_missing)
        elif fixed_val is None and fits:
            fixed = _first_existing(Path(data_dir), [MNIST_TEST_SEQ_FILE, "moving_mnist/" + MNIST_TEST_SEQ_FILE])
        else:
            fixed = None
    train = MovingMNIST(train_digits, length=MMNIST_EPOCH if train_length is None else train_length, seed=seed,
                        stream=TRAIN_STREAM, resample=True, source=train_src, protocol=note, **common)
    if fixed is not None:
        return train, MovingMNISTFixed(fixed, input_frames=input_frames, output_frames=output_frames)
    if digits_file is None:
        why = ("fixed_val=False" if fixed_val is False else
               "frames/canvas/digits differ from it" if not fits else f"not found in {data_dir}")
        note = f"{MNIST_TEST_SEQ_FILE} not used ({why}): NOT the paper's fixed test set"
    val = MovingMNIST(val_digits, length=len(val_digits) if val_length is None else val_length, seed=VAL_SEED,
                      stream=VAL_STREAM, resample=False, source=val_src, protocol=note, **common)
    return train, val


# ---- TaxiBJ (OpenSTL format) ----------------------------------------------------------------------------------

def read_taxibj(path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """X_{split}, Y_{split} of OpenSTL's TaxiBJ dataset.npz: each (n, t, 2, 32, 32) in [-1, 1]; DataError if not."""
    path = Path(path)
    layout = "an .npz with X_train, Y_train, X_test, Y_test, each (n, 4, 2, 32, 32) scaled to [-1, 1]"
    if not path.is_file():
        raise DataError(f"{path}: TaxiBJ file not found; place OpenSTL's TaxiBJ dataset.npz there ({layout}; "
                        f"OpenSTL's tools/prepare_data/download_taxibj.sh fetches it)")
    try:
        npz = np.load(path)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: a single .npy array, expected {layout}")
        with npz:
            missing = [k for k in (f"X_{split}", f"Y_{split}") if k not in npz.files]
            if missing:
                raise DataError(f"{path}: keys {missing} missing (found {sorted(npz.files)}); expected {layout}")
            x, y = npz[f"X_{split}"], npz[f"Y_{split}"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: not a readable .npz file or truncated ({e}); expected {layout}") from None
    for key, a in ((f"X_{split}", x), (f"Y_{split}", y)):
        if a.ndim != 5 or a.shape[2:] != TAXIBJ_FRAME or len(a) == 0 or a.dtype.kind != "f":
            raise DataError(f"{path}: {key} is {a.dtype} {a.shape}, expected float (n, t, 2, 32, 32); "
                            f"expected {layout}")
        if a.min() < -1.001 or a.max() > 1.001:
            raise DataError(f"{path}: {key} has values in [{a.min():.3g}, {a.max():.3g}], expected [-1, 1] "
                            f"(OpenSTL's scaling); expected {layout}")
    if len(x) != len(y):
        raise DataError(f"{path}: X_{split} has {len(x)} sequences but Y_{split} {len(y)}; expected {layout}")
    return x, y


class TaxiBJ(SequenceDataset):
    """TaxiBJ crowd flows in OpenSTL's dataset.npz (SPEC section 7).

    Item i: concat(X[i], Y[i]) along time, mapped x -> (x + 1) / 2 (OpenSTL; clamped to [0, 1] against rounding):
    float32 (4 + 4, 2, 32, 32). Fewer frames may be asked for: the last input_frames of X, the first
    output_frames of Y. split: "train" (X_train, Y_train) or "test" (X_test, Y_test, the validation set)."""

    def __init__(self, path, split: str, *, input_frames: int = 4, output_frames: int = 4):
        self.path, self.split = Path(path), split
        x, y = read_taxibj(self.path, split)
        if input_frames > x.shape[1] or output_frames > y.shape[1]:
            raise DataError(f"{self.path}: holds {x.shape[1]}+{y.shape[1]} frames, "
                            f"{input_frames}+{output_frames} asked for")
        self.x, self.y = x[:, x.shape[1] - input_frames:], y[:, :output_frames]
        self.input_frames, self.output_frames = input_frames, output_frames
        self.channels, self.image_size = TAXIBJ_FRAME[0], TAXIBJ_FRAME[1]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        video = np.concatenate([self.x[i], self.y[i]])                            # (t, 2, 32, 32) in [-1, 1]
        return torch.from_numpy(video).float().add_(1).mul_(0.5).clamp_(0, 1)     # (t, 2, 32, 32) in [0, 1]

    def describe(self) -> str:
        return (f"TaxiBJ {self.split}: {self.path} (OpenSTL format), {len(self):,} sequences, "
                f"{self.input_frames}->{self.output_frames} frames of 2x32x32, (x+1)/2")


# ---- KTH (OpenSTL layout) -------------------------------------------------------------------------------------

def kth_window_starts(frame_numbers, length: int, stride: int) -> list[int]:
    """OpenSTL's KTH windows in one sequence folder: positions (into the sorted frames) where windows start.

    Walk back from the last frame: a window of `length` frames ending at e counts if its frame numbers are
    consecutive (no gap in the files); then e moves back by `stride` (OpenSTL: length, i.e. non-overlapping, for
    boxing/handclapping/handwaving/walking; 3 for jogging/running), otherwise by 1. OpenSTL applies this to its
    training and test sets alike."""
    starts, e = [], len(frame_numbers) - 1
    while e >= length - 1:
        s = e - length + 1
        if frame_numbers[e] - frame_numbers[s] == length - 1:
            starts.append(s)
            e -= stride
        else:
            e -= 1
    return starts[::-1]


_KTH_SEQUENCE = re.compile(r"person(\d\d)_")
_KTH_FRAME = re.compile(r"image_(\d+)\.\w+")


class KTH(SequenceDataset):
    """KTH human actions in OpenSTL's layout (SPEC section 7).

    root/ACTION/personPP_ACTION_dD_uncomp/image_NNNN.png (or .jpg) for the six ACTIONs in KTH_ACTIONS; persons
    01-16 train, 17-25 test (our validation set, as in OpenSTL, which has no separate one). Windows of
    input_frames + output_frames consecutive frames inside one folder, placed by kth_window_starts (stride = window
    length, 3 for jogging and running). Frames: first channel if colour (OpenSTL), resized bilinearly without
    anti-aliasing to image_size x image_size (like OpenSTL's cv2.resize), / 255. Files are read per item, so
    memory stays small (OpenSTL holds every frame in RAM). Item: float32 (t, 1, image_size, image_size)."""

    def __init__(self, root, persons, *, input_frames: int = 10, output_frames: int = 20,
                 image_size: int = KTH_SIZE, split: str = ""):
        self.root, self.persons, self.split = Path(root), tuple(persons), split
        self.input_frames, self.output_frames = input_frames, output_frames
        self.channels, self.image_size = 1, image_size
        length = input_frames + output_frames
        layout = ("expected OpenSTL's layout ROOT/ACTION/personPP_ACTION_dD_uncomp/image_NNNN.png for ACTION in "
                  f"{', '.join(KTH_ACTIONS)} (OpenSTL's tools/prepare_data/download_kth.sh builds it)")
        missing = [a for a in KTH_ACTIONS if not (self.root / a).is_dir()]
        if missing:
            raise DataError(f"{self.root}: KTH action folders {missing} not found; {layout}")
        self.windows: list[tuple[Path, ...]] = []
        for action in KTH_ACTIONS:
            stride = KTH_FAST_STRIDE if action in KTH_FAST_ACTIONS else length
            for folder in sorted((self.root / action).iterdir()):
                m = _KTH_SEQUENCE.match(folder.name)
                if not folder.is_dir() or m is None or int(m.group(1)) not in self.persons:
                    continue
                frames = sorted((int(m.group(1)), folder / m.group(0))                 # (frame number, path)
                                for m in map(_KTH_FRAME.fullmatch, os.listdir(folder)) if m)
                numbers = [number for number, _ in frames]
                for s in kth_window_starts(numbers, length, stride):
                    self.windows.append(tuple(path for _, path in frames[s:s + length]))
        if not self.windows:
            raise DataError(f"{self.root}: no {length}-frame windows of persons {self.persons[0]:02d}-"
                            f"{self.persons[-1]:02d} found; {layout}")

    def __len__(self) -> int:
        return len(self.windows)

    def _frame(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                gray = np.asarray(im) if im.mode == "L" else np.asarray(im.convert("RGB"))[..., 0]
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:   # PIL's ways to say corrupt
            raise DataError(f"{path}: unreadable KTH frame ({e}); replace it from the KTH dataset") from None
        gray = gray.astype(np.float32)                                             # (h0, w0), 0..255
        if gray.shape != (self.image_size, self.image_size):
            gray = resize(gray, (self.image_size, self.image_size), order=1, mode="edge",
                          anti_aliasing=False, preserve_range=True)
        return gray

    def __getitem__(self, i: int) -> torch.Tensor:
        video = np.stack([self._frame(p) for p in self.windows[i]])               # (t, h, w), 0..255
        return torch.from_numpy(video).float().div_(255).clamp_(0, 1).unsqueeze(1)  # (t, 1, h, w)

    def describe(self) -> str:
        return (f"KTH {self.split}: {self.root} (OpenSTL layout), persons {self.persons[0]:02d}-"
                f"{self.persons[-1]:02d}, {len(self):,} windows of {self.input_frames}->{self.output_frames} "
                f"frames (stride {self.input_frames + self.output_frames}, {KTH_FAST_STRIDE} for jogging/running), "
                f"gray {self.image_size}x{self.image_size}")


# ---- Shapes: offline synthetic data, not a benchmark ----------------------------------------------------------

class Shapes(SequenceDataset):
    """Bouncing squares and discs drawn with skimage.draw: needs no files. For smoke runs and tests only.

    Each sequence: `num_shapes` shapes (square or disc, side/diameter 1/5..2/5 of the canvas, a random colour per
    channel in [0.5, 1]) moving 1/16 of the canvas per frame in a random direction and reflecting off the edges;
    composited with a pixel-wise max on a black canvas. Random numbers come from a generator seeded with
    (seed, stream, epoch, index); resample=False keeps epoch 0. Item: float32 (t, channels, size, size) in [0, 1]."""

    def __init__(self, length: int, *, input_frames: int = 10, output_frames: int = 10, image_size: int = 64,
                 channels: int = 1, num_shapes: int = 2, seed: int = 0, stream: int = TRAIN_STREAM,
                 resample: bool = True):
        self.length, self.num_shapes = length, num_shapes
        self.input_frames, self.output_frames = input_frames, output_frames
        self.channels, self.image_size = channels, image_size
        self.seed, self.stream, self.resample, self.epoch = seed, stream, resample, 0

    def set_epoch(self, epoch: int) -> None:
        if self.resample:
            self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} sequences")
        rng = np.random.default_rng((self.seed, self.stream, self.epoch, i))
        size, frames = self.image_size, self.input_frames + self.output_frames
        video = np.zeros((frames, self.channels, size, size), np.float32)         # (t, c, h, w)
        for _ in range(self.num_shapes):
            half = rng.uniform(size / 10, size / 5)                               # half side / radius
            lo, hi = half, size - 1 - half                                        # centre stays in [lo, hi]
            centre = rng.uniform(lo, hi, 2)                                       # (y, x)
            angle = rng.uniform(0, 2 * np.pi)
            velocity = size / 16 * np.array([np.sin(angle), np.cos(angle)])
            colour = rng.uniform(0.5, 1.0, self.channels).astype(np.float32)[:, None]   # (c, 1)
            is_disc = rng.random() < 0.5
            for frame in video:
                if is_disc:
                    rr, cc = disk(centre, half, shape=(size, size))
                else:
                    rr, cc = rectangle(np.round(centre - half), extent=(round(2 * half),) * 2, shape=(size, size))
                    rr, cc = rr.ravel().astype(int), cc.ravel().astype(int)
                frame[:, rr, cc] = np.maximum(frame[:, rr, cc], colour)
                centre = centre + velocity
                for axis in range(2):                                             # reflect off the edges
                    if not lo <= centre[axis] <= hi:
                        centre[axis] = 2 * (lo if centre[axis] < lo else hi) - centre[axis]
                        velocity[axis] = -velocity[axis]
        return torch.from_numpy(video)

    def describe(self) -> str:
        how = f"seed {self.seed}, new each epoch" if self.resample else f"fixed seed {self.seed}"
        return (f"Shapes: {self.length:,} synthetic sequences of {self.num_shapes} bouncing squares/discs ({how}), "
                f"{self.channels}x{self.image_size}x{self.image_size}, {self.input_frames}->{self.output_frames} "
                f"frames; a smoke-test set, NOT a benchmark")


# ---- entry point ----------------------------------------------------------------------------------------------

def build_datasets(name: str, data_dir, *, input_frames: int | None = None, output_frames: int | None = None,
                   image_size: int | None = None, channels: int | None = None, num_digits: int | None = None,
                   digits_file=None, fixed_val: bool | None = None, train_length: int | None = None,
                   val_length: int | None = None, seed: int = 0, download: bool = True):
    """(train, val) datasets for `name` in {"mmnist", "taxibj", "kth", "shapes"}; items float32 (t, c, h, w) in [0, 1].

    None means the paper's default: frames mmnist 10+10, taxibj 4+4, kth 10+20 (shapes 10+10); image_size 64
    (mmnist canvas, shapes) or 128 (kth resize); taxibj is fixed at 2x32x32.
    Options that apply to one dataset only (setting them for another raises ValueError):
      mmnist   num_digits (2); digits_file: train from this idx file instead of the MNIST train file, its last 30 %
               held out for validation (NOT the paper protocol); fixed_val: None = mnist_test_seq.npy if present,
               True = require it (download if allowed), False = generated validation; train_length (10,000),
               val_length (3,000 = the held-out digits).
      shapes   channels (1), train_length (1,000), val_length (100).
    seed: training data of epoch e are a function of (seed, e); validation sets use VAL_SEED whatever the seed.
    download: fetch missing MNIST files (md5-checked); TaxiBJ and KTH must be placed by hand.
    Files: data_dir/train-images-idx3-ubyte.gz and mnist_test_seq.npy (mmnist), data_dir/taxibj/dataset.npz,
    data_dir/kth/ACTION/... (or data_dir itself holding dataset.npz or the action folders)."""
    if name not in DEFAULT_FRAMES:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DEFAULT_FRAMES)}")
    given = dict(channels=channels, num_digits=num_digits, digits_file=digits_file, fixed_val=fixed_val,
                 train_length=train_length, val_length=val_length, image_size=image_size)
    allowed = {"mmnist": {"num_digits", "digits_file", "fixed_val", "train_length", "val_length", "image_size"},
               "taxibj": set(), "kth": {"image_size"},
               "shapes": {"channels", "train_length", "val_length", "image_size"}}[name]
    wrong = sorted(k for k, v in given.items() if v is not None and k not in allowed)
    if wrong:
        raise ValueError(f"option(s) {wrong} do not apply to dataset {name!r}")
    t_in, t_out = DEFAULT_FRAMES[name]
    frames = dict(input_frames=t_in if input_frames is None else input_frames,
                  output_frames=t_out if output_frames is None else output_frames)
    data_dir = Path(data_dir)

    if name == "mmnist":
        return _build_mmnist(data_dir, image_size=image_size, num_digits=num_digits, digits_file=digits_file,
                             fixed_val=fixed_val, train_length=train_length, val_length=val_length, seed=seed,
                             download_missing=download, **frames)
    if name == "taxibj":
        path = data_dir / "taxibj" / TAXIBJ_FILE
        path = data_dir / TAXIBJ_FILE if not path.exists() and (data_dir / TAXIBJ_FILE).exists() else path
        return TaxiBJ(path, "train", **frames), TaxiBJ(path, "test", **frames)
    if name == "kth":
        root = data_dir if (data_dir / KTH_ACTIONS[0]).is_dir() else data_dir / "kth"
        size = KTH_SIZE if image_size is None else image_size
        return (KTH(root, KTH_TRAIN_PERSONS, image_size=size, split="train", **frames),
                KTH(root, KTH_TEST_PERSONS, image_size=size, split="test", **frames))
    shape = dict(image_size=64 if image_size is None else image_size, channels=1 if channels is None else channels)
    return (Shapes(1000 if train_length is None else train_length, seed=seed, stream=TRAIN_STREAM, resample=True,
                   **shape, **frames),
            Shapes(100 if val_length is None else val_length, seed=VAL_SEED, stream=VAL_STREAM, resample=False,
                   **shape, **frames))
