import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from dcbs.data import DataError, data_fingerprint, denormalize, get_dataset, load_data


def write_idx(folder, prefix, n, seed):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    with open(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes())
    with open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return imgs, labels


@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])
def test_torchvision_idx_files_in_raw_folder(tmp_path, name):
    raw = tmp_path / name / "raw"
    raw.mkdir(parents=True)
    imgs, labels = write_idx(raw, "train", 30, 0)
    write_idx(raw, "t10k", 20, 1)
    d = load_data(name, str(tmp_path))
    assert d.images_train.shape == (30, 1, 28, 28) and d.images_test.shape == (20, 1, 28, 28)
    assert d.class_counts == [3] * 10
    mean, std = (0.1307, 0.3081) if name == "MNIST" else (0.2861, 0.3530)
    assert torch.allclose(d.images_train[0, 0], (torch.tensor(imgs[0]).float() / 255 - mean) / std, atol=1e-5)
    assert d.fingerprint == data_fingerprint(imgs[:, None], labels.astype(np.int64))


def write_tree(root, classes, per_class, size=(32, 32), mode="RGB", order_seed=None):
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 256, size=(*size, 3) if mode == "RGB" else size, dtype=np.uint8)
                Image.fromarray(a, mode=mode).save(root / split / c / f"{i:05d}.png")


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_image_folder_tree_with_dataset_normalisation(tmp_path):
    write_tree(tmp_path, CIFAR_CLASSES, 3)
    d = load_data("CIFAR10", str(tmp_path))
    assert d.images_train.shape == (30, 3, 32, 32) and d.class_names == CIFAR_CLASSES
    png = np.asarray(Image.open(tmp_path / "train" / "airplane" / "00000.png"))
    expect = (torch.tensor(png).permute(2, 0, 1).float() / 255 - torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)) \
        / torch.tensor([0.2023, 0.1994, 0.2010]).view(3, 1, 1)
    assert torch.allclose(d.images_train[0], expect, atol=1e-5)
    back = denormalize(d.images_train[:1], d.mean, d.std)
    assert torch.allclose(back[0] * 255, torch.tensor(png).permute(2, 0, 1).float(), atol=1e-3)


def test_fingerprint_depends_on_order():
    x = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
    y = torch.arange(6)
    perm = torch.tensor([1, 0, 2, 3, 4, 5])
    assert data_fingerprint(x, y) == data_fingerprint(x.clone(), y.clone())
    assert data_fingerprint(x, y) != data_fingerprint(x[perm], y[perm])


def test_wrong_image_size_in_tree_is_refused(tmp_path):
    write_tree(tmp_path, CIFAR_CLASSES, 1, size=(28, 28))
    with pytest.raises(DataError, match="expects 32x32"):
        load_data("CIFAR10", str(tmp_path))


@pytest.mark.parametrize("name,needle", [("CIFAR10", "cifar-10-batches-py"), ("SVHN", "train_32x32.mat"),
                                         ("MNIST", "train-images-idx3-ubyte")])
def test_missing_dataset_says_what_was_looked_for(tmp_path, name, needle):
    with pytest.raises(DataError) as e:
        load_data(name, str(tmp_path / "nothing"))
    msg = str(e.value)
    assert needle in msg and "--data_path" in msg and "\n" not in msg


def test_digits_is_embedded_and_stratified(digits):
    assert digits.images_train.shape[1:] == (1, 28, 28)
    assert len(digits.labels_train) + len(digits.labels_test) == 1797
    assert max(digits.class_counts) < 256  # a class batch is the whole class
    assert abs(float(digits.images_train.mean())) < 1e-3  # normalised with its own train statistics
    assert load_data("digits").fingerprint == digits.fingerprint


def test_digits_without_sklearn_equals_sklearns_loader_and_split(monkeypatch):
    """Digits are read from sklearn's CSV with the stored split (no sklearn import): the same images,
    labels and split as sklearn's load_digits + train_test_split, which stay the fallback."""
    import importlib.util
    import subprocess
    import sys
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    import dcbs.data as data
    from conftest import ROOT
    fast = data._load_digits()
    d = load_digits()
    tr, te = train_test_split(np.arange(1797), test_size=0.3, stratify=d.target, random_state=0)
    images, target = data._digits_arrays()
    assert np.array_equal(images, d.images) and np.array_equal(target, d.target)
    assert [a.tolist() for a in data._digits_split(target)] == [sorted(tr), sorted(te)]
    monkeypatch.setattr(data, "_DIGITS_SPLIT", "/nonexistent")           # the fallback: sklearn's split
    assert [a.tolist() for a in data._digits_split(target)] == [sorted(tr), sorted(te)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # the fallback: sklearn's loader
    slow = data._load_digits()
    for a, b in zip(fast[:4], slow[:4]):
        assert torch.equal(a, b)
    code = "import sys; from dcbs.data import load_data; load_data('digits'); print('sklearn' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, DCBS_NO_DOWNLOAD="1"))
    assert r.returncode == 0 and r.stdout.split() == ["False"], r.stderr


def test_reference_get_dataset_signature():
    channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader = get_dataset("digits")
    assert (channel, tuple(im_size), num_classes) == (1, (28, 28), 10)
    assert len(dst_train) > len(dst_test) > 0 and len(class_names) == 10
