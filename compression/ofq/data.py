"""Image data for ``gdpo ofq``, read as it is used: a small set (scikit-learn's digits) sits in memory,
an image folder or a datasets split is decoded one image at a time by loader workers, so ImageNet-1k
(1.28M images, ~771 GB as one float32 tensor at 224x224) streams instead of being stacked.

Every split yields ``(x [C, H, W] float32, normalized per channel, y int)``. The per-channel mean and
standard deviation are ``data.mean`` / ``data.std`` when given (the ImageNet preset gives the usual
ones), else estimated on the training split (all of it in memory, or ``data.stats_images`` images of a
streamed one, a seeded sample).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from gdpo.structured import ConfigError

__all__ = ["ImageSplit", "TensorImages", "FileImages", "HFImages", "open_splits", "batches"]

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageSplit(Dataset):
    """One split; ``mean``/``std`` [C, 1, 1] normalize each image (set once the statistics are known)."""

    mean: Optional[Tensor] = None
    std: Optional[Tensor] = None

    def raw(self, i: int) -> Tensor:  # [C, H, W] in [0, 1]
        raise NotImplementedError

    def label(self, i: int) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.raw(i)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x, self.label(i)


class TensorImages(ImageSplit):
    """A split already in memory: ``x`` [N, C, H, W] in [0, 1], ``y`` [N]."""

    def __init__(self, x: Tensor, y: Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def raw(self, i: int) -> Tensor:
        return self.x[i]

    def label(self, i: int) -> int:
        return int(self.y[i])

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """A whole batch by indexing (no per-image work)."""
        x = self.x[idx]
        return ((x - self.mean) / self.std if self.mean is not None else x), self.y[idx]


def _prep(img, size: int, channels: int) -> Tensor:
    import numpy as np
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
    a = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return a[None] if a.dim() == 2 else a.permute(2, 0, 1)


class FileImages(ImageSplit):
    """``root/<class>/<image>`` files, decoded when read."""

    def __init__(self, root: Path, size: int, channels: int, classes: Optional[Sequence[str]] = None):
        self.size, self.channels = size, channels
        self.classes = list(classes) if classes is not None else sorted(p.name for p in root.iterdir() if p.is_dir())
        self.files: list[tuple[str, int]] = []
        for ci, c in enumerate(self.classes):
            folder = root / c
            if not folder.is_dir():
                raise ConfigError(f"data.source: {root} has no class folder {c!r} (the training split has it)")
            self.files += [(str(f), ci) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not self.files:
            raise ConfigError(f"data.source: no images under {root}/<class>/ (suffixes {', '.join(IMAGE_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.files)

    def raw(self, i: int) -> Tensor:
        from PIL import Image

        path = self.files[i][0]
        try:
            with Image.open(path) as img:
                return _prep(img, self.size, self.channels)
        except OSError as err:
            raise ConfigError(f"data.source: cannot read image {path}: {err}") from None

    def label(self, i: int) -> int:
        return self.files[i][1]


class HFImages(ImageSplit):
    """A datasets split, each row decoded when read."""

    def __init__(self, ds, size: int, channels: int):
        self.ds, self.size, self.channels = ds, size, channels
        self.img_col = next((c for c in ds.column_names if c in ("image", "img")), None)
        self.lab_col = next((c for c in ds.column_names if c in ("label", "labels")), None)
        if self.img_col is None or self.lab_col is None:
            raise ConfigError(f"data.source: the dataset needs an image and a label column, has {ds.column_names}")

    def __len__(self) -> int:
        return len(self.ds)

    def raw(self, i: int) -> Tensor:
        return _prep(self.ds[i][self.img_col], self.size, self.channels)

    def label(self, i: int) -> int:
        return int(self.ds[i][self.lab_col])


def _digits(d, seed: int) -> tuple[TensorImages, TensorImages]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # [1797, 1, 8, 8]
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in y.unique():  # stratified split
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: round(len(idx) * d.test_fraction)]] = True
    if d.image_size != 8:
        x = F.interpolate(x, size=(d.image_size, d.image_size), mode="bilinear", align_corners=False)
    return TensorImages(x[~test], y[~test]), TensorImages(x[test], y[test])


def open_splits(d, seed: int) -> tuple[ImageSplit, ImageSplit]:
    """(train, test) for ``data.source``, normalized (see the module docstring); ``data.limit`` caps
    the training split."""
    if d.source == "digits":
        train, test = _digits(d, seed)
    elif d.source.startswith("imagefolder:"):
        root = Path(d.source[len("imagefolder:") :])
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise ConfigError(
                    f"data.source {d.source}: no {root / split} directory (expected PATH/{{train,val}}/<class>/)"
                )
        train = FileImages(root / "train", d.image_size, d.num_channels)
        test = FileImages(root / "val", d.image_size, d.num_channels, classes=train.classes)
    else:
        import datasets

        name, _, config = d.source[len("hf:") :].partition(":")
        train, test = (
            HFImages(datasets.load_dataset(name, config or None, split=s), d.image_size, d.num_channels)
            for s in ("train", "validation")
        )
    if d.limit and d.limit < len(train):
        train = _limited(train, d.limit)
    mean, std = _statistics(train, d, seed)
    for split in (train, test):
        split.mean, split.std = mean, std
    return train, test


def _limited(split: ImageSplit, n: int) -> ImageSplit:
    if isinstance(split, TensorImages):
        return TensorImages(split.x[:n], split.y[:n])
    if isinstance(split, FileImages):
        split.files = split.files[:n]
        return split
    split.ds = split.ds.select(range(n))
    return split


def _statistics(train: ImageSplit, d, seed: int) -> tuple[Tensor, Tensor]:
    if d.mean is not None:
        return torch.tensor(d.mean, dtype=torch.float32)[:, None, None], torch.tensor(d.std)[:, None, None]
    if isinstance(train, TensorImages):
        x = train.x
    else:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(train), generator=g)[: d.stats_images].tolist()
        x = torch.stack([train.raw(i) for i in pick])
    return x.mean(dim=(0, 2, 3))[:, None, None], x.std(dim=(0, 2, 3)).clamp_min(1e-6)[:, None, None]


def batches(
    split: ImageSplit, order: Tensor, batch_size: int, workers: int = 0, pin: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(x [B, C, H, W], y [B])`` on the CPU, in ``order``'s order, ``batch_size`` at a time: indexed
    directly for an in-memory split, decoded by ``workers`` loader processes otherwise."""
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if isinstance(split, TensorImages):
        for idx in chunks:
            yield split.take(idx)
        return
    loader = DataLoader(
        split,
        batch_sampler=[c.tolist() for c in chunks],
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=False,
    )
    for x, y in loader:
        yield x, y
