"""Coreset quality on real data: does D2 beat the baselines at the same budget? (issue 8)

Protocol (the D2 paper's, scaled to a 2-core CPU):

1. Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (60k train, 10k test). A
   stratified validation split (5k) is carved out of the 60k train images; everything else (the
   *pool*, 55k) is what is pruned. Hyper-parameters are chosen on the validation split only; the
   test set is used for the final table only.
2. A small CNN (2 conv + 2 fc) is trained on the pool while per-sample training dynamics are
   recorded: forgetting events (Toneva et al.), EL2N at an early epoch (Paul et al.) and AUM
   (Pleiss et al.). Its penultimate layer gives the embeddings. Cached in ``benchmarks/cache/``
   under a hash of the settings.
3. The kNN graph is built per class with the project's own ``pipeline.core.ivf.sharded_knn_graph`` (exact
   ``flat`` index) and ``pipeline.core.d2.symmetrize_knn``; D2 runs per class with label-balanced
   budgets (``pipeline.core.selectors.balanced_budgets``), as the paper does on CIFAR.
4. Every coreset (random, score top-k, CCS, moderate, k-center greedy, D2) is selected through the
   project's API and a fresh CNN is trained on it with one recipe for all methods and rates: the
   same number of SGD steps (equal compute, as in the CCS/D2 training scripts, which fix the
   iteration count), evaluated on the 10k test images over several seeds.

Results per (method, rate, seed) are checkpointed to ``benchmarks/cache/<run hash>/results.jsonl``
so a killed run resumes where it stopped; a result whose coreset is not the one the method selects
today (its hash is in the record) is retrained.

Usage::

    python benchmarks/coreset_quality.py --quick                 # ~minutes: 10k pool, 1 seed, 2 rates
    python benchmarks/coreset_quality.py --json benchmarks/results/coreset_quality.json \\
        --md benchmarks/results/coreset_quality.md               # full run (~1 h on 2 cores)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import gzip
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, and in spawned workers
    sys.path.insert(0, str(REPO))

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = REPO / "benchmarks" / "cache"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
N_CLASSES = 10
# Fashion-MNIST pixel statistics (of the 60k train images, /255): inputs are standardised with them.
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530
# Bump when the dynamics / training code changes meaning, so stale caches are not reused.
CODE_VERSION = "1"


# ================================================================================================
# Settings
# ================================================================================================


@dataclass(frozen=True)
class Recipe:
    """The one training recipe used for the dynamics run and for every coreset."""

    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Gradient-norm clip: without it lr 0.1 can blow up on small, hard coresets (seen: a 1k-sample
    # D2 coreset spiked to loss 12.8 at step 40, killed the ReLUs and ended at chance, 10%).
    grad_clip: float = 2.0
    warmup_fraction: float = 0.05
    # Off: at this compute budget (hundreds of steps) augmentation slows convergence so much that
    # the full pool and a 10% random subset score nearly the same (measured: 87.1% vs 86.9% at 700
    # steps), which would hide any difference between coresets. Without it: 90.0% vs 87.1%.
    augment: bool = False  # when on: random 2-px shift + horizontal flip
    conv1: int = 16
    conv2: int = 32
    hidden: int = 128  # penultimate width = embedding dimension


@dataclass(frozen=True)
class Settings:
    mode: str
    pool_size: int | None  # None: every train image not in the validation split
    val_size: int
    split_seed: int
    dyn_epochs: int
    dyn_seeds: tuple[int, ...]
    el2n_epoch: int  # EL2N is measured after this many epochs (paper: early in training)
    train_steps: int  # SGD steps for every coreset, whatever its size (when train_epochs is None)
    seeds: tuple[int, ...]
    rates: tuple[float, ...]
    recipe: Recipe = field(default_factory=Recipe)
    # When set, every coreset is trained for this many epochs of itself instead of `train_steps`
    # (the paper's protocol: each coreset trained fully, so a smaller coreset gets fewer steps).
    train_epochs: int | None = None
    # ... and never fewer than this many steps: five epochs of a 10% coreset are 215 steps, a
    # quarter of what the 30% coreset gets, so "trained fully" would not hold for it.
    min_train_steps: int = 0
    # D2 sweep grid (chosen on the validation split, per pruning rate)
    d2_k_grid: tuple[int, ...] = (5, 10)
    d2_gamma_r_grid: tuple[float, ...] = (0.1, 1.0, 3.0)  # first stage uses the middle value
    # Forward kernel width. The paper fixes gamma_f = 1 in its raw feature distances; in our
    # dimensionless units (median kNN distance = 1) gamma_f = 1 makes the forward score follow the
    # node's *degree* (measured: corr 0.75 with degree, -0.25 with difficulty), gamma_f = 10 makes
    # it follow the difficulty more (class-mean corr 0.58; 100 switches the forward pass practically
    # off). So it is swept too.
    d2_gamma_f_grid: tuple[float, ...] = (1.0, 10.0, 100.0)  # 100: forward pass practically off
    d2_beta_grid: tuple[float, ...] = (0.0, 0.1, 0.3)
    d2_score_floor: float = 0.05  # added to [0,1]-scaled difficulty so that no node has score 0
    ccs_beta_grid: tuple[float, ...] = (0.0, 0.1, 0.3)
    ccs_strata: int = 50  # the CCS paper's number of strata
    difficulties: tuple[str, ...] = ("aum", "forgetting")  # D2 variants in the table
    # Where D2's chosen configuration loses to random on the validation split, one-change
    # ablations of it are trained there (2 seeds) to find out why; never on the test set.
    investigate: bool = True
    investigate_k: int = 20
    # gamma's distance unit: the median squared distance to this many nearest neighbours (fixed, so
    # widening the k grid does not rescale gamma)
    distance_unit_k: int = 10
    workers: int = 2
    threads_per_worker: int = 1

    def dynamics_key(self) -> dict[str, Any]:
        return {
            "v": CODE_VERSION,
            "pool_size": self.pool_size,
            "val_size": self.val_size,
            "split_seed": self.split_seed,
            "dyn_epochs": self.dyn_epochs,
            "dyn_seeds": list(self.dyn_seeds),
            "el2n_epoch": self.el2n_epoch,
            "recipe": dataclasses.asdict(self.recipe),
        }

    def run_key(self) -> dict[str, Any]:
        # Results depend on the dynamics (which define the scores) and on the training recipe.
        key = {"dyn": self.dynamics_key(), "train_steps": self.train_steps}
        if self.train_epochs is not None:
            key = {"dyn": self.dynamics_key(), "train_epochs": self.train_epochs, "min_train_steps": self.min_train_steps}
        return key

    def steps_for(self, n: int) -> int:
        """SGD steps for a training set of `n` samples."""
        if self.train_epochs is None:
            return self.train_steps
        return max(self.train_epochs * math.ceil(n / self.recipe.batch_size), self.min_train_steps)


def quick_settings() -> Settings:
    return Settings(
        mode="quick",
        pool_size=10_000,
        val_size=2_000,
        split_seed=0,
        dyn_epochs=3,
        dyn_seeds=(0,),
        el2n_epoch=1,
        train_steps=200,
        seeds=(0,),
        rates=(0.5, 0.9),
        d2_k_grid=(5,),
        d2_gamma_r_grid=(0.1, 1.0),
        d2_gamma_f_grid=(1.0, 10.0),
        investigate=False,
        d2_beta_grid=(0.0, 0.1),
        ccs_beta_grid=(0.0, 0.1),
        difficulties=("aum", "forgetting"),
    )


def full_settings() -> Settings:
    """The paper's protocol: every coreset trained for the same number of epochs of itself.

    Five epochs with the cosine schedule to zero (2,150 steps on the whole pool, against 400 in the
    first version of this benchmark, which under-trained every coreset), and at least 1,000 steps
    (the 70% and 90% pruned coresets: 645 and 215 steps at five epochs). k is searched at every rate
    up to 20. The grid is narrower than the quick mode's first sweep to fit a 2-core CPU: the
    difficulty is AUM (chosen at every rate in the 400-step run), gamma_f 1 or 10 (100, forward off,
    was never chosen), gamma_r 0.1 or 1, beta 0 or 0.1."""
    return Settings(
        mode="full",
        pool_size=None,
        val_size=5_000,
        split_seed=0,
        dyn_epochs=4,
        dyn_seeds=(0, 1),
        el2n_epoch=1,
        train_steps=0,
        train_epochs=5,
        min_train_steps=1000,
        seeds=(0, 1, 2),
        rates=(0.3, 0.5, 0.7, 0.9),
        d2_k_grid=(5, 10, 20),
        d2_gamma_r_grid=(0.1, 1.0),
        d2_gamma_f_grid=(1.0, 10.0),
        d2_beta_grid=(0.0, 0.1),
        ccs_beta_grid=(0.0, 0.1),
        difficulties=("aum",),
    )


def short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# ================================================================================================
# Data
# ================================================================================================


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format; gzipped or not) as a numpy array."""
    candidates = [path, path.with_name(path.name + ".gz")]
    src = next((p for p in candidates if p.exists()), None)
    if src is None:
        raise FileNotFoundError(
            f"{path}(.gz) not found: install the Debian package with "
            f"`apt-get install -y dataset-fashion-mnist` (files go to {DATA_DIR})"
        )
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rb") as f:
        raw = f.read()
    return parse_idx(raw, str(src))


