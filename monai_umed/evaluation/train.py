# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""Victim training and evaluation: what an unauthorised trainer does with the released files (METHODS.md 4).

The recipe is the standard MONAI one, reading the files as written on disk:

``LoadImaged`` -> defence preprocessing (if any) -> ``Resized`` to ``image_size`` (if given; image bilinear with
anti-aliasing, label nearest) -> intensity scaling (``auto``: per-image min/max to ``[0, 1]`` in 2D, per-channel
z-score in 3D) -> ``SpatialPadd`` to the patch -> ``RandCropByPosNegLabeld`` (1:1 foreground/background centres)
-> random flips along every axis and random 90-degree rotations in a square plane of the patch (small
rotations otherwise) -> defence augmentation (if any); ``DiceCELoss``
(softmax, one-hot labels, so multi-class labels are handled), Adam, a fixed number of epochs and a fixed seed;
CUDA with AMP when present. Everything up to the first random transform is cached in memory (``CacheDataset``),
so an epoch costs only augmentation and the network. Evaluation runs ``sliding_window_inference`` with the patch
as ROI on each clean test image, resamples the logits back to the label's own grid when the victim resized, and
scores with MONAI ``DiceMetric``.

On CUDA the same recipe follows MONAI's fast-training practice: the cache ends with the tensors on the device, a
``ThreadDataLoader`` runs the random transforms there (in one background thread, so the draws and their order are
those of the CPU path), cuDNN autotunes the fixed patch shape, and evaluation forwards more windows, and several test
cases of the same preprocessed shape, per call. The CPU path is the plain ``DataLoader`` one.

Trained weights are cached under a content hash of the training files (image and label bytes), the victim
configuration (network, epochs, seed, sizes, intensity, defence) and the library versions, so the clean baseline is
trained once and reused for every protector.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from monai_umed.data.formats import atomic_path, file_sha256
from monai_umed.errors import InputError
from monai_umed.evaluation.defences import Defence, get_defence, pgd_attack
from monai_umed.evaluation.metrics import dice_per_class, summarise_dice
from monai_umed.networks.victims import VICTIMS, default_victim_params, patch_size, victim_network

if TYPE_CHECKING:
    from monai.data import DataLoader

__all__ = [
    "VictimConfig",
    "find_dataset_json",
    "load_split",
    "describe_data",
    "make_config",
    "train_transforms",
    "eval_transforms",
    "cudnn_benchmark",
    "train_victim",
    "evaluate_victim",
    "victim_cache_key",
    "default_cache_dir",
    "resolve_device",
    "resolve_threads",
    "CACHE_FORMAT",
]

#: bump when the training recipe changes, so stale cached victims are not reused
CACHE_FORMAT = 2


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available, CPU otherwise."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_threads(threads: int | str | None = "auto") -> int:
    """CPU threads for torch: an explicit number, or ``auto``/None.

    ``auto`` takes the cores that other processes leave idle (``os.cpu_count()`` minus the 1-minute load
    average, at least 1, at most torch's default): on a shared machine, oversubscribed OpenMP threads make
    convolutions several times slower than a single thread.
    """
    if threads not in (None, "auto"):
        n = int(threads)
        if n < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        return n
    default = torch.get_num_threads()
    try:
        idle = (os.cpu_count() or 1) - int(round(os.getloadavg()[0]))
    except OSError:  # no load average on this platform
        return default
    return max(1, min(default, idle))


