"""Labelled images for calibration, selection and evaluation: an ImageFolder directory, a saved Hugging Face
``datasets`` folder, or a hub image data set (``hf:NAME``).

An ImageFolder directory holds one sub-folder per class (sorted names are the class indices, as
``torchvision.datasets.ImageFolder`` numbers them), or ``train/`` and ``val/`` (or ``validation/``, ``test/``)
folders that do. Images are decoded with PIL and preprocessed by the model's own transform
(:func:`atprune.vision.models.load_classifier`) only when a batch is drawn, so an evaluation set never has to fit in
memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from atprune.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_FOLDERS = {"train": ("train",), "validation": ("val", "validation", "valid"), "test": ("test", "val",
                                                                                           "validation")}
TEXT_NAMES = ("c4", "wikitext2", "wikitext-2", "wikitext")
TEXT_SUFFIXES = (".txt", ".raw", ".jsonl", ".json", ".gz", ".parquet")


@dataclass
class ImageSet:
    """``len`` labelled images; ``get(i)`` returns image i (a PIL image, or an already preprocessed
    ``[C, H, W]`` float tensor) and ``labels[i]`` its class index."""

    name: str
    labels: list[int]
    get: Callable[[int], object]
    classes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices, transform: Callable | None = None) -> torch.Tensor:
        """``[len(indices), C, H, W]`` float images, each ``transform(get(i))`` (default: ``get(i)`` as is)."""
        items = [self.get(int(i)) for i in indices]
        return torch.stack([transform(x) if transform is not None else x for x in items])

    def batches(self, transform: Callable | None, batch_size: int, limit: int | None = None, seed: int = 0
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images [b, C, H, W], labels [b] int64)`` over all images in order, or with ``limit`` over a seeded
        random subset of ``limit`` images (in index order), so that a class-sorted folder is not cut to its first
        classes."""
        order = list(range(len(self)))
        if limit is not None and limit < len(self):
            pick = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:limit]
            order = sorted(int(i) for i in pick)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield self.load(idx, transform), torch.tensor([self.labels[i] for i in idx], dtype=torch.long)


def from_tensors(images: torch.Tensor, labels: torch.Tensor, name: str = "tensors") -> ImageSet:
    """An :class:`ImageSet` of preprocessed ``images`` ``[n, C, H, W]`` float and ``labels`` ``[n]`` int."""
    if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels):
        raise ConfigError(f"images must be [n, C, H, W] with n labels, got {tuple(images.shape)} and "
                          f"{tuple(labels.shape)}")
    return ImageSet(name, [int(v) for v in labels], lambda i: images[i], info={"dataset": name, "images": len(labels)})


def is_text_spec(spec: str) -> bool:
    """Whether ``spec`` names text data (a named text set or a text file), never images."""
    s = str(spec).lower()
    return s in TEXT_NAMES or (Path(spec).is_file() and s.endswith(TEXT_SUFFIXES))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def looks_like_images(spec: str | None) -> bool:
    """Whether ``spec`` is image data: ``hf:NAME``, a saved ``datasets`` folder with an image column is not opened
    here, so only ImageFolder directories (class folders with image files, directly or under split folders) and
    single image files count."""
    if not spec:
        return False
    path = Path(spec).expanduser()
    if path.is_file():
        return path.suffix.lower() in IMAGE_SUFFIXES
    if not path.is_dir():
        return str(spec).startswith("hf:")
    for base in [path] + [path / n for names in SPLIT_FOLDERS.values() for n in names if (path / n).is_dir()]:
        dirs = _class_dirs(base)
        if dirs and any(p.suffix.lower() in IMAGE_SUFFIXES for p in dirs[0].iterdir()):
            return True
    return False


def _split_folder(path: Path, split: str) -> Path:
    """``path/<split>`` when it holds class folders; ``path`` itself when it has no split folders.

    Raises:
        ConfigError: ``path`` holds split folders (train/, val/...) but not the one asked for (its split folders
            would otherwise be read as classes).
    """
    for name in SPLIT_FOLDERS.get(split, (split,)):
        if (path / name).is_dir() and _class_dirs(path / name):
            return path / name
    splits = sorted(n for names in SPLIT_FOLDERS.values() for n in names if (path / n).is_dir())
    if splits:
        wanted = "/".join(SPLIT_FOLDERS.get(split, (split,)))
        raise ConfigError(f"image folder {path} has split folders ({', '.join(splits)}) but no {wanted}/ with class "
                          "folders for this use; give the split folder itself or add it")
    return path