def parse_idx(raw: bytes, name: str = "idx") -> np.ndarray:
    """Decode IDX bytes: magic (0, 0, dtype code, ndim), ndim big-endian uint32 sizes, data."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{name}: not an IDX file (bad magic {raw[:4].hex()})")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = raw[2], raw[3]
    if code not in dtypes:
        raise ValueError(f"{name}: unknown IDX dtype code 0x{code:02x}")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(dtypes[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{name}: header says {shape} ({expected} bytes) but the body has {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(root: Path = DATA_DIR) -> dict[str, np.ndarray]:
    data = {name: read_idx(root / fname) for name, fname in IDX_FILES.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(data[f"{split}_images"]), len(data[f"{split}_labels"])
        if n_img != n_lab:
            raise ValueError(f"{split}: {n_img} images but {n_lab} labels")
    return data


def standardise(images: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,1,28,28], standardised."""
    x = images.astype(np.float32) / 255.0
    return ((x - PIXEL_MEAN) / PIXEL_STD)[:, None, :, :]


def stratified_split(labels: np.ndarray, val_size: int, pool_size: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool ids, val ids), disjoint, both sorted, class proportions kept (largest remainder).

    The validation split takes `val_size` images; the pool takes `pool_size` of the rest (all of
    them when None).
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    want = val_size + (n - val_size if pool_size is None else pool_size)
    if val_size < 0 or want > n:
        raise ValueError(f"val_size={val_size} + pool_size={pool_size} exceed the {n} labelled samples")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)

    def shares(total: int) -> np.ndarray:
        exact = counts * (total / n)
        out = np.floor(exact).astype(np.int64)
        rest = total - int(out.sum())
        out[np.argsort(-(exact - out), kind="stable")[:rest]] += 1
        return out

    val_share, pool_share = shares(val_size), shares(want - val_size)
    val, pool = [], []
    for c, nv, npool in zip(classes, val_share, pool_share):
        ids = rng.permutation(np.flatnonzero(labels == c))
        val.append(ids[:nv])
        pool.append(ids[nv : nv + npool])
    return np.sort(np.concatenate(pool)), np.sort(np.concatenate(val))


# ================================================================================================
# Model and training (torch is imported lazily so the pure helpers import without it)
# ================================================================================================


def make_model(recipe: Recipe):
    import torch.nn as nn
    import torch.nn.functional as F

    class SmallCNN(nn.Module):
        """2 conv + 2 fc. ``features`` is the penultimate layer (the embedding)."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, recipe.conv1, 3, padding=1)
            self.conv2 = nn.Conv2d(recipe.conv1, recipe.conv2, 3, padding=1)
            self.fc1 = nn.Linear(recipe.conv2 * 7 * 7, recipe.hidden)
            self.fc2 = nn.Linear(recipe.hidden, N_CLASSES)

        def features(self, x):
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)
            return F.relu(self.fc1(x.flatten(1)))

        def forward(self, x):
            return self.fc2(self.features(x))

    return SmallCNN()


def augment(x, gen):
    """Random shift by up to 2 px (zero-padded in pixel space) and horizontal flip, per sample."""
    import torch

    b = x.shape[0]
    pad_value = (0.0 - PIXEL_MEAN) / PIXEL_STD  # a black pixel after standardisation
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=pad_value)
    oy = torch.randint(0, 5, (b,), generator=gen)
    ox = torch.randint(0, 5, (b,), generator=gen)
    ar = torch.arange(28)
    rows = (oy[:, None] + ar)[:, :, None]
    cols = (ox[:, None] + ar)[:, None, :]
    out = padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def lr_at(step: int, total: int, recipe: Recipe) -> float:
    """Linear warm-up then cosine decay to 0."""
    warm = max(1, int(round(recipe.warmup_fraction * total)))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * t))


def batch_plan(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`steps` batches of positions 0..n-1: epochs of fresh permutations, each cut into batches of
    `batch_size` (an epoch's last batch may be smaller, so every sample is seen once per epoch)."""
    if n <= 0:
        raise ValueError("cannot train on an empty set")
    out: list[np.ndarray] = []
    while len(out) < steps:
        perm = rng.permutation(n)
        for lo in range(0, n, batch_size):
            out.append(perm[lo : lo + batch_size])
            if len(out) == steps:
                break
    return out


def train(
    x,
    y,
    steps: int,
    seed: int,
    recipe: Recipe,
    on_batch: Callable[[np.ndarray, Any], None] | None = None,
    on_step: Callable[[int, Any], None] | None = None,
):
    """Train a fresh CNN on tensors (x, y) for `steps` SGD steps. `on_batch(positions, logits)` sees
    each batch's logits before its update (that is how forgetting and AUM are recorded);
    `on_step(steps_done, model)` runs after each update (in train mode; it may switch to eval
    temporarily)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = make_model(recipe)
    opt = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, nesterov=True, weight_decay=recipe.weight_decay
    )
    plan = batch_plan(x.shape[0], recipe.batch_size, steps, rng)
    model.train()
    for step, pos in enumerate(plan):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, recipe)
        idx = torch.from_numpy(pos)
        xb = x[idx]
        if recipe.augment:
            xb = augment(xb, gen)
        logits = model(xb)
        if on_batch is not None:
            on_batch(pos, logits.detach())
        loss = F.cross_entropy(logits, y[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training diverged: loss {float(loss)} at step {step} (seed {seed})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        if on_step is not None:
            on_step(step + 1, model)
    model.eval()
    return model


def predict(model, x, batch: int = 2000, features: bool = False) -> np.ndarray:
    import torch

    outs = []
    with torch.no_grad():
        for lo in range(0, x.shape[0], batch):
            xb = x[lo : lo + batch]
            outs.append((model.features(xb) if features else model(xb)).numpy())
    return np.concatenate(outs)


def accuracy(model, x, y) -> float:
    logits = predict(model, x)
    return float((logits.argmax(1) == y.numpy()).mean())


# ================================================================================================
# Training dynamics (pure accumulation, testable on synthetic logits)
# ================================================================================================


class DynamicsRecorder:
    """Per-sample forgetting events and AUM from each presentation's logits (one per epoch).

    Forgetting (Toneva et al. 2019): a forgetting event is a presentation classified wrongly after
    the previous presentation of the same sample was classified correctly. Samples never classified
    correctly are "never learned" and get ``max(forgetting) + 1`` (harder than any learned one).
    AUM (Pleiss et al. 2020): the mean over presentations of the assigned logit minus the largest
    other logit; low (negative) AUM = hard or mislabeled.
    """

    def __init__(self, labels: np.ndarray):
        self.labels = np.asarray(labels, dtype=np.int64)
        n = self.labels.shape[0]
        self.prev_correct = np.zeros(n, dtype=bool)
        self.ever_correct = np.zeros(n, dtype=bool)
        self.forget = np.zeros(n, dtype=np.int64)
        self.margin_sum = np.zeros(n, dtype=np.float64)
        self.seen = np.zeros(n, dtype=np.int64)

    def update(self, positions: np.ndarray, logits: np.ndarray) -> None:
        logits = np.asarray(logits, dtype=np.float64)
        lab = self.labels[positions]
        correct = logits.argmax(1) == lab
        self.forget[positions] += (self.prev_correct[positions] & ~correct).astype(np.int64)
        self.prev_correct[positions] = correct
        self.ever_correct[positions] |= correct
        assigned = logits[np.arange(len(positions)), lab]
        other = logits.copy()
        other[np.arange(len(positions)), lab] = -np.inf
        self.margin_sum[positions] += assigned - other.max(1)
        self.seen[positions] += 1

    def forgetting(self) -> np.ndarray:
        out = self.forget.astype(np.float64)
        learned_max = out[self.ever_correct].max() if self.ever_correct.any() else 0.0
        out[~self.ever_correct] = learned_max + 1.0
        return out

    def aum(self) -> np.ndarray:
        if (self.seen == 0).any():
            raise ValueError(f"{int((self.seen == 0).sum())} samples were never presented")
        return self.margin_sum / self.seen


def el2n(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """EL2N (Paul et al. 2021): || softmax(f(x)) - onehot(y) ||_2 per sample."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    return np.linalg.norm(probs - onehot, axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