def default_cache_dir() -> Path:
    """``$MONAI_UMED_CACHE/victims`` or ``~/.cache/monai-umed/victims``."""
    root = os.environ.get("MONAI_UMED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "monai-umed")
    return Path(root) / "victims"


@dataclass
class VictimConfig:
    """Everything that defines a victim's training (recorded in reports, part of the cache key).

    Attributes:
        victim: one of :data:`~monai_umed.networks.victims.VICTIMS`.
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: classes including background.
        patch_size: training crop and sliding-window ROI.
        image_size: the size the victim resizes every image to, or None to keep native sizes.
        epochs: passes over the training list.
        batch_size: cases per batch.
        num_samples: crops per case per pass (``RandCropByPosNegLabeld``).
        lr: Adam learning rate.
        seed: seeds weights, shuffling and augmentation.
        intensity: ``scale`` (min/max to [0, 1]), ``zscore``, ``percentile`` (0.5/99.5 -> [0, 1]) or ``none``.
        victim_params: network constructor parameters.
        defence: the defence's ``to_dict()``.
        sw_overlap: sliding-window overlap at inference.
        augment: the random flips and rotations of the recipe (and the defence's augmentation); ``False`` for the
            paper protocol, whose victim sees the protected images exactly as generated.
    """

    victim: str
    spatial_dims: int
    in_channels: int
    num_classes: int
    patch_size: tuple[int, ...]
    image_size: tuple[int, ...] | None
    epochs: int
    batch_size: int
    num_samples: int
    lr: float
    seed: int
    intensity: str
    victim_params: dict[str, Any] = field(default_factory=dict)
    defence: dict[str, Any] = field(default_factory=lambda: {"name": "none", "params": {}, "label": "none"})
    sw_overlap: float = 0.25
    augment: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["image_size"] = None if self.image_size is None else list(self.image_size)
        return d

    def get_defence(self) -> Defence:
        return Defence(self.defence["name"], dict(self.defence["params"]))


def find_dataset_json(dataset: str | os.PathLike) -> Path:
    """The ``dataset.json`` of an MSD-style dataset given as the file or its folder.

    Raises:
        InputError: no such file.
    """
    p = Path(dataset)
    j = p / "dataset.json" if p.is_dir() else p
    if not j.is_file():
        raise InputError("no dataset.json (expected an MSD-style dataset folder)", str(p))
    return j


def load_split(dataset: str | os.PathLike, key: str) -> list[dict[str, str]]:
    """The ``key`` list (``training``, ``test``, ...) of a dataset, with absolute paths.

    Raises:
        InputError: no dataset.json, no such list, or entries without ``image`` and ``label``.
    """
    from monai.data import load_decathlon_datalist

    j = find_dataset_json(dataset)
    with open(j) as f:
        meta = json.load(f)
    if not isinstance(meta.get(key), list) or not meta[key]:
        raise InputError(f"dataset.json has no (or an empty) {key!r} list", str(j))
    items = load_decathlon_datalist(str(j), is_segmentation=True, data_list_key=key, base_dir=str(j.parent))
    for n, it in enumerate(items):
        if not isinstance(it, dict) or "image" not in it or "label" not in it:
            raise InputError(f"entry {n} of {key!r} needs both 'image' and 'label'", str(j))
    return [{"image": str(it["image"]), "label": str(it["label"])} for it in items]


def _read(path: str) -> np.ndarray:
    from monai_umed.evaluation.metrics import read_native

    return read_native(path)


def describe_data(
    dataset: str | os.PathLike, train_list: Sequence[dict[str, str]], image_size: Sequence[int] | None
) -> dict[str, Any]:
    """Channels, spatial dims, classes and image shapes of a training list.

    Classes come from the ``labels`` map of dataset.json when present, otherwise from the largest label value.

    Raises:
        InputError: unreadable files, images of mixed dimensionality or channel count, labels outside the classes.
    """
    first = _read(train_list[0]["image"])
    spatial_dims, channels = first.ndim - 1, first.shape[0]
    if spatial_dims not in (2, 3):
        raise InputError(f"expected a 2D or 3D image, got shape {first.shape}", train_list[0]["image"])
    with open(find_dataset_json(dataset)) as f:
        meta = json.load(f)
    labels_meta = meta.get("labels")
    num_classes = len(labels_meta) if isinstance(labels_meta, dict) and len(labels_meta) >= 2 else None
    shapes: list[tuple[int, ...]] = []
    need_shapes = image_size is None
    need_max = num_classes is None
    max_label = 0
    if need_shapes or need_max:
        for it in train_list:
            if need_shapes:
                img = _read(it["image"])
                if img.ndim - 1 != spatial_dims or img.shape[0] != channels:
                    raise InputError(f"image shape {img.shape} differs in dimensionality or channels from the first "
                                     f"training image {first.shape}", it["image"])
                shapes.append(tuple(int(s) for s in img.shape[1:]))
            if need_max:
                max_label = max(max_label, int(np.max(_read(it["label"]))))
    if image_size is not None:
        shapes = [_image_size(image_size, spatial_dims)]
    if num_classes is None:
        num_classes = max(2, max_label + 1)
    return {"spatial_dims": spatial_dims, "in_channels": int(channels), "num_classes": int(num_classes),
            "shapes": shapes}


def _image_size(image_size: int | Sequence[int] | None, spatial_dims: int) -> tuple[int, ...] | None:
    if image_size is None:
        return None
    s = [int(image_size)] if isinstance(image_size, (int, np.integer)) else [int(v) for v in image_size]
    if len(s) == 1:
        s = s * spatial_dims
    if len(s) != spatial_dims or min(s) < 1:
        raise ValueError(f"image_size {image_size} does not fit {spatial_dims}D images")
    return tuple(s)


def make_config(
    victim: str,
    info: dict[str, Any],
    epochs: int,
    seed: int = 0,
    image_size: int | Sequence[int] | None = None,
    defence: Defence | None = None,
    batch_size: int | None = None,
    num_samples: int | None = None,
    lr: float | None = None,
    intensity: str = "auto",
    victim_params: dict[str, Any] | None = None,
    patch: Sequence[int] | None = None,
    max_patch: int | None = None,
    augment: bool = True,
) -> VictimConfig:
    """Fill a :class:`VictimConfig` from :func:`describe_data` and the user's choices (None = default).

    Defaults: batch 16 cases in 2D and 4 cases x 2 crops in 3D; Adam lr 5e-4 for ``swinunetr`` and 1e-3 for the
    convolutional victims; the patch from :func:`~monai_umed.networks.victims.patch_size` (at most 96 per axis in 3D).

    Raises:
        ValueError: unknown victim or intensity, bad sizes or epochs.
    """
    if victim not in VICTIMS:
        raise ValueError(f"unknown victim {victim!r}; choose one of {', '.join(VICTIMS)}")
    if int(epochs) < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    sd = info["spatial_dims"]
    d = defence or get_defence("none")
    if intensity == "auto":  # the defence's recipe first (nnU-Net z-scores), else min/max in 2D, z-score in 3D
        intensity = d.intensity or ("scale" if sd == 2 else "zscore")
    if intensity not in ("scale", "zscore", "percentile", "none"):
        raise ValueError(f"unknown intensity scaling {intensity!r} (auto, scale, zscore, percentile, none)")
    size = _image_size(image_size, sd)
    params = {**default_victim_params(victim), **(victim_params or {})}
    shapes = [size] if size is not None else info["shapes"]
    if patch is None:
        patch = patch_size(victim, shapes, params, max_size=max_patch if max_patch else (None if sd == 2 else 96))
    else:
        patch = tuple(int(p) for p in patch)
        if len(patch) != sd:
            raise ValueError(f"patch {patch} does not fit {sd}D images")
    return VictimConfig(
        victim=victim,
        spatial_dims=sd,
        in_channels=info["in_channels"],
        num_classes=info["num_classes"],
        patch_size=tuple(int(p) for p in patch),
        image_size=size,
        epochs=int(epochs),
        batch_size=int(batch_size or (16 if sd == 2 else 4)),
        num_samples=int(num_samples or (1 if sd == 2 else 2)),
        lr=float(lr if lr is not None else (5e-4 if victim == "swinunetr" else 1e-3)),
        seed=int(seed),
        intensity=intensity,
        victim_params=params,
        defence=d.to_dict(),
        augment=bool(augment),
    )


def _intensity(cfg: VictimConfig, key: str = "image") -> list:
    from monai.transforms import NormalizeIntensityd, ScaleIntensityd, ScaleIntensityRangePercentilesd

    if cfg.intensity == "scale":
        return [ScaleIntensityd(key, minv=0.0, maxv=1.0)]
    if cfg.intensity == "zscore":
        return [NormalizeIntensityd(key, channel_wise=True)]
    if cfg.intensity == "percentile":
        return [ScaleIntensityRangePercentilesd(key, lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True,
                                                channel_wise=True)]
    return []


def _load(keys: Sequence[str]) -> list:
    from monai.transforms import LoadImaged

    # dtype=None keeps the file's dtype so the defences see the stored values (JPEG re-encodes uint8 as is)
    return [LoadImaged(list(keys), image_only=True, dtype=None, ensure_channel_first=True)]


def _resize(cfg: VictimConfig, keys: Sequence[str]) -> list:
    from monai.transforms import Resized

    if cfg.image_size is None:
        return []
    modes = tuple("nearest" if k == "label" else ("bilinear" if cfg.spatial_dims == 2 else "trilinear") for k in keys)
    aa = tuple(k != "label" for k in keys)
    return [Resized(list(keys), spatial_size=cfg.image_size, mode=modes, anti_aliasing=aa)]


def _in_memory(items: Sequence[dict[str, Any]]) -> bool:
    """Whether a training list holds arrays (paper protocol) rather than file paths."""
    return bool(items) and not isinstance(items[0]["image"], (str, os.PathLike))


def train_transforms(cfg: VictimConfig, in_memory: bool = False, device: str | torch.device | None = None):
    """The victim's training pipeline (a MONAI ``Compose``), defence included.

    Args:
        cfg: the victim configuration.
        in_memory: the items hold channel-first arrays instead of file paths (nothing to load).
        device: move the padded tensors to this device right before the first random transform, so that a
            ``CacheDataset`` keeps them there and the random transforms run on that device; None keeps them on the
            CPU. Either way the transforms draw the same random numbers (from their own ``RandomState``).
    """
    from monai.transforms import (
        Compose,
        EnsureTyped,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandRotate90d,
        RandRotated,
        SpatialPadd,
    )

    d = cfg.get_defence()
    keys = ["image", "label"]
    t = ([] if in_memory else _load(keys)) + d.preprocess("image")
    t += [EnsureTyped("image", dtype=torch.float32), EnsureTyped("label", dtype=torch.int64)]
    t += _resize(cfg, keys) + _intensity(cfg)
    t += [
        EnsureTyped("image", dtype=torch.float32, track_meta=False),
        EnsureTyped("label", dtype=torch.int64, track_meta=False),
        SpatialPadd(keys, spatial_size=cfg.patch_size),
    ]
    if device is not None:  # the last cached transform: the cache, and so every random transform, lives there
        t += [EnsureTyped(keys, device=torch.device(device), track_meta=False)]
    t += [
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=cfg.patch_size, pos=1, neg=1,
                               num_samples=cfg.num_samples, image_key="image", image_threshold=-np.inf),
    ]
    if not cfg.augment:
        return Compose(t)
    t += [RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(cfg.spatial_dims)]
    square = [(i, j) for i in range(cfg.spatial_dims) for j in range(i + 1, cfg.spatial_dims)
              if cfg.patch_size[i] == cfg.patch_size[j]]
    if square:  # 90-degree rotations keep the batch shape only in a square plane
        t += [RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=square[0])]
    else:
        t += [RandRotated(keys, range_x=np.pi / 12, prob=0.5, keep_size=True, mode=("bilinear", "nearest"))]
    t += d.augment(cfg.spatial_dims)
    return Compose(t)


