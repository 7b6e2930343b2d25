"""Datasets for VMRNN (Tang et al., CVPRW 2024): the paper's three benchmarks and an offline quick-start set.

build_datasets(name, data_dir, ...) -> (train, val): items float32 (t, c, h, w) in [0, 1], t = input_frames +
output_frames; every dataset has describe(), set_epoch(epoch), input_frames, output_frames, channels, image_size.

    name     train                                         val                                    item (t, c, h, w)
    mmnist   10,000 sequences generated afresh each epoch  mnist_test_seq.npy when present, else  (20, 1, 64, 64)
             from MNIST train digits 0..9999               3,000 generated from digits 10000..12999
    taxibj   OpenSTL's dataset.npz: X_train + Y_train      X_test + Y_test                        (8, 2, 32, 32)
    kth      OpenSTL's KTH frames: persons 01-16           persons 17-25                          (30, 1, 128, 128)
    shapes   800 squares/discs, no files, NOT a benchmark  100, a fixed seed                      (10, 1, 32, 32)

Files go in data_dir: MNIST's idx files (gzip or raw; also in MNIST/raw as torchvision keeps them, or moving_mnist/
with mnist_test_seq.npy as OpenSTL does) are downloaded if missing; TaxiBJ's dataset.npz (or taxibj/dataset.npz)
and KTH's ACTION folders (or kth/ACTION) come from OpenSTL's tools/prepare_data. Any problem with a file raises
DataError, one line naming the file, the problem and the fix.

On purpose unlike the authors' code (github.com/yyyujintang/VMRNN-PyTorch, after SwinLSTM and OpenSTL): Moving
MNIST uses per-(seed, stream, epoch) generators, not the global RNG, and a fixed generated validation set (theirs is
re-drawn at every evaluation); KTH frames are read per item, resized by scikit-image; TaxiBJ is clamped to [0, 1].
"""

import gzip
import hashlib
import http.client
import os
import re
import struct
import sys
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from skimage.draw import disk, rectangle
from skimage.transform import resize

IDX_HEADER_BYTES = 16          # big-endian uint32 magic, count, rows, cols
IDX_IMAGES_MAGIC = 2051        # idx3 of unsigned bytes (labels files have 2049)
GZIP_MAGIC = b"\x1f\x8b"
DIGIT_SIZE = 28                # MNIST digits are 28 x 28
CANVAS_SIZE = 64               # Moving MNIST canvas is 64 x 64
STEP_LENGTH = 0.1              # per-frame step, as a fraction of the free range CANVAS_SIZE - DIGIT_SIZE
NUM_DIGITS = 2
MMNIST_TRAIN_DIGITS, MMNIST_VAL_DIGITS = (0, 10_000), (10_000, 13_000)   # [start, stop) in the MNIST train file
MMNIST_EPOCH = 10_000                    # training sequences per epoch
DIGITS_FILE_VAL_FRACTION = 0.3           # digits_file=...: its last 30 % are the validation digits
VAL_SEED = 0                             # generated validation sets use this seed whatever the training seed
TRAIN_STREAM, VAL_STREAM = 0, 1          # second key of the random generator, so train and val never coincide

MNIST_TRAIN_FILE = "train-images-idx3-ubyte.gz"
MNIST_MD5 = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3"}
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",    # yann.lecun.com answers 403
                 "https://storage.googleapis.com/cvdf-datasets/mnist/")
MNIST_TEST_SEQ_FILE, MNIST_TEST_SEQ_FRAMES = "mnist_test_seq.npy", 20    # uint8 (20, 10000, 64, 64), time-major
MNIST_TEST_SEQ_PLACES = (MNIST_TEST_SEQ_FILE, "moving_mnist/" + MNIST_TEST_SEQ_FILE)   # under data_dir
MNIST_TEST_SEQ_URL = "http://www.cs.toronto.edu/~nitish/unsupervised_video/mnist_test_seq.npy"
MNIST_TEST_SEQ_MD5 = "be083ec986bfe91a449d63653c411eb2"
DOWNLOAD_TIMEOUT_S, DOWNLOAD_CHUNK = 30, 1 << 20