# ================================================================================================
# Caching helpers
# ================================================================================================


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def rows_hash(rows: np.ndarray) -> str:
    """What a training's result was measured on: the sorted ids of its subset."""
    return hashlib.sha256(np.ascontiguousarray(np.sort(rows), dtype=np.int64).tobytes()).hexdigest()[:16]


class ResultLog:
    """Append-only JSON-lines checkpoint of finished training jobs, keyed by job key."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = {}
        self.stale = 0  # logged results found trained on another subset (see `stands`)
        if path.exists():
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash: that job simply runs again
                    self.done[rec["key"]] = rec

    def stands(self, key: str, rows_sha: str, log) -> bool:
        """Whether the logged result of `key` was trained on the subset whose `rows_hash` is
        `rows_sha`: after a pipeline change (D2's rule, a selector's seeding) the same method and
        parameters can select another subset, and its old result must be retrained, not reported."""
        rec = self.done.get(key)
        if rec is None:
            return False
        if rec.get("rows_sha") == rows_sha:
            return True
        self.stale += 1
        log(f"  stale result (trained on another subset than today's selection), retrained: {key}")
        del self.done[key]
        return False

    def add(self, rec: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[rec["key"]] = rec


# ================================================================================================
# Dynamics run
# ================================================================================================


def dynamics_one_seed(settings: Settings, x, y_np: np.ndarray, x_test, y_test, seed: int, features: bool, log=print) -> dict[str, Any]:
    """One dynamics training on the pool tensors: forgetting, AUM, EL2N (after `el2n_epoch`
    epochs), test accuracy and (when asked) the final penultimate features."""
    import torch

    recipe = settings.recipe
    y = torch.from_numpy(y_np)
    steps_per_epoch = math.ceil(len(y_np) / recipe.batch_size)
    total = settings.dyn_epochs * steps_per_epoch
    if not 1 <= settings.el2n_epoch <= settings.dyn_epochs:
        raise ValueError(f"el2n_epoch={settings.el2n_epoch} must be in 1..dyn_epochs={settings.dyn_epochs}")
    rec = DynamicsRecorder(y_np)
    box: dict[str, np.ndarray] = {}
    clock = time.time()

    def on_step(step: int, model) -> None:
        if step == settings.el2n_epoch * steps_per_epoch:
            model.eval()
            box["el2n"] = el2n(softmax(predict(model, x)), y_np)
            model.train()
        if step % steps_per_epoch == 0:
            log(f"  dynamics seed {seed}: epoch {step // steps_per_epoch}/{settings.dyn_epochs} ({time.time() - clock:.0f}s)")

    def on_batch(pos, logits) -> None:
        rec.update(pos, logits.numpy())

    model = train(x, y, total, seed, recipe, on_batch=on_batch, on_step=on_step)
    out = {
        "forgetting": rec.forgetting(),
        "aum": rec.aum(),
        "el2n": box["el2n"],
        "never_learned": (~rec.ever_correct).astype(np.float64),
        "test_acc": accuracy(model, x_test, y_test),
        "seconds": time.time() - clock,
    }
    if features:
        out["features"] = predict(model, x, features=True).astype(np.float32)
    return out


def run_dynamics_job(settings: Settings, pool: np.ndarray, seed: int, features: bool) -> dict[str, Any]:
    """:func:`dynamics_one_seed` in a worker process (data loaded by :func:`_worker_init`)."""
    import torch

    idx = torch.from_numpy(np.asarray(pool, dtype=np.int64))
    y_np = _WORKER["y"][idx].numpy()
    return dynamics_one_seed(
        settings, _WORKER["x"][idx], y_np, _WORKER["x_test"], _WORKER["y_test"], seed, features, log=lambda m: None
    )


def compute_dynamics(settings: Settings, pool: np.ndarray, executor: cf.Executor, log: Callable[[str], None]) -> dict[str, np.ndarray]:
    """All dynamics seeds in parallel worker processes; forgetting, AUM and EL2N averaged over
    seeds, features from the first seed's final model."""
    futures = [
        executor.submit(run_dynamics_job, settings, pool, seed, i == 0) for i, seed in enumerate(settings.dyn_seeds)
    ]
    outs = []
    for seed, fut in zip(settings.dyn_seeds, futures):
        outs.append(fut.result())
        log(f"  dynamics seed {seed}: test acc {outs[-1]['test_acc']:.4f} ({outs[-1]['seconds']:.0f}s)")
    return {
        "pool": pool,
        "labels": None,  # filled by the caller
        "forgetting": np.mean([o["forgetting"] for o in outs], axis=0),
        "aum": np.mean([o["aum"] for o in outs], axis=0),
        "el2n": np.mean([o["el2n"] for o in outs], axis=0),
        "features": outs[0]["features"],
        "dyn_test_acc": np.asarray([o["test_acc"] for o in outs]),
        "never_learned": np.mean([o["never_learned"] for o in outs], axis=0),  # fraction of seeds
    }


def load_or_compute_dynamics(
    settings: Settings, data: dict[str, np.ndarray], executor: cf.Executor, log: Callable[[str], None]
) -> tuple[dict[str, np.ndarray], np.ndarray, float, bool]:
    """(dynamics arrays, val ids, seconds spent, loaded from cache?)."""
    pool, val = stratified_split(data["train_labels"], settings.val_size, settings.pool_size, settings.split_seed)
    key = short_hash(settings.dynamics_key())
    path = CACHE_DIR / f"dynamics-{key}.npz"
    if path.exists():
        with np.load(path) as z:
            dyn = {name: z[name] for name in z.files}
        if not np.array_equal(dyn["pool"], pool):
            raise RuntimeError(f"{path}: cached pool differs from the split the settings give; delete the file")
        log(f"dynamics: loaded {path.name}")
        return dyn, val, 0.0, True
    log(f"dynamics: training on {len(pool)} pool images, {settings.dyn_epochs} epochs x {len(settings.dyn_seeds)} seeds")
    clock = time.time()
    dyn = compute_dynamics(settings, pool, executor, log)
    dyn["labels"] = data["train_labels"][pool].astype(np.int64)
    atomic_save_npz(path, **dyn)
    return dyn, val, time.time() - clock, False


