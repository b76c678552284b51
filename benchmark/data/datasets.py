"""Datasets held as normalised tensors in memory, with a per-class index.

Distillation samples per class constantly, so every dataset is loaded once into a `Dataset`: float32 tensors
(N, C, H, W) in normalised space (the references' mean/std: docs/reference-settings.md), int64 labels, and `class_indices[c]`, the training
indices of class c. Readers parse the original on-disk formats directly (IDX for MNIST/Fashion-MNIST, the pickled
batches for CIFAR, the .mat files for SVHN); torchvision is used only to download, when asked with download=True.

Registered: digits (embedded, scikit-learn), fashion-mnist, mnist, cifar10, cifar100, svhn.
"""
import gzip
import os
import pickle
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from benchmark.platform.errors import BenchmarkError, unknown_name
from benchmark.data import corruptions

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DEFAULT_DATA_ROOT = os.environ.get("IWD_DATA_ROOT", "data")


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # (N, C, H, W), normalised
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: tuple
    std: tuple
    class_names: List[str] = field(default_factory=list)

    def __post_init__(self):
        self.full_name = self.name                                      # name@corruption for corrupted copies
        self.corrupted = torch.zeros(len(self.y_train), dtype=torch.bool)  # benchmark.data.corruptions
        self.corruption = None
        self.num_classes = int(self.y_train.max().item()) + 1
        self.class_indices = [torch.nonzero(self.y_train == c).flatten() for c in range(self.num_classes)]
        self.source = None
        self._on_device = {}  # device -> the copy there (Dataset.on)
        self.host = self  # the copy on the CPU that `on(device)` copies are made from (labels read on the host)

    @property
    def channels(self):
        return self.x_train.shape[1]

    @property
    def image_size(self):
        return tuple(self.x_train.shape[2:])

    @property
    def spec(self):
        """The registered dataset's declared traits (flip, family, ...); a hand-made Dataset gets the defaults."""
        return _DATASETS.get(self.name) or DatasetSpec(self.name, self.channels, self.image_size[0],
                                                       self.num_classes, self.mean, self.std, None, "")

    @property
    def smallest_class(self):
        return min(len(ix) for ix in self.class_indices)

    def _stats(self, like):
        shape = (1, -1, 1, 1)
        m = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape)
        s = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape)
        return m, s

    def normalize(self, pixels):
        m, s = self._stats(pixels)
        return (pixels - m) / s

    def denormalize(self, x):
        m, s = self._stats(x)
        return x * s + m

    def sample_class(self, c, n, generator=None):
        """n random training indices of class c (without replacement; all of them if the class is smaller)."""
        ix = self.class_indices[c]
        perm = torch.randperm(len(ix), generator=generator)[:n]
        return ix[perm]

    def check_ipc(self, ipc):
        if ipc < 1:
            raise BenchmarkError(f"IPC must be at least 1 (got {ipc}).")
        if ipc > self.smallest_class:
            raise BenchmarkError(
                f"IPC {ipc} is larger than the smallest class of {self.name} ({self.smallest_class} training "
                f"images); choose --ipc <= {self.smallest_class}.")

    def on(self, device):
        """This dataset with its tensors on `device`, copied once and cached (the rule: a task's data lives on its
        device). class_indices stay on the CPU: indices are drawn from seeded CPU generators on every device, so
        the random streams do not depend on the device. Everything else (name, corruption marks) is shared."""
        device = str(device)
        if device == str(self.x_train.device):
            return self
        if device not in self._on_device:
            import copy
            moved = copy.copy(self)
            moved._on_device = {}
            for k in ("x_train", "y_train", "x_test", "y_test"):
                setattr(moved, k, getattr(self, k).to(device))
            moved.host = self
            self._on_device[device] = moved
        return self._on_device[device]

    def restrict(self, keep):
        """The same dataset with only the training indices `keep` (e.g. after pruning); the test split is kept."""
        import dataclasses
        host = self.host
        kept = dataclasses.replace(host, name=host.name, x_train=host.x_train[keep], y_train=host.y_train[keep])
        return kept.on(self.x_train.device)


# ----------------------------------------------------------------------------------------------------------------
# registry

@dataclass
class DatasetSpec:
    name: str
    channels: int
    size: int
    num_classes: int
    mean: tuple
    std: tuple
    loader: Callable
    how_to_get: str
    splits: tuple = (0, 0)  # (train, test) sizes of the original files: what `plan` sizes a suite by
    # declared traits (methods read these, never name lists): is a horizontal flip label-preserving (not for
    # digits), and the family the references tune by (mnist: 28 px grayscale digits/clothes; cifar; svhn)
    flip: bool = True
    family: str = ""