TAXIBJ_FILE, TAXIBJ_FRAME = "dataset.npz", (2, 32, 32)      # a frame is (inflow/outflow, h, w)
KTH_ACTIONS = ("boxing", "handclapping", "handwaving", "walking", "jogging", "running")
KTH_FAST_ACTIONS, KTH_FAST_STRIDE = ("jogging", "running"), 3   # OpenSTL's "category 2": a window every 3 frames
KTH_TRAIN_PERSONS, KTH_TEST_PERSONS = tuple(range(1, 17)), tuple(range(17, 26))
KTH_SIZE, SHAPES_SIZE = 128, 32          # KTH frames are resized to 128 x 128; shapes are small enough for a CPU

DEFAULTS = {   # build_datasets's options for each dataset and their defaults (the paper's, except for shapes)
    "mmnist": dict(input_frames=10, output_frames=10, image_size=CANVAS_SIZE, num_digits=NUM_DIGITS,
                   digits_file=None, fixed_val=None, train_length=MMNIST_EPOCH, val_length=None),
    "taxibj": dict(input_frames=4, output_frames=4),
    "kth": dict(input_frames=10, output_frames=20, image_size=KTH_SIZE),
    "shapes": dict(input_frames=5, output_frames=5, image_size=SHAPES_SIZE, channels=1, train_length=800,
                   val_length=100)}


class DataError(Exception):
    """A data file is missing, truncated, corrupt or could not be downloaded. The message is one line."""


class _Sequences(torch.utils.data.Dataset):
    """Shared: `length` items, their sizes, describe() and set_epoch(e): epoch e of data made afresh (resample)."""

    resample, epoch = False, 0

    def __init__(self, length, input_frames, output_frames, channels, image_size, about):
        self.length, self.about, self.channels, self.image_size = length, about, channels, image_size
        self.input_frames, self.output_frames, self.frames = input_frames, output_frames, input_frames + output_frames

    def set_epoch(self, epoch: int) -> None:
        if self.resample:
            self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def describe(self) -> str:
        return (f"{self.about}: {len(self):,} sequences of {self.input_frames}->{self.output_frames} frames, "
                f"{self.channels}x{self.image_size}x{self.image_size}")


def read_idx_images(path) -> np.ndarray:
    """MNIST idx3 images (gzip or raw, told apart by content) -> uint8 (n, 28, 28); DataError if malformed."""
    path, fix = Path(path), "replace it with a good copy (or delete it to download it again)"
    try:
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if raw[:2] == GZIP_MAGIC else raw
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({e}); {fix}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the MNIST idx file ({e.strerror}); check the path") from None
    if len(raw) < IDX_HEADER_BYTES:
        raise DataError(f"{path}: truncated idx file ({len(raw)} bytes, no {IDX_HEADER_BYTES}-byte header); {fix}")
    magic, count, rows, cols = struct.unpack(">4I", raw[:IDX_HEADER_BYTES])
    if (magic, rows, cols) != (IDX_IMAGES_MAGIC, DIGIT_SIZE, DIGIT_SIZE):
        raise DataError(f"{path}: not an idx file of MNIST digits (magic number {magic}, images {rows}x{cols}; "
                        f"expected {IDX_IMAGES_MAGIC}, {DIGIT_SIZE}x{DIGIT_SIZE}); {fix}")
    expected = IDX_HEADER_BYTES + count * rows * cols
    if len(raw) != expected:
        raise DataError(f"{path}: {'truncated' if len(raw) < expected else 'over-long'} idx file ({len(raw)} bytes, "
                        f"its header says {count} images = {expected} bytes); {fix}")
    return np.frombuffer(raw, np.uint8, offset=IDX_HEADER_BYTES).reshape(count, rows, cols)