def eval_transforms(cfg: VictimConfig):
    """The victim's inference preprocessing of a test image (defence filters only when ``at_test``)."""
    from monai.transforms import Compose, EnsureTyped

    d = cfg.get_defence()
    t = _load(["image"]) + (d.preprocess("image") if d.at_test else [])
    t += [EnsureTyped("image", dtype=torch.float32)] + _resize(cfg, ["image"]) + _intensity(cfg)
    t += [EnsureTyped("image", dtype=torch.float32, track_meta=False)]
    return Compose(t)


@contextmanager
def cudnn_benchmark(device: str | torch.device) -> Iterator[None]:
    """Turn on ``torch.backends.cudnn.benchmark`` inside the block when ``device`` is CUDA, restoring it afterwards.

    The victim's network always sees patch-sized inputs (training crops, sliding windows), so cuDNN's autotuning is
    paid once per shape and then reused; on other devices nothing changes.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def victim_cache_key(train_list: Sequence[dict[str, str]], cfg: VictimConfig) -> str:
    """Content hash of (training image and label bytes in list order, victim configuration, versions); arrays
    (paper protocol) are hashed by dtype, shape and bytes."""
    import monai

    import monai_umed

    def digest(v: Any) -> str:
        if isinstance(v, (str, os.PathLike)):
            return file_sha256(v)
        a = np.ascontiguousarray(np.asarray(v))
        return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()

    h = hashlib.sha256()
    for it in train_list:
        h.update(digest(it["image"]).encode())
        h.update(digest(it["label"]).encode())
    extra = {
        "config": cfg.to_dict(),
        "versions": {"torch": torch.__version__, "monai": monai.__version__, "monai_umed": monai_umed.__version__},
        "format": CACHE_FORMAT,
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _save_atomic(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _fast(dev: torch.device, fast: bool | None) -> bool:
    """``fast=None`` (auto): the on-device data path on CUDA only."""
    return dev.type == "cuda" if fast is None else bool(fast)


def _train_loader(train_list: Sequence[dict[str, Any]], cfg: VictimConfig, dev: torch.device, fast: bool) -> DataLoader:
    """The victim's shuffled training batches: deterministic transforms cached once, random ones at every draw.

    ``fast``: the cache ends with the tensors on ``dev`` and a ``ThreadDataLoader`` applies the random transforms
    there, in one background thread while the network trains; otherwise a plain ``DataLoader`` applies them on the
    CPU in the calling thread. Both make the same draws in the same order: the transforms draw from their own
    ``RandomState`` whatever the tensors' device, MONAI's ``DataLoader`` (which ``ThreadDataLoader`` extends) reseeds
    them from ``cfg.seed``'s generator, and a single thread applies them one sample after the other, in the
    sampler's order.
    """
    from monai.data import CacheDataset, DataLoader, ThreadDataLoader

    transform = train_transforms(cfg, in_memory=_in_memory(train_list), device=dev if fast else None)
    ds = CacheDataset(list(train_list), transform, cache_rate=1.0, num_workers=0, progress=False)
    transform.set_random_state(seed=cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    loader_cls = ThreadDataLoader if fast else DataLoader
    return loader_cls(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=0, generator=g, drop_last=False)


def train_victim(
    train_list: Sequence[dict[str, str]],
    cfg: VictimConfig,
    device: str | torch.device = "auto",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
    description: str = "victim",
    fast: bool | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train (or load from the cache) a victim on the files of ``train_list``.

    Args:
        train_list: ``{"image", "label"}`` dicts with absolute paths, or with channel-first arrays (the paper
            protocol's in-memory float images).
        cfg: the victim configuration.
        device: ``auto`` | ``cpu`` | ``cuda``.
        cache_dir: where trained victims are kept (:func:`default_cache_dir` when None).
        use_cache: reuse and store weights under :func:`victim_cache_key`.
        progress: show a progress bar over epochs.
        description: progress bar label.
        fast: the on-device data path (training cache on ``device``, ``ThreadDataLoader``, random transforms on
            the device); None: on CUDA only. It draws the same samples as the CPU path, so it is not part of the
            cache key.

    Returns:
        ``(model in eval mode, info)`` where info holds ``cache_key``, ``cached`` (loaded rather than trained),
        ``train_seconds``, ``load_seconds``, ``epoch_seconds``, ``loss`` (mean per epoch) and ``fast``.
    """
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    dev = resolve_device(device)
    key = victim_cache_key(train_list, cfg) if use_cache else None
    path = Path(cache_dir or default_cache_dir()) / f"{key}.pt" if key else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = victim_network(cfg.victim, cfg.spatial_dims, cfg.in_channels, cfg.num_classes, **cfg.victim_params)
    model = model.to(dev)
    if path is not None and path.is_file():
        state = torch.load(path, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
        model.eval()
        return model, {**state["info"], "cached": True, "cache_key": key, "cache_file": str(path)}

    set_determinism(seed=cfg.seed)
    fast = _fast(dev, fast)
    t0 = time.perf_counter()
    loader = _train_loader(train_list, cfg, dev, fast)
    load_seconds = time.perf_counter() - t0
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    amp = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    d = cfg.get_defence()
    adv_gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses, epoch_seconds = [], []
    bar = range(cfg.epochs)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=description, unit="epoch", leave=False)
    with cudnn_benchmark(dev):
        for _ in bar:
            te = time.perf_counter()
            model.train()
            total, n = 0.0, 0
            for batch in loader:
                x, y = batch["image"].to(dev), batch["label"].to(dev)  # no-ops on the fast path
                if d.adversarial:
                    with torch.autocast(dev.type, enabled=amp):
                        x = pgd_attack(model, loss_fn, x, y, d.params["eps"], d.params["steps"], d.params["alpha"],
                                       adv_gen)
                opt.zero_grad(set_to_none=True)
                with torch.autocast(dev.type, enabled=amp):
                    loss = loss_fn(model(x), y)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                total += float(loss.detach()) * x.shape[0]
                n += x.shape[0]
            losses.append(total / max(n, 1))
            epoch_seconds.append(time.perf_counter() - te)
            if progress:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    info = {
        "train_seconds": float(sum(epoch_seconds)),
        "load_seconds": float(load_seconds),
        "epoch_seconds": [float(s) for s in epoch_seconds],
        "loss": [float(v) for v in losses],
        "cases": len(train_list),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "fast": fast,
    }
    if path is not None:
        _save_atomic({"model": model.state_dict(), "info": info, "config": cfg.to_dict()}, path)
    return model, {**info, "cached": False, "cache_key": key, "cache_file": None if path is None else str(path)}