_DATASETS: Dict[str, DatasetSpec] = {}
_CACHE: Dict[tuple, Dataset] = {}


def register_dataset(name, channels, size, num_classes, mean, std, how_to_get="", splits=(0, 0), flip=True,
                     family=""):
    def deco(fn):
        _DATASETS[name] = DatasetSpec(name, channels, size, num_classes, tuple(mean), tuple(std), fn, how_to_get,
                                      tuple(splits), flip, family)
        return fn
    return deco


def list_datasets():
    return sorted(_DATASETS)


def dataset_spec(name) -> DatasetSpec:
    if name not in _DATASETS:
        raise unknown_name("dataset", name, _DATASETS)
    return _DATASETS[name]


def get_dataset(name, data_root: Optional[str] = None, download: bool = False) -> Dataset:
    """Load a registered dataset (cached in-process). Raises BenchmarkError naming the fix if files are missing.
    `name@kind=rate` gives a corrupted copy (benchmark.data.corruptions)."""
    base, kind, rate = corruptions.parse(name)
    if kind is not None:
        key = (name, os.path.abspath(data_root or DEFAULT_DATA_ROOT))
        if key not in _CACHE:
            _CACHE[key] = corruptions.corrupt(get_dataset(base, data_root, download), kind, rate, name)
        return _CACHE[key]
    spec = dataset_spec(name)
    root = data_root or DEFAULT_DATA_ROOT
    key = (name, os.path.abspath(root))
    if key not in _CACHE:
        x_tr, y_tr, x_te, y_te, names, *where = spec.loader(root, download)
        to_x = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
        ds = Dataset(name, to_x(x_tr), torch.as_tensor(np.array(y_tr), dtype=torch.int64),
                     to_x(x_te), torch.as_tensor(np.array(y_te), dtype=torch.int64), spec.mean, spec.std, names)
        ds.x_train = ds.normalize(ds.x_train)
        ds.x_test = ds.normalize(ds.x_test)
        ds.source = where[0] if where else None  # the folder the files were read from (records name it)
        _CACHE[key] = ds
    return _CACHE[key]


def _missing(name, paths, extra=""):
    spec = _DATASETS[name]
    return BenchmarkError(
        f"dataset {name!r} not found offline (looked in: {', '.join(paths)}). {spec.how_to_get}{extra}")


# ----------------------------------------------------------------------------------------------------------------
# readers for the original on-disk formats

def read_idx(path):
    """Read an IDX file (optionally .gz) into a numpy array (the MNIST/Fashion-MNIST format)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise BenchmarkError(f"{path} is not an unsigned-byte IDX file; re-download it.")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise BenchmarkError(f"{path} is truncated ({arr.size} of {int(np.prod(dims))} values); re-download it.")
    return arr.reshape(dims)


def _find_idx(dirs, stem):
    for d in dirs:
        for suffix in ("", ".gz"):
            p = os.path.join(d, stem + suffix)
            if os.path.exists(p):
                return p
    return None


def _load_idx_dataset(name, tv_folder, tv_class, root, download, extra_dirs=()):
    """The data root's files first: a user's own copy (re-split, corrupted on purpose, re-labelled) must never be
    replaced by a packaged one. `extra_dirs` (Debian's copy) are searched after it."""
    dirs = [os.path.join(root, tv_folder, "raw"), os.path.join(root, tv_folder)] + list(extra_dirs)
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = [_find_idx(dirs, s) for s in stems]
    if any(p is None for p in paths) and download:
        import torchvision
        getattr(torchvision.datasets, tv_class)(root, train=True, download=True)
        getattr(torchvision.datasets, tv_class)(root, train=False, download=True)
        paths = [_find_idx(dirs, s) for s in stems]
    if any(p is None for p in paths):
        raise _missing(name, dirs)
    xtr, ytr, xte, yte = (read_idx(p) for p in paths)
    return xtr[:, None] / 255.0, ytr, xte[:, None] / 255.0, yte, [], os.path.dirname(paths[0])


def _unpickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _load_cifar(name, folder, train_files, test_file, label_key, tv_class, root, download):
    base = os.path.join(root, folder)
    files = [os.path.join(base, f) for f in train_files + [test_file]]
    if not all(os.path.exists(f) for f in files) and download:
        import torchvision
        getattr(torchvision.datasets, tv_class)(root, train=True, download=True)
    if not all(os.path.exists(f) for f in files):
        raise _missing(name, [base])
    parts = [_unpickle(f) for f in files]
    to_img = lambda d: np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) / 255.0  # noqa: E731
    xtr = np.concatenate([to_img(p) for p in parts[:-1]])
    ytr = np.concatenate([np.asarray(p[label_key]) for p in parts[:-1]])
    return xtr, ytr, to_img(parts[-1]), np.asarray(parts[-1][label_key]), []