def download_file(urls, dest, md5: str) -> Path:
    """Download `dest` from the first of `urls` that works: each try streams into dest.PID.part (ranks may download
    at once), renamed to dest once its md5 matches (a short transfer fails it), else deleted; else a DataError."""
    dest, urls = Path(dest), [urls] if isinstance(urls, str) else list(urls)
    part, failures = dest.with_name(f"{dest.name}.{os.getpid()}.part"), []
    dest.parent.mkdir(parents=True, exist_ok=True)
    for url in urls:
        print(f"downloading {url} -> {dest}", file=sys.stderr)
        digest = hashlib.md5()
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(part, "wb") as f:
                while chunk := response.read(DOWNLOAD_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                got = f"{f.tell():,} of {response.headers.get('Content-Length', '?')} bytes, md5 {digest.hexdigest()}"
            if digest.hexdigest() == md5:
                os.replace(part, dest)
                return dest
            failures.append(f"{url}: {got}, expected md5 {md5}")
        except (OSError, http.client.HTTPException) as e:      # URLError, HTTPError, timeouts, dropped connections
            failures.append(f"{url}: {e}")
        finally:
            part.unlink(missing_ok=True)                        # no resume: a later try starts from zero
    raise DataError(f"{dest.name}: download failed ({'; '.join(failures)}); fetch {urls[0]} yourself and place "
                    f"it at {dest} (md5 {md5})")


def _find_or_download(data_dir: Path, names, urls, md5: str, download_missing: bool) -> Path:
    found = next((data_dir / name for name in names if (data_dir / name).is_file()), None)
    if found is None and not download_missing:
        raise DataError(f"{data_dir / names[0]}: not found and downloads are off; fetch {urls[0]} and place it there")
    return found or download_file(urls, data_dir / names[0], md5)


def fetch_mnist(data_dir, name: str = MNIST_TRAIN_FILE, *, download_missing: bool = True, mirrors=None) -> Path:
    """Path of the MNIST idx file `name`, gzip or raw, in data_dir, data_dir/MNIST/raw (torchvision's cache) or
    data_dir/moving_mnist (OpenSTL); if missing, downloaded from `mirrors` in order (None: MNIST_MIRRORS)."""
    gz = name.removesuffix(".gz") + ".gz"
    names = [folder + n for folder in ("", "MNIST/raw/", "moving_mnist/") for n in (gz, gz.removesuffix(".gz"))]
    urls = [mirror + gz for mirror in (MNIST_MIRRORS if mirrors is None else mirrors)]
    return _find_or_download(Path(data_dir), names, urls, MNIST_MD5.get(gz, ""), download_missing)


def fetch_mnist_test_seq(data_dir, *, download_missing: bool = True, url: str = MNIST_TEST_SEQ_URL) -> Path:
    """Path of mnist_test_seq.npy in data_dir or data_dir/moving_mnist, downloaded (781 MiB) if missing."""
    return _find_or_download(Path(data_dir), MNIST_TEST_SEQ_PLACES, [url], MNIST_TEST_SEQ_MD5, download_missing)


def bouncing_trajectories(start: np.ndarray, theta: np.ndarray, frames: int, step: float = STEP_LENGTH):
    """The SwinLSTM/VMRNN motion rule: from start (..., 2) as (y, x) in [0, 1] with velocity (sin theta, cos theta)
    * step, each frame p += v, and a coordinate that reaches <= 0 or >= 1 is clamped to [0, 1] and its velocity
    negated. Returns (frames, ..., 2): the positions after steps 1..frames (the start is not a frame)."""
    velocity = step * np.stack([np.sin(theta), np.cos(theta)], axis=-1)   # (..., 2)
    position = np.array(start, dtype=np.float64)                          # (..., 2)
    out = np.empty((frames, *position.shape))                             # (t, ..., 2)
    for t in range(frames):
        position += velocity
        np.negative(velocity, out=velocity, where=(position <= 0.0) | (position >= 1.0))   # bounce ...
        out[t] = np.clip(position, 0.0, 1.0, out=position)                                  # ... off the wall
    return out


class MovingMNIST(_Sequences):
    """Moving MNIST generated on the fly, the SwinLSTM/VMRNN protocol: `num_digits` digits drawn uniformly (with
    replacement) from `digits` (uint8 (m, 28, 28)), each from a uniform start in [0, 1]^2 in a uniform direction,
    bouncing (bouncing_trajectories); top-left corner = trunc(position * (canvas - 28)); pixel-wise max, / 255.
    Epoch e's starts, directions and digits (in that order, for all `length` sequences) come from a generator seeded
    with (seed, stream, e), whatever the workers; resample=False keeps epoch 0. Item: float32 (t, 1, canvas, canvas)."""

    def __init__(self, digits: np.ndarray, *, length=MMNIST_EPOCH, input_frames=10, output_frames=10,
                 num_digits=NUM_DIGITS, canvas=CANVAS_SIZE, step=STEP_LENGTH, seed=0, stream=TRAIN_STREAM,
                 resample=True, source="given digits"):
        if canvas < DIGIT_SIZE or digits.ndim != 3 or digits.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE) or not len(digits):
            raise ValueError(f"need uint8 digits (m > 0, 28, 28) and a canvas >= 28, got {digits.shape}, {canvas}")
        self.digits, self.num_digits, self.canvas, self.step = digits, num_digits, canvas, step
        self.seed, self.stream, self.resample, self.plan_key = seed, stream, resample, None
        super().__init__(length, input_frames, output_frames, 1, canvas, f"Moving MNIST, {num_digits} digits, "
                         f"generated {'afresh each epoch' if resample else 'once'} with seed {seed} from {source}")

    def __getitem__(self, i: int) -> torch.Tensor:
        key = (self.seed, self.stream, self.epoch)
        if self.plan_key != key:          # draw the epoch's plan, once per process: digit (n, k), corner (n, t, k, 2)
            rng, nk = np.random.default_rng(key), (self.length, self.num_digits)
            start = rng.random((*nk, 2))                                      # (n, k, 2) as (y, x)
            theta = 2 * np.pi * rng.random(nk)                                # (n, k)
            digit = rng.integers(0, len(self.digits), nk)                     # (n, k)
            position = bouncing_trajectories(start, theta, self.frames, self.step)   # (t, n, k, 2)
            corner = (position * (self.canvas - DIGIT_SIZE)).astype(np.int16)        # top-left, truncated
            self.plan, self.plan_key = (digit, corner.transpose(1, 0, 2, 3)), key
        digit, corner = self.plan
        video = np.zeros((self.frames, self.canvas, self.canvas), np.uint8)       # (t, h, w)
        for frame, corners in zip(video, corner[i].tolist()):                     # IndexError past the end
            for j, (y, x) in zip(digit[i], corners):
                patch = frame[y:y + DIGIT_SIZE, x:x + DIGIT_SIZE]
                np.maximum(patch, self.digits[j], out=patch)                      # pixel-wise max compositing
        return torch.from_numpy(video).unsqueeze(1).float().div_(255)             # (t, 1, h, w)


