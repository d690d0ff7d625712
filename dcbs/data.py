"""Real datasets: loading, normalisation, per-class indices and the data fingerprint.

Every dataset is loaded once into memory as normalised float tensors
(``RealData``). Sources, tried in this order:

1. ``--data_path DIR`` holding ``train/<class>/*`` and ``test/<class>/*`` image
   folders (an ImageFolder tree such as ``/path/to/cifar10``); the dataset
   name still chooses the normalisation and the expected image shape;
2. torchvision's dataset classes under ``--data_path`` (downloaded when online);
3. ``digits``: scikit-learn's bundled 8x8 digits, upsampled to 28x28, which
   works offline anywhere.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DATASETS", "DatasetSpec", "RealData", "DataError", "load_data", "get_dataset",
           "data_fingerprint", "denormalize"]


class DataError(RuntimeError):
    """A dataset could not be found or read; the message says how to provide it."""


@dataclass(frozen=True)
class DatasetSpec:
    channel: int
    im_size: tuple
    num_classes: int
    mean: tuple
    std: tuple
    tv_name: str | None = None      # torchvision class name
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"


DATASETS = {
    "MNIST": DatasetSpec(1, (28, 28), 10, (0.1307,), (0.3081,), "MNIST",
                         dsa_strategy="color_crop_cutout_scale_rotate"),
    "FashionMNIST": DatasetSpec(1, (28, 28), 10, (0.2861,), (0.3530,), "FashionMNIST"),
    "SVHN": DatasetSpec(3, (32, 32), 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), "SVHN",
                        dsa_strategy="color_crop_cutout_scale_rotate"),
    "CIFAR10": DatasetSpec(3, (32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "CIFAR10"),
    "CIFAR100": DatasetSpec(3, (32, 32), 100, (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), "CIFAR100"),
    # mean/std of digits are computed on its train split at load time (filled in load_data)
    "digits": DatasetSpec(1, (28, 28), 10, (), (), None, dsa_strategy="color_crop_cutout_scale_rotate"),
}


@dataclass
class RealData:
    """A whole dataset in memory, images normalised with ``mean``/``std``."""
    name: str
    source: str
    channel: int
    im_size: tuple
    num_classes: int
    class_names: list
    mean: list
    std: list
    images_train: torch.Tensor
    labels_train: torch.Tensor
    images_test: torch.Tensor
    labels_test: torch.Tensor
    fingerprint: str
    indices_class: list = field(default_factory=list)

    def __post_init__(self):
        if not self.indices_class:
            self.indices_class = [torch.nonzero(self.labels_train == c).flatten()
                                  for c in range(self.num_classes)]

    @property
    def class_counts(self) -> list[int]:
        return [len(ix) for ix in self.indices_class]

    def to(self, device) -> "RealData":
        """Moves the image and label tensors to ``device`` (in place; returns self)."""
        for name in ("images_train", "labels_train", "images_test", "labels_test"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def data_fingerprint(images_uint8: torch.Tensor | np.ndarray, labels) -> str:
    """sha256 over decoded uint8 pixels (N, C, H, W) and int64 labels, in loader order.

    A cluster file made on one copy or ordering of a dataset is refused on another
    through this value.
    """
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(np.asarray(images_uint8, dtype=np.uint8)).tobytes())
    h.update(np.ascontiguousarray(np.asarray(labels, dtype=np.int64)).tobytes())
    return h.hexdigest()


def denormalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised images -> [0, 1] pixel range (clamped), for saving and viewing."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


def _normalize(u8: torch.Tensor, mean, std) -> torch.Tensor:
    x = u8.float().div_(255)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


# --------------------------------------------------------------------------- #
# sources
# --------------------------------------------------------------------------- #
_DIGITS_SPLIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_test_indices.txt")


def _digits_arrays():
    """sklearn's digits (1797 8x8 images, values 0-16) and labels, read from the CSV that sklearn ships
    without importing sklearn (its import costs ~2 s in every process); sklearn's loader otherwise."""
    import importlib.util
    spec = importlib.util.find_spec("sklearn")
    csv = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") if spec and spec.origin else ""
    if os.path.isfile(csv):
        data = np.loadtxt(csv, delimiter=",")          # what sklearn.datasets.load_digits reads
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images, d.target