def _load_svhn(root, download):
    base = os.path.join(root, "svhn") if os.path.isdir(os.path.join(root, "svhn")) else root
    files = [os.path.join(base, f) for f in ("train_32x32.mat", "test_32x32.mat")]
    if not all(os.path.exists(f) for f in files) and download:
        import torchvision
        for split in ("train", "test"):
            torchvision.datasets.SVHN(root, split=split, download=True)
        base, files = root, [os.path.join(root, f) for f in ("train_32x32.mat", "test_32x32.mat")]
    if not all(os.path.exists(f) for f in files):
        raise _missing("svhn", [root, os.path.join(root, "svhn")])
    import scipy.io as sio
    out = []
    for f in files:
        m = sio.loadmat(f)
        x = np.transpose(m["X"], (3, 2, 0, 1)) / 255.0  # (H, W, C, N) -> (N, C, H, W)
        y = m["y"].astype(np.int64).flatten()
        y[y == 10] = 0  # SVHN stores digit 0 as label 10 (torchvision does the same remap)
        out += [x, y]
    return out[0], out[1], out[2], out[3], []


@register_dataset("digits", 1, 8, 10, mean=(0.3056,), std=(0.3761,), splits=(1257, 540), flip=False,
                  family="mnist",
                  how_to_get="It ships with scikit-learn: pip install scikit-learn.")
def _load_digits(root, download):
    """scikit-learn's 8x8 digits (1797 images): a fixed stratified split, 70% train (1257) / 30% test (540),
    random_state=0. Pixels 0..16 scaled to [0, 1]; mean/std are those of this training split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = d.images[:, None].astype(np.float32) / 16.0
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.3, stratify=d.target, random_state=0)
    return xtr, ytr, xte, yte, [str(i) for i in range(10)]


@register_dataset("fashion-mnist", 1, 28, 10, mean=(0.2861,), std=(0.3530,), splits=(60000, 10000),
                  family="mnist",
                  how_to_get="Install Debian's copy (apt-get install -y dataset-fashion-mnist, read from "
                             f"{DEBIAN_FASHION_MNIST}), or pass --data-root DIR holding FashionMNIST/raw/*-ubyte[.gz], "
                             "or add --download to fetch it with torchvision.")
def _load_fmnist(root, download):
    return _load_idx_dataset("fashion-mnist", "FashionMNIST", "FashionMNIST", root, download,
                             extra_dirs=[DEBIAN_FASHION_MNIST])


@register_dataset("mnist", 1, 28, 10, mean=(0.1307,), std=(0.3081,), splits=(60000, 10000), flip=False,
                  family="mnist",
                  how_to_get="Pass --data-root DIR holding MNIST/raw/*-ubyte[.gz], or add --download.")
def _load_mnist(root, download):
    return _load_idx_dataset("mnist", "MNIST", "MNIST", root, download)


@register_dataset("cifar10", 3, 32, 10, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010),
                  splits=(50000, 10000), family="cifar",
                  how_to_get="Pass --data-root DIR holding cifar-10-batches-py/, or add --download.")
def _load_cifar10(root, download):
    return _load_cifar("cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                       "labels", "CIFAR10", root, download)


@register_dataset("cifar100", 3, 32, 100, mean=(0.5071, 0.4866, 0.4409), std=(0.2673, 0.2564, 0.2762),
                  splits=(50000, 10000), family="cifar",
                  how_to_get="Pass --data-root DIR holding cifar-100-python/, or add --download.")
def _load_cifar100(root, download):
    return _load_cifar("cifar100", "cifar-100-python", ["train"], "test", "fine_labels", "CIFAR100", root, download)


@register_dataset("svhn", 3, 32, 10, mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970),
                  splits=(73257, 26032), flip=False, family="svhn",
                  how_to_get="Pass --data-root DIR holding train_32x32.mat and test_32x32.mat (or DIR/svhn/), "
                             "or add --download.")
def _load_svhn_reg(root, download):
    return _load_svhn(root, download)