class MovingMNISTFixed(_Sequences):
    """The paper's Moving MNIST test set mnist_test_seq.npy (Srivastava et al. 2015): uint8 (20, n, 64, 64),
    time-major, memory-mapped (workers re-open it, never copy it). Item: float32 (20, 1, 64, 64) in [0, 1]."""

    def __init__(self, path, *, input_frames: int = 10, output_frames: int = 10):
        if input_frames + output_frames != MNIST_TEST_SEQ_FRAMES:
            raise ValueError(f"{MNIST_TEST_SEQ_FILE} holds 20 frames, not {input_frames}+{output_frames}")
        self.path, fix = Path(path), f"delete it to download it again ({MNIST_TEST_SEQ_URL})"
        try:
            v = self.videos = np.lib.format.open_memmap(self.path, mode="r")     # (t, n, h, w)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{self.path}: not a readable .npy file or truncated ({e}); {fix}") from None
        if v.dtype != np.uint8 or v.shape[:1] + v.shape[2:] != (MNIST_TEST_SEQ_FRAMES, CANVAS_SIZE, CANVAS_SIZE):
            raise DataError(f"{self.path}: expected uint8 (20, n, 64, 64), found {v.dtype} {v.shape}; {fix}")
        super().__init__(v.shape[1], input_frames, output_frames, 1, CANVAS_SIZE,
                         f"Moving MNIST, fixed test set {self.path} (paper protocol)")

    def __getstate__(self):                  # what a spawned worker receives: the path, not the data
        return {**self.__dict__, "videos": None}

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.videos is None:
            self.videos = np.lib.format.open_memmap(self.path, mode="r")
        video = np.array(self.videos[:, i])                                       # (t, h, w) uint8
        return torch.from_numpy(video).unsqueeze(1).float().div_(255)             # (t, 1, h, w)