def _digits_split(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stratified 70/30 split of train_test_split(random_state=0), from the stored test indices."""
    if len(target) == 1797 and os.path.isfile(_DIGITS_SPLIT):
        te = np.loadtxt(_DIGITS_SPLIT, dtype=np.int64).ravel()
        return np.setdiff1d(np.arange(len(target)), te), te
    from sklearn.model_selection import train_test_split
    tr, te = train_test_split(np.arange(len(target)), test_size=0.3, stratify=target, random_state=0)
    return np.sort(tr), np.sort(te)


def _load_digits():
    images, target = _digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    tr, te = _digits_split(target)
    y = torch.tensor(target, dtype=torch.long)
    names = [str(i) for i in range(10)]
    return u8[tr], y[tr], u8[te], y[te], names, "sklearn.datasets.load_digits (8x8 -> 28x28)"


def _image_folder_classes(split_dir: str) -> list[str]:
    """The class folders of one split, each checked to hold at least one image file."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise DataError(f"{split_dir} holds no class folders; an ImageFolder tree is "
                        f"{os.path.dirname(split_dir)}/{{train,test}}/<class>/<image>")
    for c in classes:
        folder = os.path.join(split_dir, c)
        if not any(f.lower().endswith(IMG_EXTENSIONS) for _, _, fs in os.walk(folder, followlinks=True) for f in fs):
            raise DataError(f"class folder {folder} holds no images ({', '.join(IMG_EXTENSIONS)}); every class "
                            f"folder needs at least one (remove the folder if it is not a class)")
    return classes


def _read_image(path: str, mode: str) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode), dtype=np.uint8)
    except Exception as e:  # UnidentifiedImageError, "image file is truncated", broken chunks ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{path} cannot be read as an image (truncated or corrupt: {type(e).__name__}: "
                        f"{msg[:200]}); replace or remove it") from None


def _read_image_folder(root: str, spec: DatasetSpec, name: str):
    from torchvision.datasets import ImageFolder
    out, classes = [], None
    for split in ("train", "test"):
        split_dir = os.path.join(root, split)
        found = _image_folder_classes(split_dir)
        if classes is not None and found != classes:
            only_train, only_test = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            raise DataError(f"{root}: test/ and train/ have other class folders (only in train/: "
                            f"{', '.join(only_train) or '-'}; only in test/: {', '.join(only_test) or '-'}); "
                            f"labels follow the sorted folder names, so both need the same classes")
        classes = found
        folder = ImageFolder(split_dir)
        mode = "L" if spec.channel == 1 else "RGB"
        arrs = []
        for path, _ in folder.samples:
            a = _read_image(path, mode)
            if a.shape[:2] != tuple(spec.im_size):
                raise DataError(f"{path}: image is {a.shape[1]}x{a.shape[0]}, but {name} expects "
                                f"{spec.im_size[1]}x{spec.im_size[0]}; resize the tree or choose the matching --dataset")
            arrs.append(a)
        u8 = torch.from_numpy(np.stack(arrs))
        u8 = u8.unsqueeze(1) if u8.ndim == 3 else u8.permute(0, 3, 1, 2)
        out += [u8.contiguous(), torch.tensor(folder.targets, dtype=torch.long)]
    if len(classes) != spec.num_classes:
        raise DataError(f"{root}: found {len(classes)} class folders, {name} has {spec.num_classes}")
    return (*out, classes, f"ImageFolder {os.path.abspath(root)}")


def _tv_expected_files(name: str) -> list[str]:
    return {
        "MNIST": ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/train-labels-idx1-ubyte",
                  "MNIST/raw/t10k-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"],
        "FashionMNIST": ["FashionMNIST/raw/train-images-idx3-ubyte", "FashionMNIST/raw/train-labels-idx1-ubyte",
                         "FashionMNIST/raw/t10k-images-idx3-ubyte", "FashionMNIST/raw/t10k-labels-idx1-ubyte"],
        "SVHN": ["train_32x32.mat", "test_32x32.mat"],
        "CIFAR10": ["cifar-10-batches-py/data_batch_1..5", "cifar-10-batches-py/test_batch"],
        "CIFAR100": ["cifar-100-python/train", "cifar-100-python/test"],
    }[name]


OFFLINE_HINT = "(--dataset digits, or --preset demo, runs with no download)"


def _download_dirs(root: str, cls) -> list[str]:
    """Folders a torchvision download may create: the root and, for the MNIST family, <root>/<Class>/raw."""
    dirs = [os.path.abspath(root)]
    if hasattr(cls, "mirrors"):   # MNIST, FashionMNIST, KMNIST, EMNIST, QMNIST keep files in <root>/<Class>/raw
        dirs += [os.path.join(dirs[0], cls.__name__), os.path.join(dirs[0], cls.__name__, "raw")]
    return dirs