# ================================================================================================
# Scores, graph and selections (all through the project's API)
# ================================================================================================


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def d2_scores(difficulty: np.ndarray, floor: float) -> tuple[np.ndarray, float]:
    """Difficulty -> non-negative D2 scores: shifted to min 0 (``d2.shift_nonnegative``), scaled to
    max 1, plus `floor`. Returns (scores, shift applied).

    Why the floor: a score of exactly 0 can never lower a neighbour in the reverse pass, so a block
    of zero-score nodes (e.g. the many never-forgotten samples) would be taken in index order, with
    no diversity at all; a small positive floor keeps the message passing active everywhere while
    leaving the difficulty ranking intact. The reverse pass is scale-invariant, so only the floor
    relative to the spread matters.
    """
    from pipeline.core.d2 import shift_nonnegative

    shifted, offset = shift_nonnegative(difficulty)
    top = shifted.max() if shifted.size else 0.0
    if top > 0:
        shifted = shifted / top
    return shifted + floor, offset


def difficulty(dyn: dict[str, np.ndarray], name: str) -> np.ndarray:
    """Higher = harder (= more worth keeping for D2). AUM is negated (low margin = hard).

    Two ablations used by the investigation: ``none`` (every sample equal: D2 reduces to graph
    density and diversity) and ``easy`` (AUM itself: easy samples first).
    """
    if name == "aum":
        return -dyn["aum"]
    if name in ("forgetting", "el2n"):
        return dyn[name]
    if name == "none":
        return np.zeros_like(dyn["aum"], dtype=np.float64)
    if name == "easy":
        return dyn["aum"].astype(np.float64)
    raise ValueError(f"unknown difficulty {name!r} (aum, forgetting, el2n, none, easy)")


@dataclass
class ClassGraphs:
    """Per-class kNN graphs on the pool's normalised features, distances in units of the median
    kNN squared distance (so gamma is dimensionless)."""

    class_ids: list[np.ndarray]  # pool positions of each class, sorted
    neighbors: list[np.ndarray]  # per class, local ids [n_c, k_max]
    distances: list[np.ndarray]  # per class, scaled squared distances [n_c, k_max]
    unit: float  # median squared L2 distance to the k_max nearest same-class neighbours
    k_max: int
    seconds: float

    def csr(self, c: int, k: int):
        from pipeline.core.d2 import symmetrize_knn

        if k > self.k_max:
            raise ValueError(f"k={k} exceeds the {self.k_max} neighbours computed")
        return symmetrize_knn(self.neighbors[c][:, :k], self.distances[c][:, :k])


def build_class_graphs(features: np.ndarray, labels: np.ndarray, k_max: int, unit_k: int | None = None) -> ClassGraphs:
    """kNN per class with the graph stage's ``pipeline.core.ivf.sharded_knn_graph`` as ``graph.index:
    flat`` runs it (one list, one probe: exact; a class has a few thousand nodes). The paper builds its CIFAR graphs per class too.

    The distance unit is the median squared distance to the first `unit_k` (default `k_max`)
    neighbours, so searching further (a larger `k_max`) does not change the unit."""
    import faiss

    from pipeline.core.ivf import sharded_knn_graph

    faiss.omp_set_num_threads(1)
    clock = time.time()
    x = l2_normalise(features)
    class_ids, nbs, dists = [], [], []
    for c in np.unique(labels):
        ids = np.flatnonzero(labels == c)
        nb, d, _ = sharded_knn_graph(x[ids], k_max, nlist=1, nprobe=1)
        class_ids.append(ids)
        nbs.append(nb)
        dists.append(d)
    uk = k_max if unit_k is None else min(unit_k, k_max)
    finite = np.concatenate([d[:, :uk][np.isfinite(d[:, :uk])] for d in dists])
    unit = float(np.median(finite))
    if not unit > 0:
        raise ValueError(f"median kNN distance is {unit}: features collapsed?")
    dists = [(d / unit).astype(np.float32) for d in dists]
    return ClassGraphs(class_ids, nbs, dists, unit, k_max, time.time() - clock)


def forward_bias(graphs: ClassGraphs, scores: np.ndarray, k: int, gamma_f: float) -> dict[str, float]:
    """What the forward pass rewards: Pearson correlation of the forward score with the node's
    degree and with its own score, averaged over the class graphs."""
    from pipeline.core.d2 import forward_pass

    with_degree, with_score = [], []
    for c, ids in enumerate(graphs.class_ids):
        g = graphs.csr(c, k)
        deg = np.diff(g.indptr).astype(np.float64)
        fwd = forward_pass(g, scores[ids], gamma_f)
        with_degree.append(np.corrcoef(fwd, deg)[0, 1])
        with_score.append(np.corrcoef(fwd, scores[ids])[0, 1])
    return {"corr_with_degree": float(np.mean(with_degree)), "corr_with_score": float(np.mean(with_score))}


@dataclass(frozen=True)
class Method:
    name: str  # row label family: random, forgetting, el2n, ccs, moderate, kcenter, d2
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def p(self) -> dict[str, Any]:
        return dict(self.params)

    def label(self) -> str:
        return {
            "random": "Random",
            "forgetting": "Forgetting (top-k)",
            "el2n": "EL2N (top-k)",
            "ccs": "CCS (AUM)",
            "moderate": "Moderate",
            "kcenter": "k-center greedy (per class)",
            "d2": "D2 (ours)",
            "full": "Full pool",
        }[self.name]

    def key(self) -> str:
        # random and CCS draw with the select stage's keyed randomness (coreset.random_keys) since
        # they call its selectors; trainings on the older numpy-RNG draws are not reused
        return self.name + json.dumps(self.p, sort_keys=True) + ("|keyed" if self.seeded() else "")

    def seeded(self) -> bool:
        """Does the selection itself depend on the seed?"""
        return self.name in ("random", "ccs")