def _build_mmnist(data_dir: Path, *, input_frames, output_frames, image_size, num_digits, digits_file, fixed_val,
                  train_length, val_length, seed, download):
    """build_datasets("mmnist", ...): the paper protocol, or a digits_file split 70/30 (NOT the paper protocol)."""
    common = dict(input_frames=input_frames, output_frames=output_frames, num_digits=num_digits, canvas=image_size)
    fits = input_frames + output_frames == MNIST_TEST_SEQ_FRAMES and image_size == CANVAS_SIZE and num_digits == 2
    if fixed_val and (digits_file is not None or not fits):
        raise ValueError(f"fixed_val=True (mnist_test_seq.npy) needs the paper protocol: no digits_file, 20 frames, "
                         f"64x64, 2 digits (got {input_frames}+{output_frames}, {image_size}px, {num_digits} digits)")
    path = fetch_mnist(data_dir, download_missing=download) if digits_file is None else Path(digits_file)
    digits, fixed = read_idx_images(path), None
    if digits_file is not None:
        split = len(digits) - round(len(digits) * DIGITS_FILE_VAL_FRACTION)
        if not 0 < split < len(digits):
            raise DataError(f"{path}: {len(digits)} digits are too few to split into train and validation")
        (a, b), (c, d) = (0, split), (split, len(digits))
        note = val_note = "NOT the paper protocol: digits_file"
    elif len(digits) < MMNIST_VAL_DIGITS[1]:
        raise DataError(f"{path}: {len(digits)} digits, the paper protocol needs {MMNIST_VAL_DIGITS[1]:,} (train "
                        f"0..9999, validation 10000..12999); use the real {MNIST_TRAIN_FILE} or digits_file=")
    else:
        (a, b), (c, d), note = MMNIST_TRAIN_DIGITS, MMNIST_VAL_DIGITS, "paper protocol"
        if fixed_val:
            fixed = fetch_mnist_test_seq(data_dir, download_missing=download)
        elif fixed_val is None and fits:
            fixed = next((data_dir / p for p in MNIST_TEST_SEQ_PLACES if (data_dir / p).is_file()), None)
        why = "fixed_val=False" if fixed_val is False else "20 frames, 64x64, 2 digits only" if not fits else "absent"
        val_note = f"NOT the paper's fixed test set; {MNIST_TEST_SEQ_FILE}: {why}"
    train = MovingMNIST(digits[a:b], length=train_length, seed=seed, source=f"digits {a}..{b - 1} of {path} ({note})",
                        **common)
    if fixed is not None:
        return train, MovingMNISTFixed(fixed, input_frames=input_frames, output_frames=output_frames)
    return train, MovingMNIST(digits[c:d], length=d - c if val_length is None else val_length, seed=VAL_SEED,
                              stream=VAL_STREAM, resample=False, source=f"digits {c}..{d - 1} of {path} ({val_note})",
                              **common)