def _remove_created_dirs(created: list[str]) -> None:
    """Removes the folders a failed download created, deepest first, only while they are empty."""
    for d in sorted(created, key=len, reverse=True):
        try:
            os.rmdir(d)
        except OSError:           # not empty (a partial file: left for the user to see) or already gone
            pass


def _load_torchvision(root: str, spec: DatasetSpec, name: str, download: bool = True):
    """torchvision's files under ``root``; a download creates ``root`` only when it is tried and removes
    the folders it made again when it fails."""
    import torchvision.datasets as tvd
    cls = getattr(tvd, spec.tv_name)

    def make(train: bool, download: bool):
        if name == "SVHN":
            return cls(root, split="train" if train else "test", download=download)
        return cls(root, train=train, download=download)

    def not_found(why: str) -> DataError:
        files = ", ".join(os.path.join(root, f) for f in _tv_expected_files(name))
        return DataError(
            f"{name} not found under {os.path.abspath(root)} and {why}. Looked for: {files}. "
            f"Either put those files there, or pass --data_path DIR with DIR/train/<class>/*.png and "
            f"DIR/test/<class>/*.png (an ImageFolder tree) {OFFLINE_HINT}.")

    splits = []
    for train in (True, False):
        try:
            ds = make(train, download=False)
        except RuntimeError:
            if not download:
                raise not_found("no download is tried into it") from None
            if os.environ.get("DCBS_NO_DOWNLOAD"):
                raise not_found("downloads are disabled (DCBS_NO_DOWNLOAD is set)") from None
            created = [d for d in _download_dirs(root, cls) if not os.path.isdir(d)]
            try:
                ds = make(train, download=True)
            except Exception as e:  # offline, blocked, corrupt archive ...
                _remove_created_dirs(created)
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise not_found(f"could not be downloaded ({type(e).__name__}: {msg})") from None
        splits.append(ds)
    out = []
    for ds in splits:
        if name == "SVHN":
            u8, y = torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64))
        else:
            data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(ds.data)
            u8 = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
            y = torch.as_tensor(ds.targets, dtype=torch.long)
        out += [u8.contiguous(), y]
    classes = [str(i) for i in range(10)] if name == "SVHN" else list(splits[0].classes)
    return (*out, classes, f"torchvision.datasets.{spec.tv_name} {os.path.abspath(root)}")


def load_data(dataset: str, data_path: str = "data") -> RealData:
    """Loads ``dataset`` fully into memory (CPU), normalised."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    spec = DATASETS[dataset]
    if dataset == "digits":
        xtr, ytr, xte, yte, names, source = _load_digits()
        mean = [round(float(xtr.float().div(255).mean()), 4)]
        std = [round(float(xtr.float().div(255).std()), 4)]
    else:
        splits = [s for s in ("train", "test") if os.path.isdir(os.path.join(data_path, s))]
        if len(splits) == 2:
            xtr, ytr, xte, yte, names, source = _read_image_folder(data_path, spec, dataset)
        else:
            try:  # never download into a folder that holds half an ImageFolder tree
                xtr, ytr, xte, yte, names, source = _load_torchvision(data_path, spec, dataset, download=not splits)
            except DataError:
                if not splits:
                    raise
                missing = "test" if splits == ["train"] else "train"
                raise DataError(f"{os.path.abspath(data_path)} has {splits[0]}/ but no {missing}/: an ImageFolder "
                                f"tree needs both train/<class>/<image> and test/<class>/<image> (the same class "
                                f"folders)") from None
        mean, std = list(spec.mean), list(spec.std)
    return RealData(name=dataset, source=source, channel=spec.channel, im_size=tuple(spec.im_size),
                    num_classes=spec.num_classes, class_names=list(names), mean=mean, std=std,
                    images_train=_normalize(xtr, mean, std), labels_train=ytr,
                    images_test=_normalize(xte, mean, std), labels_test=yte,
                    fingerprint=data_fingerprint(xtr, ytr))


def get_dataset(dataset: str, data_path: str = "data"):
    """The reference code's signature: channel, im_size, num_classes, class_names,
    mean, std, dst_train, dst_test, testloader."""
    from torch.utils.data import DataLoader, TensorDataset
    d = load_data(dataset, data_path)
    dst_train = TensorDataset(d.images_train, d.labels_train)
    dst_test = TensorDataset(d.images_test, d.labels_test)
    testloader = DataLoader(dst_test, batch_size=256, shuffle=False, num_workers=0)
    return d.channel, d.im_size, d.num_classes, d.class_names, d.mean, d.std, dst_train, dst_test, testloader