def _test_case(it: dict[str, str], prep: Callable, cfg: VictimConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A test case's preprocessed image (``C x spatial``) and native label (``1 x spatial`` int64), checked.

    Raises:
        InputError: the label is not a 1-channel map of the victim's classes, or the image's channels differ.
    """
    from monai_umed.evaluation.metrics import read_native

    label = torch.as_tensor(read_native(it["label"]).astype(np.int64))
    if label.ndim - 1 != cfg.spatial_dims or label.shape[0] != 1:
        raise InputError(f"label shape {tuple(label.shape)} is not a 1-channel {cfg.spatial_dims}D map", it["label"])
    if int(label.max()) >= cfg.num_classes or int(label.min()) < 0:
        raise InputError(f"label values outside 0..{cfg.num_classes - 1}", it["label"])
    x = prep({"image": it["image"]})["image"]
    if x.shape[0] != cfg.in_channels:
        raise InputError(f"test image has {x.shape[0]} channel(s); the victim was trained on {cfg.in_channels}",
                         it["image"])
    return x, label


def _case_groups(
    items: Iterable[dict[str, str]], prep: Callable, cfg: VictimConfig, cases: int
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Consecutive test cases in groups of at most ``cases`` whose preprocessed images share one shape (all of them
    when the victim resizes), read one case at a time so that only a group is held."""
    group: list[tuple[torch.Tensor, torch.Tensor]] = []
    for it in items:
        x, label = _test_case(it, prep, cfg)
        if group and (len(group) == cases or group[0][0].shape != x.shape):
            yield group
            group = []
        group.append((x, label))
    if group:
        yield group


@torch.no_grad()
def evaluate_victim(
    model: torch.nn.Module,
    test_list: Sequence[dict[str, str]],
    cfg: VictimConfig,
    device: str | torch.device = "auto",
    keep: int = 0,
    progress: bool = False,
    batch_cases: int | None = None,
    sw_batch_size: int | None = None,
) -> dict[str, Any]:
    """Dice of a victim on clean test images, at each label's native resolution.

    Args:
        model: the trained victim.
        test_list: ``{"image", "label"}`` dicts with absolute paths (clean files).
        cfg: the configuration the victim was trained with (preprocessing, patch).
        device: ``auto`` | ``cpu`` | ``cuda``.
        keep: keep the predicted label maps of the first ``keep`` cases (for figures).
        progress: show a progress bar.
        batch_cases: consecutive test cases of the same preprocessed shape forwarded in one sliding-window call;
            None: 8 on CUDA, 1 otherwise. The model is in eval mode, so a case's prediction does not depend on the
            others in its batch.
        sw_batch_size: windows per forward pass; None: 32 on CUDA, 4 otherwise.

    Returns:
        ``dice`` (mean over cases and foreground classes), ``dice_per_class``, ``per_case`` (list of per-class
        lists, ``None`` for classes absent from a case), ``predictions`` (the kept ``1 x spatial`` int arrays) and
        ``seconds``.

    Raises:
        InputError: a label that is not a 1-channel map of the victim's classes, a test image with other channels.
    """
    from monai.inferers import sliding_window_inference

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    batch_cases = int(batch_cases or (8 if cuda else 1))
    sw_batch_size = int(sw_batch_size or (32 if cuda else 4))
    model = model.to(dev).eval()
    prep = eval_transforms(cfg)
    mode = "bilinear" if cfg.spatial_dims == 2 else "trilinear"
    t0 = time.perf_counter()
    per_case, preds = [], []
    items = list(test_list)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="evaluate", unit="case", leave=False)
    with cudnn_benchmark(dev):
        for group in _case_groups(items, prep, cfg, batch_cases):
            x = torch.stack([g[0] for g in group]).to(dev)
            with torch.autocast(dev.type, enabled=cuda):
                logits = sliding_window_inference(x, roi_size=cfg.patch_size, sw_batch_size=sw_batch_size,
                                                  predictor=model, overlap=cfg.sw_overlap)
            logits = logits.float()
            for i, (_, label) in enumerate(group):
                case = logits[i : i + 1]
                if tuple(case.shape[2:]) != tuple(label.shape[1:]):
                    case = F.interpolate(case, size=tuple(label.shape[1:]), mode=mode, align_corners=False)
                pred = case.argmax(1).cpu()  # 1 x spatial
                dice = dice_per_class(pred, label, cfg.num_classes)
                per_case.append([None if not np.isfinite(v) else float(v) for v in dice])
                if len(preds) < keep:
                    preds.append(pred.numpy().astype(np.int16))
    arr = np.array([[np.nan if v is None else v for v in row] for row in per_case], dtype=np.float64)
    return {**summarise_dice(arr), "per_case": per_case, "predictions": preds, "seconds": time.perf_counter() - t0}