def _image_folder(path: Path, split: str) -> ImageSet:
    base = _split_folder(path, split)
    classes = _class_dirs(base)
    if not classes:
        raise ConfigError(f"image folder {path} has no class sub-folders: an ImageFolder directory holds one folder "
                          f"of images per class (or train/ and val/ folders that do)")
    files, labels = [], []
    for c, folder in enumerate(classes):
        found = _images_in(folder)
        files += found
        labels += [c] * len(found)
    if not files:
        raise ConfigError(f"image folder {base} has class folders but no images ({', '.join(IMAGE_SUFFIXES)})")

    def get(i: int):
        from PIL import Image

        with Image.open(files[i]) as img:
            return img.convert("RGB")

    info = {"dataset": str(base), "split": split, "origin": "imagefolder", "images": len(files),
            "classes": len(classes)}
    return ImageSet(str(base), labels, get, [c.name for c in classes], info)


def _hf_dataset(ds, name: str, split: str) -> ImageSet:
    columns = ds.column_names
    image_col = next((c for c in ("image", "img", "pixel_values") if c in columns), None)
    label_col = next((c for c in ("label", "labels", "fine_label") if c in columns), None)
    if image_col is None or label_col is None:
        raise ConfigError(f"data set {name} ({split}) has columns {columns}; an image data set needs an image "
                          "column (image/img) and a label column (label/labels)")

    def get(i: int):
        img = ds[i][image_col]
        return img.convert("RGB") if hasattr(img, "convert") else img

    feature = ds.features.get(label_col)
    classes = list(getattr(feature, "names", []) or [])
    info = {"dataset": name, "split": split, "origin": "datasets", "images": len(ds), "classes": len(classes) or None}
    return ImageSet(name, [int(v) for v in ds[label_col]], get, classes, info)


def open_images(spec: str, split: str = "train") -> ImageSet:
    """The images of ``spec`` for ``split`` (``train``, ``validation``, ``test``).

    ``spec``: an ImageFolder directory (see the module docstring), a folder written by ``datasets``'
    ``save_to_disk`` (a ``DatasetDict``: the split is taken from it), or ``hf:NAME`` (``datasets.load_dataset``;
    needs the hub or its cache).

    Raises:
        ConfigError: text data, a missing path, a folder without class sub-folders or images, a data set without
            image and label columns or without the split.
    """
    if is_text_spec(spec):
        raise ConfigError(f"{spec!r} is text data; an image model needs images: an ImageFolder directory (one folder "
                          "per class), a saved datasets folder or hf:NAME")
    if str(spec).startswith("hf:"):
        import datasets

        name = spec[3:]
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as err:  # datasets raises many types for a missing set / split / no network
            raise ConfigError(f"cannot load image data set {name!r} split {split!r}: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        return _hf_dataset(ds, spec, split)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ConfigError(f"image data not found: {spec} (give an ImageFolder directory, a saved datasets folder or "
                          "hf:NAME)")
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            names = [n for n in SPLIT_FOLDERS.get(split, (split,)) + (split,) if n in ds]
            if not names:
                raise ConfigError(f"data set {spec} has splits {list(ds)}, none for {split!r}")
            ds = ds[names[0]]
        return _hf_dataset(ds, str(path), split)
    return _image_folder(path, split)


def draw(n_items: int, counts: tuple[int, ...], seed: int) -> list[list[int]]:
    """Disjoint seeded random index lists of the given ``counts`` from ``range(n_items)`` (one permutation by a
    ``torch.Generator`` seeded with ``seed``, cut in order): calibration first, then selection.

    Wanda (``image_classifiers/main.py``) draws its 4096 calibration images with ``np.random.choice`` with
    replacement; atprune draws without, so that selection images can be disjoint from them.

    Raises:
        ConfigError: more images asked for than there are.
    """
    if sum(counts) > n_items:
        raise ConfigError(f"asked for {' + '.join(map(str, counts))} images, the data has {n_items}")
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed)).tolist()
    out, start = [], 0
    for c in counts:
        out.append(order[start:start + c])
        start += c
    return out