class Selector:
    """Selections on the pool through the project's API, memoised (k-center is not free)."""

    def __init__(self, settings: Settings, dyn: dict[str, np.ndarray], graphs: ClassGraphs):
        self.settings = settings
        self.dyn = dyn
        self.labels = dyn["labels"].astype(np.int64)
        self.n = len(self.labels)
        self.features = l2_normalise(dyn["features"])
        self.graphs = graphs
        self._memo: dict[tuple, np.ndarray] = {}
        self._kcenter_orders: list[np.ndarray] | None = None
        self.seconds: dict[str, float] = {}

    def select(self, method: Method, rate: float, seed: int) -> np.ndarray:
        """Pool positions of the coreset (sorted)."""
        memo_key = (method.key(), rate, seed if method.seeded() else None)
        if memo_key not in self._memo:
            clock = time.time()
            ids = np.asarray(self._select(method, rate, seed), dtype=np.int64)
            budget = self.budget(rate)
            if method.name != "full" and len(ids) != budget:
                raise RuntimeError(f"{method.key()} at rate {rate} returned {len(ids)} ids, budget {budget}")
            if len(np.unique(ids)) != len(ids):
                raise RuntimeError(f"{method.key()} at rate {rate} returned repeated ids")
            self._memo[memo_key] = np.sort(ids)
            self.seconds[f"{method.key()}@{rate}"] = time.time() - clock
        return self._memo[memo_key]

    def budget(self, rate: float) -> int:
        from pipeline.core.d2 import budget_for

        return budget_for(self.n, rate)

    def _select(self, method: Method, rate: float, seed: int) -> np.ndarray:
        from pipeline.core import selectors

        p = method.p
        budget = self.budget(rate)
        if method.name == "full":
            return np.arange(self.n)
        if method.name == "random":
            return selectors.random_select(self.n, budget, seed)
        if method.name in ("forgetting", "el2n"):
            return selectors.score_topk(difficulty(self.dyn, method.name), budget)
        if method.name == "ccs":  # the original hard cut: the hardest (highest AUM difficulty) go first
            aum = difficulty(self.dyn, "aum")
            survivors = selectors.ccs_hard_cut(aum, p["beta"], "highest")
            if len(survivors) < budget:
                raise ValueError(f"CCS beta={p['beta']} leaves {len(survivors)} samples < budget {budget}")
            return selectors.ccs_select(aum[survivors], budget, strata=self.settings.ccs_strata, seed=seed,
                                        ids=survivors)
        if method.name == "moderate":
            return selectors.moderate_select(self.features, budget, groups=self.labels)
        if method.name == "kcenter":
            return self._kcenter(budget)
        if method.name == "d2":
            return self._d2(rate, p["difficulty"], p["k"], p["gamma_f"], p["gamma_r"], p["beta"])
        raise ValueError(f"unknown method {method.name!r}")

    def _kcenter(self, budget: int) -> np.ndarray:
        """k-center greedy per class with uniform class budgets (label-balanced, like D2).

        Why per class: ``selectors.kcenter_greedy`` is O(N·B·D); on the whole 55k pool at 30%
        pruning that is ~10 minutes per selection on this CPU, per class it is seconds. Its order is
        prefix-consistent (the first b centres do not depend on the budget), so each class's
        farthest-point order is computed once, for the whole class, and cut per budget.
        """
        from pipeline.core import selectors

        if self._kcenter_orders is None:
            self._kcenter_orders = [
                ids[selectors.kcenter_greedy(self.features[ids], len(ids), seed=0)] for ids in self.graphs.class_ids
            ]
        orders = self._kcenter_orders
        budgets = selectors.balanced_budgets(np.array([len(o) for o in orders]), budget, mode="uniform")
        return np.concatenate([o[: int(b)] for o, b in zip(orders, budgets)])

    def _d2(self, rate: float, diff_name: str, k: int, gamma_f: float, gamma_r: float, beta: float) -> np.ndarray:
        """Label-balanced D2 as in the paper: β pre-filter on AUM over the pool (the budget still
        counts the whole pool), uniform class budgets over the survivors, D2 on each class's graph
        restricted to its survivors."""
        from pipeline.core.d2 import d2_select, prefilter_mask, subgraph
        from pipeline.core.selectors import balanced_budgets

        budget = self.budget(rate)
        scores, _ = d2_scores(difficulty(self.dyn, diff_name), self.settings.d2_score_floor)
        keep = prefilter_mask(self.dyn["aum"], beta)
        survivors = [ids[keep[ids]] for ids in self.graphs.class_ids]
        budgets = balanced_budgets(np.array([len(s) for s in survivors]), budget, mode="uniform")
        out = []
        for c, ids in enumerate(self.graphs.class_ids):
            local = np.flatnonzero(keep[ids])  # survivor positions inside the class graph
            graph = subgraph(self.graphs.csr(c, k), local)
            sel = d2_select(graph, scores[ids[local]], int(budgets[c]), gamma_f, gamma_r)
            out.append(ids[local[sel.order]])
        return np.concatenate(out)

    def diagnostics(self, ids: np.ndarray, probe: np.ndarray) -> dict[str, float]:
        """How hard and how spread out a coreset is: mean AUM-difficulty percentile (0 = easiest,
        1 = hardest), smallest/largest class share, and coverage = mean squared distance from a
        fixed probe sample of the pool to its nearest coreset member (normalised features;
        lower = better covered)."""
        hard_rank = np.argsort(np.argsort(-self.dyn["aum"], kind="stable"), kind="stable") / max(1, self.n - 1)
        counts = np.bincount(self.labels[ids], minlength=N_CLASSES)
        q = self.features[probe]
        best = np.full(len(probe), np.inf, dtype=np.float32)
        sel = self.features[ids]
        for lo in range(0, len(ids), 8192):
            block = sel[lo : lo + 8192]
            d = (q * q).sum(1)[:, None] + (block * block).sum(1)[None, :] - 2.0 * q @ block.T
            best = np.minimum(best, d.min(1))
        return {
            "hardness_pct": float(hard_rank[ids].mean()),
            "class_min": float(counts.min() / len(ids)),
            "class_max": float(counts.max() / len(ids)),
            "coverage_sqdist": float(np.maximum(best, 0).mean()),
        }


# ================================================================================================
# Training jobs in worker processes
# ================================================================================================

_WORKER: dict[str, Any] = {}


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    data = load_fashion_mnist()
    _WORKER["x"] = torch.from_numpy(standardise(data["train_images"]))
    _WORKER["y"] = torch.from_numpy(data["train_labels"].astype(np.int64))
    _WORKER["x_test"] = torch.from_numpy(standardise(data["test_images"]))
    _WORKER["y_test"] = torch.from_numpy(data["test_labels"].astype(np.int64))


def run_training_job(train_ids: np.ndarray, eval_ids: np.ndarray | None, seed: int, steps: int, recipe: dict) -> dict[str, float]:
    """Train a fresh CNN on train images `train_ids`; accuracy on train images `eval_ids` (the
    validation split) or, when None, on the test set."""
    import torch

    clock = time.time()
    idx = torch.from_numpy(np.asarray(train_ids, dtype=np.int64))
    model = train(_WORKER["x"][idx], _WORKER["y"][idx], steps, seed, Recipe(**recipe))
    if eval_ids is None:
        acc = accuracy(model, _WORKER["x_test"], _WORKER["y_test"])
    else:
        e = torch.from_numpy(np.asarray(eval_ids, dtype=np.int64))
        acc = accuracy(model, _WORKER["x"][e], _WORKER["y"][e])
    return {"acc": acc, "seconds": time.time() - clock}


@dataclass(frozen=True)
class Job:
    method: Method
    rate: float
    seed: int
    split: str  # "val" (sweep) or "test" (table)

    def key(self) -> str:
        return f"{self.split}|{self.method.key()}|{self.rate}|{self.seed}"


class Runner:
    def __init__(self, settings: Settings, selector: Selector, val_ids: np.ndarray, results: ResultLog, log, executor: cf.Executor):
        self.settings = settings
        self.selector = selector
        self.pool = selector.dyn["pool"]
        self.val_ids = val_ids
        self.results = results
        self.log = log
        self.pool_exec = executor
        self.train_seconds = 0.0
        self.jobs_run = 0
        self.skipped = 0

    def run(self, jobs: list[Job], deadline: float | None = None) -> dict[str, dict]:
        """Run the jobs not yet checkpointed, in order, at most `workers` at a time; no job starts
        after `deadline` (time.time()). Returns the records of the finished `jobs`."""
        todo = [j for j in dict.fromkeys(jobs) if not self.results.stands(j.key(), self.rows_sha(j), self.log)]
        pending: dict[cf.Future, tuple[Job, int]] = {}
        queue = list(todo)
        skipped = 0
        while queue or pending:
            while queue and len(pending) < self.settings.workers:
                job = queue.pop(0)
                if deadline is not None and time.time() > deadline:
                    skipped += 1 + len(queue)
                    queue.clear()
                    break
                ids = self.pool[self.selector.select(job.method, job.rate, job.seed)]
                eval_ids = self.val_ids if job.split == "val" else None
                fut = self.pool_exec.submit(
                    run_training_job, ids, eval_ids, job.seed, self.settings.steps_for(len(ids)),
                    dataclasses.asdict(self.settings.recipe)
                )
                pending[fut] = (job, len(ids))
            if not pending:
                break
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                job, size = pending.pop(fut)
                self._record(job, size, fut.result())
        if skipped:
            self.log(f"  deadline reached: {skipped} trainings not started")
            self.skipped += skipped
        return {j.key(): self.results.done[j.key()] for j in jobs if j.key() in self.results.done}

    def rows_sha(self, job: Job) -> str:
        return rows_hash(self.selector.select(job.method, job.rate, job.seed))

    def _record(self, job: Job, size: int, out: dict) -> None:
        rec = {
            "rows_sha": self.rows_sha(job),
            "key": job.key(),
            "split": job.split,
            "method": job.method.name,
            "params": job.method.p,
            "rate": job.rate,
            "seed": job.seed,
            "size": size,
            "acc": out["acc"],
            "seconds": out["seconds"],
        }
        self.results.add(rec)
        self.train_seconds += out["seconds"]
        self.jobs_run += 1
        self.log(
            f"  {job.split:4s} {job.method.key():60s} rate={job.rate:.1f} seed={job.seed} n={size:6d} "
            f"acc={out['acc']:.4f} ({out['seconds']:.0f}s)"
        )