def read_taxibj(path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """X_{split}, Y_{split} of OpenSTL's TaxiBJ dataset.npz: each (n, t, 2, 32, 32) in [-1, 1]; DataError if not."""
    path = Path(path)
    layout = "expected OpenSTL's TaxiBJ .npz: X_train, Y_train, X_test, Y_test, each (n, 4, 2, 32, 32) in [-1, 1]"
    if not zipfile.is_zipfile(path):                                       # also False for a missing file
        problem = "not an .npz (zip) file, or truncated" if path.is_file() else "TaxiBJ file not found"
        raise DataError(f"{path}: {problem}; {layout} (OpenSTL's tools/prepare_data/download_taxibj.sh makes it)")
    try:
        with np.load(path) as npz:
            x, y = npz[f"X_{split}"], npz[f"Y_{split}"]
    except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:   # KeyError: no such key
        raise DataError(f"{path}: not a readable TaxiBJ .npz ({e}); {layout}") from None
    for key, a in ((f"X_{split}", x), (f"Y_{split}", y)):
        if a.ndim != 5 or a.shape[2:] != TAXIBJ_FRAME or len(a) == 0 or a.dtype.kind != "f":
            raise DataError(f"{path}: {key} is {a.dtype} {a.shape}, expected float (n, t, 2, 32, 32); {layout}")
        if a.min() < -1.001 or a.max() > 1.001:
            raise DataError(f"{path}: {key} has values in [{a.min():.3g}, {a.max():.3g}], {layout}")
    if len(x) != len(y):
        raise DataError(f"{path}: X_{split} has {len(x)} sequences but Y_{split} {len(y)}; {layout}")
    return x, y


class TaxiBJ(_Sequences):
    """TaxiBJ as OpenSTL (and the VMRNN code) reads it, split "train" or "test" (= validation): item i is the last
    input_frames of X[i] then the first output_frames of Y[i], x -> (x + 1) / 2 clamped to [0, 1]; (4+4, 2, 32, 32)."""

    def __init__(self, path, split: str, *, input_frames: int = 4, output_frames: int = 4):
        x, y = read_taxibj(path, split)
        if input_frames > x.shape[1] or output_frames > y.shape[1]:
            raise DataError(f"{path}: holds {x.shape[1]}+{y.shape[1]} frames, {input_frames}+{output_frames} asked for")
        self.x, self.y = x[:, x.shape[1] - input_frames:], y[:, :output_frames]
        super().__init__(len(x), input_frames, output_frames, *TAXIBJ_FRAME[:2], f"TaxiBJ {split}: {path} (OpenSTL)")

    def __getitem__(self, i: int) -> torch.Tensor:
        video = np.concatenate([self.x[i], self.y[i]])                            # (t, 2, 32, 32) in [-1, 1]
        return torch.from_numpy(video).float().add_(1).mul_(0.5).clamp_(0, 1)     # (t, 2, 32, 32) in [0, 1]


def kth_window_starts(frame_numbers, length: int, stride: int) -> list[int]:
    """OpenSTL's KTH windows in one folder, as start positions in its sorted frames: walking back from the last frame,
    a window ending at e counts if its frame numbers are consecutive, and then e moves back by `stride`, else by 1."""
    starts, e = [], len(frame_numbers) - 1
    while e >= length - 1:
        consecutive = frame_numbers[e] - frame_numbers[e - length + 1] == length - 1
        if consecutive:
            starts.append(e - length + 1)
        e -= stride if consecutive else 1
    return starts[::-1]


class KTH(_Sequences):
    """KTH actions in OpenSTL's layout root/ACTION/personPP_ACTION_dD_uncomp/image_NNNN.png (or .jpg), `persons` 01-16
    train, 17-25 test (= validation): windows of input_frames + output_frames consecutive frames of one folder, placed
    by kth_window_starts with stride = window length, 3 for jogging and running (OpenSTL). Frames are read per item:
    first channel, bilinear resize without anti-aliasing (like cv2.resize), / 255. Item: float32 (t, 1, size, size)."""

    def __init__(self, root, persons, *, input_frames=10, output_frames=20, image_size=KTH_SIZE, split=""):
        root, persons, length = Path(root), tuple(persons), input_frames + output_frames
        fix = "expected OpenSTL's ROOT/ACTION/personPP_ACTION_dD_uncomp/image_NNNN.png (download_kth.sh makes it)"
        missing = [a for a in KTH_ACTIONS if not (root / a).is_dir()]
        if missing:
            raise DataError(f"{root}: KTH action folders {missing} not found; {fix}")
        self.windows = []                                                  # tuples of `length` frame paths
        for action in KTH_ACTIONS:
            stride = KTH_FAST_STRIDE if action in KTH_FAST_ACTIONS else length
            for folder in sorted((root / action).glob("person[0-9][0-9]_*")):
                if not folder.is_dir() or int(folder.name[6:8]) not in persons:
                    continue
                matches = (re.fullmatch(r"image_(\d+)\.\w+", name) for name in os.listdir(folder))
                frames = sorted((int(m.group(1)), folder / m.group(0)) for m in matches if m)   # (number, path)
                for s in kth_window_starts([number for number, _ in frames], length, stride):
                    self.windows.append(tuple(path for _, path in frames[s:s + length]))
        if not self.windows:
            raise DataError(f"{root}: no {length}-frame windows of persons {persons[0]:02d}-{persons[-1]:02d}; {fix}")
        super().__init__(len(self.windows), input_frames, output_frames, 1, image_size,
                         f"KTH {split}: {root} (OpenSTL layout), persons {persons[0]:02d}-{persons[-1]:02d}")

    def _frame(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                gray = np.asarray(im) if im.mode == "L" else np.asarray(im.convert("RGB"))[..., 0]
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:   # PIL's ways to say corrupt
            raise DataError(f"{path}: unreadable KTH frame ({e}); replace it from the KTH dataset") from None
        size = (self.image_size, self.image_size)                                 # (h0, w0) -> (h, w), 0..255
        return resize(gray.astype(np.float32), size, order=1, mode="edge", anti_aliasing=False, preserve_range=True)

    def __getitem__(self, i: int) -> torch.Tensor:
        video = np.stack([self._frame(p) for p in self.windows[i]])               # (t, h, w), 0..255
        return torch.from_numpy(video).float().div_(255).clamp_(0, 1).unsqueeze(1)  # (t, 1, h, w)


class Shapes(_Sequences):
    """Bouncing squares and discs: a smoke-test and quick-start set that needs no files, NOT a benchmark. Each of
    `num_shapes` shapes (square or disc, side/diameter 1/5..2/5 of the canvas, a colour per channel in [0.5, 1])
    moves 1/16 of the canvas per frame in a random direction, reflecting off the edges; pixel-wise max on black.
    The generator is seeded with (seed, stream, epoch, index). Item: float32 (t, channels, size, size) in [0, 1]."""

    def __init__(self, length: int, *, input_frames=5, output_frames=5, image_size=SHAPES_SIZE, channels=1,
                 num_shapes=2, seed=0, stream=TRAIN_STREAM, resample=True):
        self.num_shapes, self.seed, self.stream, self.resample = num_shapes, seed, stream, resample
        super().__init__(length, input_frames, output_frames, channels, image_size, f"Shapes, {num_shapes} bouncing "
                         f"squares/discs, seed {seed}{' (new each epoch)' if resample else ''}; NOT a benchmark")

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} sequences")
        rng = np.random.default_rng((self.seed, self.stream, self.epoch, i))
        size = self.image_size
        video = np.zeros((self.frames, self.channels, size, size), np.float32)    # (t, c, h, w)
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
                wall = np.clip(centre, lo, hi)                                    # reflect off the edges:
                velocity = np.where(wall != centre, -velocity, velocity)
                centre = 2 * wall - centre                                        # = centre when inside
        return torch.from_numpy(video)


def build_datasets(name: str, data_dir, *, input_frames=None, output_frames=None, image_size=None, channels=None,
                   num_digits=None, digits_file=None, fixed_val=None, train_length=None, val_length=None, seed=0,
                   download=True):
    """(train, val) for `name` in DEFAULTS (see the module docstring); None takes DEFAULTS, an option the dataset
    does not take raises ValueError. mmnist: digits_file = train on this idx file, its last 30 % held out (NOT the
    paper protocol); fixed_val None: mnist_test_seq.npy if present, True: require it, False: generated validation."""
    if name not in DEFAULTS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DEFAULTS)}")
    given = {k: v for k, v in dict(input_frames=input_frames, output_frames=output_frames, image_size=image_size,
                                   channels=channels, num_digits=num_digits, digits_file=digits_file,
                                   fixed_val=fixed_val, train_length=train_length, val_length=val_length).items()
             if v is not None}
    wrong = sorted(set(given) - set(DEFAULTS[name]))
    if wrong:
        raise ValueError(f"option(s) {wrong} do not apply to dataset {name!r}")
    o, data_dir = {**DEFAULTS[name], **given}, Path(data_dir)
    frames = dict(input_frames=o["input_frames"], output_frames=o["output_frames"])

    if name == "mmnist":
        return _build_mmnist(data_dir, seed=seed, download=download, **o)
    if name == "taxibj":
        path = data_dir / "taxibj" / TAXIBJ_FILE
        path = data_dir / TAXIBJ_FILE if not path.exists() and (data_dir / TAXIBJ_FILE).exists() else path
        return TaxiBJ(path, "train", **frames), TaxiBJ(path, "test", **frames)
    if name == "kth":
        root = data_dir if (data_dir / KTH_ACTIONS[0]).is_dir() else data_dir / "kth"
        return (KTH(root, KTH_TRAIN_PERSONS, image_size=o["image_size"], split="train", **frames),
                KTH(root, KTH_TEST_PERSONS, image_size=o["image_size"], split="test", **frames))
    shape = dict(image_size=o["image_size"], channels=o["channels"], **frames)
    return (Shapes(o["train_length"], seed=seed, **shape),
            Shapes(o["val_length"], seed=VAL_SEED, stream=VAL_STREAM, resample=False, **shape))