# ================================================================================================
# Sweep (validation split) and table (test set)
# ================================================================================================


def d2_method(difficulty_name: str, k: int, gamma_r: float, beta: float, gamma_f: float = 1.0) -> Method:
    return Method(
        "d2", (("beta", beta), ("difficulty", difficulty_name), ("gamma_f", gamma_f), ("gamma_r", gamma_r), ("k", k))
    )


def ccs_method(beta: float) -> Method:
    return Method("ccs", (("beta", beta),))


def _best(records: list[tuple[Method, dict]]) -> tuple[Method, float]:
    """Highest validation accuracy; ties go to the earlier (simpler) configuration."""
    best_m, best_acc = None, -1.0
    for m, rec in records:
        if rec["acc"] > best_acc:
            best_m, best_acc = m, rec["acc"]
    return best_m, best_acc


def sweep(settings: Settings, runner: Runner, log) -> dict[str, Any]:
    """Staged search per pruning rate on the validation split (seed 0).

    D2: A) difficulty x gamma_f (k = k_grid[0], middle gamma_r, beta = 0), the best goes on;
    A2) the other gamma_r values; B) the other k values; C) beta > 0 (below the rate). Each step
    keeps the best so far. CCS: beta over its grid (below the rate). Random is trained on the
    validation split too, as a reference. Each stage runs all rates at once so both workers stay
    busy. A staged search, not a full grid: the full grid is
    |difficulty|·|gamma_f|·|gamma_r|·|k|·|beta| = 108 trainings per rate, too many for this CPU.
    """
    seed = settings.seeds[0]
    rates = settings.rates
    k0 = settings.d2_k_grid[0]
    chosen: dict[str, Any] = {"d2": {}, "ccs": {}, "d2_stage_a": {}}
    trials: list[dict] = []

    def val(m: Method, r: float) -> Job:
        return Job(m, r, seed, "val")

    def acc_of(res: dict, m: Method, r: float) -> dict:
        rec = res[val(m, r).key()]
        trials.append({"method": m.name, "params": m.p, "rate": r, "val_acc": rec["acc"]})
        return rec

    g_mid = settings.d2_gamma_r_grid[len(settings.d2_gamma_r_grid) // 2]
    stage_a = {
        (d, r): [d2_method(d, k0, g_mid, 0.0, gf) for gf in settings.d2_gamma_f_grid]
        for d in settings.difficulties
        for r in rates
    }
    ccs = {r: [ccs_method(b) for b in settings.ccs_beta_grid if b < r] for r in rates}
    refs = {r: [Method("random")] for r in rates}  # reference point on the validation split
    jobs = (
        [val(m, r) for (d, r), ms in stage_a.items() for m in ms]
        + [val(m, r) for r, ms in ccs.items() for m in ms]
        + [val(m, r) for r, ms in refs.items() for m in ms]
    )
    log(f"sweep stage A (difficulty x gamma_f, +CCS, +random): {len(jobs)} validation trainings")
    res = runner.run(jobs)
    for r, ms in ccs.items():
        best_ccs, acc = _best([(m, acc_of(res, m, r)) for m in ms])
        chosen["ccs"][str(r)] = {"beta": best_ccs.p["beta"], "val_acc": acc}
    for r, ms in refs.items():
        chosen.setdefault("random_val_acc", {})[str(r)] = acc_of(res, ms[0], r)["acc"]
    best: dict[float, tuple[Method, float]] = {}
    for r in rates:
        per_diff = []
        for d in settings.difficulties:
            m, a = _best([(m, acc_of(res, m, r)) for m in stage_a[(d, r)]])
            chosen["d2_stage_a"].setdefault(str(r), {})[d] = dict(m.p, val_acc=a)
            per_diff.append((m, {"acc": a}))
        best[r] = _best(per_diff)

    def variant(m: Method, **change) -> Method:
        p = dict(m.p, **change)
        return d2_method(p["difficulty"], p["k"], p["gamma_r"], p["beta"], p["gamma_f"])

    for stage, make in (
        ("A2 (gamma_r)", lambda m, r: [variant(m, gamma_r=g) for g in settings.d2_gamma_r_grid if g != g_mid]),
        ("B (k)", lambda m, r: [variant(m, k=k) for k in settings.d2_k_grid[1:]]),
        ("C (beta)", lambda m, r: [variant(m, beta=b) for b in settings.d2_beta_grid if 0 < b < r]),
    ):
        cands = {r: make(best[r][0], r) for r in rates}
        jobs = [val(m, r) for r, ms in cands.items() for m in ms]
        log(f"sweep stage {stage}: {len(jobs)} validation trainings")
        res = runner.run(jobs)
        for r, ms in cands.items():
            best[r] = _best([(best[r][0], {"acc": best[r][1]})] + [(m, acc_of(res, m, r)) for m in ms])
    for r in rates:
        chosen["d2"][str(r)] = dict(best[r][0].p, val_acc=best[r][1])
    return {"chosen": chosen, "trials": trials}


def investigate(settings: Settings, runner: Runner, sw: dict[str, Any], log, deadline: float | None) -> dict[str, Any]:
    """At each rate where the chosen D2 scored below random on the validation split, train
    one-change ablations of the chosen configuration on the validation split (2 seeds each):
    the scores (none: pure density/diversity; easy: easy samples first), the reverse kernel
    (gamma_r = 0.01: suppress neighbours almost fully), the graph (k = investigate_k), the forward
    pass (gamma_f = 100: practically off). Diagnostics of each selection come with it."""
    chosen = sw["chosen"]
    seeds = settings.seeds[:2]
    out: dict[str, Any] = {}
    for r in settings.rates:
        d2 = chosen["d2"][str(r)]
        if d2["val_acc"] >= chosen["random_val_acc"][str(r)]:
            continue
        base = d2_method(d2["difficulty"], d2["k"], d2["gamma_r"], d2["beta"], d2["gamma_f"])

        def variant(**change) -> Method:
            p = dict(base.p, **change)
            return d2_method(p["difficulty"], p["k"], p["gamma_r"], p["beta"], p["gamma_f"])

        variants = {
            "random": Method("random"),
            "ccs (chosen)": ccs_method(chosen["ccs"][str(r)]["beta"]),
            "d2 (chosen)": base,
            "d2, scores = constant": variant(difficulty="none"),
            "d2, scores = easiness (+AUM)": variant(difficulty="easy"),
            "d2, gamma_r = 0.01": variant(gamma_r=0.01),
            f"d2, k = {settings.investigate_k}": variant(k=settings.investigate_k),
            "d2, gamma_f = 100 (forward off)": variant(gamma_f=100.0),
        }
        jobs = [Job(m, r, s, "val") for m in variants.values() for s in seeds]
        log(f"investigation at rate {r}: D2 val {d2['val_acc']:.4f} < random {chosen['random_val_acc'][str(r)]:.4f}; {len(jobs)} validation trainings")
        res = runner.run(jobs, deadline=deadline)
        probe = np.random.default_rng(0).choice(runner.selector.n, size=min(2000, runner.selector.n), replace=False)
        rows = {}
        for name, m in variants.items():
            accs = [res[k]["acc"] for k in (Job(m, r, s, "val").key() for s in seeds) if k in res]
            if accs:
                rows[name] = dict(
                    summarise(accs), params=m.p, diagnostics=runner.selector.diagnostics(runner.selector.select(m, r, seeds[0]), probe)
                )
        out[str(r)] = rows
    return out


def table_methods(chosen: dict[str, Any], rate: float) -> list[Method]:
    d2 = chosen["d2"][str(rate)]
    return [
        Method("random"),
        Method("forgetting"),
        Method("el2n"),
        ccs_method(chosen["ccs"][str(rate)]["beta"]),
        Method("moderate"),
        Method("kcenter"),
        d2_method(d2["difficulty"], d2["k"], d2["gamma_r"], d2["beta"], d2["gamma_f"]),
    ]


def summarise(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "n": int(len(a)),
        "values": [float(v) for v in a],
    }


ROW_ORDER = ["random", "forgetting", "el2n", "ccs", "moderate", "kcenter", "d2", "d2_revised"]


def run_time_note(timing: dict[str, Any]) -> str:
    invs = timing.get("invocations") or []
    if len(invs) <= 1:
        return f"{timing['total_s'] / 60:.1f} min ({timing['trainings']} trainings)"
    parts = ", ".join(f"{i['wall_s'] / 60:.1f} min ({i['trainings']} trainings)" for i in invs)
    return f"{timing['all_invocations_wall_s'] / 60:.1f} min over {len(invs)} invocations: {parts}"


def fmt_cell(c: dict[str, Any]) -> str:
    return f"{100 * c['mean']:.2f} ± {100 * c['std']:.2f}" if c["n"] > 1 else f"{100 * c['mean']:.2f}"


def seeds_note(report: dict[str, Any]) -> str:
    ns = sorted({c["n"] for row in report["table"].values() for c in row.values()})  # noqa: C401
    if len(ns) == 1:
        return f"{ns[0]} training seed(s)"
    return f"{ns[0]}–{ns[-1]} training seeds (the run hit its time limit; n per cell in the JSON)"


def training_note(report: dict[str, Any]) -> str:
    st = report["settings"]
    batch = st["recipe"]["batch_size"]
    if st.get("train_epochs"):
        return (f"Every training run: {st['train_epochs']} epochs of its own training set, batch {batch}, cosine "
                f"schedule to zero (the paper's protocol: each coreset trained fully, so a smaller coreset gets "
                f"fewer steps, never fewer than {st.get('min_train_steps', 0)}; the full pool "
                f"{st['train_epochs'] * math.ceil(report['data']['pool'] / batch)} steps).")
    return (f"Every training run: {st['train_steps']} SGD steps of batch {batch} (equal compute for every method "
            f"and rate; {st['train_steps'] * batch / report['data']['pool']:.2f} epochs of the full pool, so "
            f"training is compute-bound and small coresets see more epochs).")


def render_markdown(report: dict[str, Any]) -> str:
    rates = report["settings"]["rates"]
    table = report["table"]
    lines = []
    lines.append(f"# Coreset quality: Fashion-MNIST, small CNN ({report['settings']['mode']} run)")
    lines.append("")
    lines.append(
        f"Test accuracy (%) of a CNN trained from scratch on each coreset, mean ± std over "
        f"{seeds_note(report)}; pool = {report['data']['pool']} training images "
        f"({report['data']['val']} held out for validation), test = {report['data']['test']} images. "
        f"{training_note(report)} Bold: best coreset method per rate."
    )
    lines.append("")
    header = "| method | " + " | ".join(f"{int(round(r * 100))}% pruned" for r in rates) + " |"
    lines.append(header)
    lines.append("|---|" + "---|" * len(rates))
    best = {}
    for r in rates:
        cells = [(row, table[row][str(r)]["mean"]) for row in ROW_ORDER if str(r) in table.get(row, {})]
        best[r] = max(cells, key=lambda t: t[1])[0] if cells else None
    full = report.get("full")
    if full:
        lines.append(
            f"| Full pool (0% pruned) | "
            + " | ".join(fmt_cell(full) for _ in rates)
            + " |"
        )
    for row in ROW_ORDER:
        if row not in table:
            continue
        cells = []
        for r in rates:
            c = table[row].get(str(r))
            if c is None:
                cells.append("–")
                continue
            txt = fmt_cell(c)
            cells.append(f"**{txt}**" if best[r] == row else txt)
        lines.append(f"| {report['labels'][row]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Hyper-parameters chosen on the validation split (never the test set):")
    lines.append("")
    lines.append("| rate | D2 difficulty | k | γ_f | γ_r | β | D2 val acc | CCS β | CCS val acc | Random val acc |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    ch = report["sweep"]["chosen"]
    for r in rates:
        d, c = ch["d2"][str(r)], ch["ccs"][str(r)]
        lines.append(
            f"| {int(round(r * 100))}% | {d['difficulty']} | {d['k']} | {d['gamma_f']} | {d['gamma_r']} | {d['beta']} | "
            f"{100 * d['val_acc']:.2f} | {c['beta']} | {100 * c['val_acc']:.2f} | "
            f"{100 * ch.get('random_val_acc', {}).get(str(r), float('nan')):.2f} |"
        )
    lines.append("")
    for r, rows in report.get("investigation", {}).items():
        lines.append(
            f"Investigation at {int(round(float(r) * 100))}% pruning (D2 below random on validation): validation "
            f"accuracy (%), mean over {max(v['n'] for k, v in rows.items() if k != '_revised')} seeds, one change to the chosen D2 each; "
            f"hardness = mean AUM-difficulty percentile of the coreset (0.5 = like random), coverage = mean squared "
            f"distance from a pool sample to its nearest coreset member (lower = better covered)."
        )
        lines.append("")
        lines.append("| variant | val acc | hardness | coverage |")
        lines.append("|---|---|---|---|")
        for name, v in rows.items():
            if name == "_revised":
                continue
            dg = v["diagnostics"]
            lines.append(f"| {name} | {fmt_cell(v)} | {dg['hardness_pct']:.3f} | {dg['coverage_sqdist']:.4f} |")
        lines.append("")
    g = report["graph"]
    lines.append(
        f"D2: per-class exact kNN graphs (`pipeline.core.ivf.sharded_knn_graph`, flat index) on L2-normalised "
        f"penultimate features, symmetrised with `pipeline.core.d2.symmetrize_knn`; squared distances in "
        f"units of the median kNN squared distance ({g['unit']:.4g}), so γ is dimensionless; "
        f"difficulty scaled to [0, 1] + "
        f"{report['settings']['d2_score_floor']}; β pre-filter drops the lowest-AUM samples; "
        f"uniform class budgets (`selectors.balanced_budgets`). CCS: negated AUM, "
        f"{report['settings']['ccs_strata']} strata. k-center greedy: per class, uniform class budgets."
    )
    lines.append("")
    m = report["machine"]
    lines.append(
        f"Machine: {m['description']}. Wall time {run_time_note(report['timing'])}; "
        f"{report['settings']['workers']} training process(es) × {report['settings']['threads_per_worker']} thread. "
        f"{m['contention']}"
    )
    lines.append("")
    return "\n".join(lines)


def graph_stats(settings: Settings, graphs: ClassGraphs, dyn: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {"unit": graphs.unit, "k_max": graphs.k_max, "seconds": graphs.seconds, "by_k": {}}
    scores, _ = d2_scores(difficulty(dyn, "aum"), settings.d2_score_floor)
    for k in settings.d2_k_grid:
        deg = np.concatenate([np.diff(graphs.csr(c, k).indptr) for c in range(len(graphs.class_ids))])
        out["by_k"][str(k)] = {
            "degree_percentiles_0_50_90_99_100": [float(v) for v in np.percentile(deg, [0, 50, 90, 99, 100])],
            "forward_bias_aum": {str(gf): forward_bias(graphs, scores, k, gf) for gf in settings.d2_gamma_f_grid},
        }
    return out


def machine_description() -> dict[str, str]:
    return {
        "description": f"{os.cpu_count()}-core {platform.machine()} CPU VM, "
        f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, no GPU; "
        f"Python {platform.python_version()}",
        "contention": "",
    }


def add_run_args(ap: argparse.ArgumentParser) -> None:
    """The options the training benchmarks share (this one and datacomp_mini.py)."""
    ap.add_argument("--json", type=Path, help="write the JSON report here")
    ap.add_argument("--md", type=Path, help="write the markdown tables here")
    ap.add_argument("--workers", type=int, help="training processes (default: the mode's settings)")
    ap.add_argument("--contention", default="", help="note on concurrent load, copied into the report")
    ap.add_argument(
        "--max-minutes",
        type=float,
        help="no table training starts after this many minutes from launch; cells then report the "
        "seeds that finished (earlier seeds come first, so they are complete)",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10k pool, one seed, two rates (a few minutes)")
    add_run_args(ap)
    args = ap.parse_args(argv)
    settings = quick_settings() if args.quick else full_settings()
    if args.workers:
        settings = dataclasses.replace(settings, workers=args.workers)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)

    import torch  # noqa: F401  (fail early if the environment lacks it)

    torch.set_num_threads(1)  # the main process only selects; training runs in the workers
    data = load_fashion_mnist()
    executor = cf.ProcessPoolExecutor(
        max_workers=settings.workers,
        mp_context=mp.get_context("spawn"),  # fork after torch/OpenMP start-up can hang
        initializer=_worker_init,
        initargs=(settings.threads_per_worker,),
    )
    try:
        return _main(args, settings, data, executor, start, log)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _main(args, settings: Settings, data: dict[str, np.ndarray], executor: cf.Executor, start: float, log) -> int:
    dyn, val_ids, dyn_seconds, dyn_cached = load_or_compute_dynamics(settings, data, executor, log)
    labels = dyn["labels"].astype(np.int64)
    log(
        f"dynamics: dyn-model test acc {dyn['dyn_test_acc']}, never learned (any seed) "
        f"{int((dyn['never_learned'] > 0).sum())}, unforgettable {int((dyn['forgetting'] == 0).sum())} of {len(labels)}"
    )
    k_search = max(settings.d2_k_grid + ((settings.investigate_k,) if settings.investigate else ()))
    graphs = build_class_graphs(dyn["features"], labels, k_search, unit_k=settings.distance_unit_k)
    log(f"graph: per-class flat kNN (k={graphs.k_max}) in {graphs.seconds:.1f}s, median sq distance {graphs.unit:.4g}")
    selector = Selector(settings, dyn, graphs)
    run_dir = CACHE_DIR / f"run-{settings.mode}-{short_hash(settings.run_key())}"
    results = ResultLog(run_dir / "results.jsonl")
    log(f"checkpoint: {run_dir / 'results.jsonl'} ({len(results.done)} trainings already done)")
    runner = Runner(settings, selector, val_ids, results, log, executor)
    sw = sweep(settings, runner, log)
    log(f"sweep chosen: {json.dumps(sw['chosen'])}")
    # The table, seed by seed so a partial run still has whole tables for the first seeds.
    jobs = []
    for seed in settings.seeds:
        jobs.append(Job(Method("full"), 0.0, seed, "test"))
        for r in settings.rates:
            jobs += [Job(m, r, seed, "test") for m in table_methods(sw["chosen"], r)]
    log(f"table: {len(jobs)} test trainings")
    deadline = start + 60 * args.max_minutes if args.max_minutes is not None else None
    res = runner.run(jobs, deadline=deadline)
    investigation = investigate(settings, runner, sw, log, deadline) if settings.investigate else {}
    # Where the investigation found a D2 variant that beats the chosen one on the *validation*
    # split (mean over its seeds), that variant is also trained on the test set, as its own row
    # ("D2, after investigation"): the main D2 row stays the pre-registered sweep's choice.
    revised: dict[str, Method] = {}
    for r_key, rows in investigation.items():
        d2_rows = {name: v for name, v in rows.items() if name.startswith("d2")}
        name, best_row = max(d2_rows.items(), key=lambda kv: kv[1]["mean"])
        if name != "d2 (chosen)" and best_row["mean"] > d2_rows["d2 (chosen)"]["mean"]:
            p = best_row["params"]
            revised[r_key] = d2_method(p["difficulty"], p["k"], p["gamma_r"], p["beta"], p["gamma_f"])
            rows["_revised"] = {"variant": name, "params": p}
    if revised:
        jobs = [Job(m, float(r), s, "test") for r, m in revised.items() for s in settings.seeds]
        log(f"revised D2 on the test set: {len(jobs)} trainings")
        res.update(runner.run(jobs, deadline=deadline))

    table: dict[str, dict[str, Any]] = {}
    labels_by_row = {}
    diagnostics: dict[str, dict[str, Any]] = {}
    probe = np.random.default_rng(0).choice(len(labels), size=min(2000, len(labels)), replace=False)
    for r in settings.rates:
        for m in table_methods(sw["chosen"], r):
            accs = [res[k]["acc"] for k in (Job(m, r, s, "test").key() for s in settings.seeds) if k in res]
            if not accs:
                continue
            table.setdefault(m.name, {})[str(r)] = dict(summarise(accs), params=m.p, size=selector.budget(r))
            labels_by_row[m.name] = m.label()
            diagnostics.setdefault(m.name, {})[str(r)] = selector.diagnostics(selector.select(m, r, settings.seeds[0]), probe)
    for r_key, m in revised.items():
        accs = [res[k]["acc"] for k in (Job(m, float(r_key), s, "test").key() for s in settings.seeds) if k in res]
        if accs:
            table.setdefault("d2_revised", {})[r_key] = dict(summarise(accs), params=m.p, size=selector.budget(float(r_key)))
            labels_by_row["d2_revised"] = "D2, after investigation (val-chosen)"
            diagnostics.setdefault("d2_revised", {})[r_key] = selector.diagnostics(selector.select(m, float(r_key), settings.seeds[0]), probe)
    full = summarise(
        [res[k]["acc"] for k in (Job(Method("full"), 0.0, s, "test").key() for s in settings.seeds) if k in res]
    )
    machine = machine_description()
    machine["contention"] = args.contention
    total = time.time() - start
    f = dyn["forgetting"]
    report = {
        "benchmark": "coreset_quality",
        "settings": dataclasses.asdict(settings),
        "data": {
            "source": str(DATA_DIR) + " (Debian package dataset-fashion-mnist)",
            "pool": int(len(labels)),
            "val": int(len(val_ids)),
            "test": int(len(data["test_labels"])),
        },
        "dynamics": {
            "dyn_model_test_acc": [float(a) for a in dyn["dyn_test_acc"]],
            "unforgettable_fraction": float((f == 0).mean()),
            "never_learned_fraction": float((dyn["never_learned"] > 0).mean()),
            "aum_mean": float(dyn["aum"].mean()),
            "el2n_mean": float(dyn["el2n"].mean()),
            "seconds": dyn_seconds,
            "from_cache": dyn_cached,
        },
        "graph": graph_stats(settings, graphs, dyn),
        "sweep": sw,
        "investigation": investigation,
        "full": full,
        "table": table,
        "labels": labels_by_row,
        "diagnostics": diagnostics,
        "selection_seconds": selector.seconds,
        "machine": machine,
        "timing": {
            "total_s": total,
            "trainings": runner.jobs_run,
            "trainings_skipped_by_deadline": runner.skipped,
            "stale_retrained": runner.results.stale,
            "training_cpu_s": runner.train_seconds,
            "checkpoint": str(run_dir.relative_to(REPO)),
        },
    }
    # Wall time of every invocation that built this checkpoint (a resumed run reuses earlier work).
    inv_path = run_dir / "invocations.jsonl"
    this = {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
        "wall_s": round(total, 1),
        "trainings": runner.jobs_run,
        "dynamics_s": round(dyn_seconds, 1),
        "argv": sys.argv[1:],
    }
    with open(inv_path, "a") as f:
        f.write(json.dumps(this) + "\n")
    invocations = [json.loads(line) for line in open(inv_path) if line.strip()]
    report["timing"]["invocations"] = invocations
    report["timing"]["all_invocations_wall_s"] = round(sum(i["wall_s"] for i in invocations), 1)
    md = render_markdown(report)
    print(md)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2, sort_keys=True) + "\n")
    if args.md:
        atomic_write_text(args.md, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
