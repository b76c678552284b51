"""SyntheticSet: what every method returns and the evaluation harness consumes.

Stored images are in `space` "normalized" (the dataset's normalisation) or "pixel" ([0, 1], IDC's choice).
`extras` holds learned or structural extras: `factor` (IDC multi-formation), `stages` (PDD: images per class in
each stage), `lr` (a learned learning rate), `influence` (per-instance scores tracked by IWD). Files are saved as
one .pt holding only tensors and plain Python values, and always loaded with weights_only=True (never executes code).
"""
import functools
import os
import platform
import subprocess
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from benchmark.platform.errors import BenchmarkError
from benchmark.platform.files import save_torch_atomic
from benchmark.platform import allocator
from benchmark.platform.device import deterministic_image_grad, device_name, to_device

FORMAT = "iwd-bench/synthetic-set/v1"


def decode_multi_formation(images, factor):
    """IDC multi-formation: split each stored image into factor x factor tiles and upsample each tile (bilinear)
    back to full size, so one stored image gives factor^2 training images. Order: stored image major, then tile
    row, then tile column."""
    if factor == 1:
        return images
    n, c, h, w = images.shape
    th, tw = h // factor, w // factor
    tiles = images[:, :, : th * factor, : tw * factor].reshape(n, c, factor, th, factor, tw)
    tiles = tiles.permute(0, 2, 4, 1, 3, 5).reshape(n * factor * factor, c, th, tw)
    if deterministic_image_grad(tiles):
        return _upsample_bilinear(tiles, h, w)
    return F.interpolate(tiles, size=(h, w), mode="bilinear", align_corners=False)


def _bilinear_rows(n_out, n_in, like):
    """(n_out, n_in) matrix of 1-D bilinear resizing as F.interpolate(align_corners=False) computes it: output i
    samples the input at (i + 0.5) * n_in / n_out - 0.5, clamped at 0, between its two neighbours."""
    src = ((torch.arange(n_out, dtype=like.dtype, device=like.device) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().clamp(max=n_in - 1)
    lam = (src - i0).unsqueeze(1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    cols = torch.arange(n_in, dtype=like.dtype, device=like.device)
    return (1 - lam) * (cols == i0.unsqueeze(1)).to(like.dtype) + lam * (cols == i1.unsqueeze(1)).to(like.dtype)


def _upsample_bilinear(x, h, w):
    """F.interpolate(x, (h, w), bilinear, align_corners=False) as two matrix products: the same values up to
    rounding, and a backward without the atomics of CUDA's upsample_bilinear2d_backward (deterministic)."""
    return _bilinear_rows(h, x.shape[-2], x) @ x @ _bilinear_rows(w, x.shape[-1], x).T


@dataclass
class SyntheticSet:
    images: torch.Tensor
    labels: torch.Tensor
    space: str = "normalized"
    extras: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.space not in ("normalized", "pixel"):
            raise BenchmarkError(f"SyntheticSet space must be 'normalized' or 'pixel', got {self.space!r}")
        if len(self.images) != len(self.labels):
            raise BenchmarkError(f"SyntheticSet has {len(self.images)} images but {len(self.labels)} labels")

    @classmethod
    def from_indices(cls, dataset, idx, metadata, **extras):
        """A set made of the real training images `idx` (selection methods), recorded in extras['selected_index']."""
        on_dev = to_device(idx, dataset.x_train.device)
        return cls(dataset.x_train[on_dev].clone(), dataset.host.y_train[idx].clone(), "normalized",
                   {"selected_index": idx, **extras}, metadata)

    @property
    def ipc(self):
        return self.metadata.get("ipc")

    def training_data(self, dataset, images=None, labels=None):
        """Decoded training images in the dataset's normalised space, and their labels: class indices, or the soft
        labels (N, C probabilities) a set carries in extras['soft_labels'] (`labels` then holds their argmax)."""
        x = self.images.detach() if images is None else images
        soft = self.extras.get("soft_labels")
        y = (self.labels if soft is None else torch.as_tensor(soft)) if labels is None else labels
        factor = int(self.extras.get("factor", 1))
        if factor > 1:
            x = decode_multi_formation(x, factor)
            y = y.repeat_interleave(factor * factor, dim=0)
        if self.space == "pixel":
            x = dataset.normalize(x)
        return x, y

    def stage_data(self, dataset):
        """PDD's staged evaluation: cumulative training sets (stage 1, stages 1..2, ...). One stage if unstaged."""
        stages = self.extras.get("stages")
        if not stages:
            return [self.training_data(dataset)]
        out, keep = [], torch.zeros(len(self.labels), dtype=torch.bool)
        stage_of = torch.as_tensor(self.extras["stage_of"])
        labels = torch.as_tensor(self.extras.get("soft_labels", self.labels))
        for k in range(len(stages)):
            keep |= stage_of == k
            rows = keep.nonzero().flatten()  # on the host: a mask on the device would cost a sync
            out.append(self.training_data(dataset, self.images.detach()[rows.to(self.images.device)],
                                          labels[rows.to(labels.device)]))
        return out

    def check_fits(self, dataset):
        """Raise a clear error if this set cannot be evaluated on `dataset`."""
        x, y = self.training_data(dataset)
        if y.dim() == 2:  # soft labels: one probability per class
            if y.shape[1] != dataset.num_classes:
                raise BenchmarkError(f"soft labels have {y.shape[1]} classes but {dataset.name} has "
                                     f"{dataset.num_classes}.")
            y = self.labels
        if tuple(x.shape[1:]) != (dataset.channels, *dataset.image_size):
            raise BenchmarkError(
                f"synthetic images have shape {tuple(x.shape[1:])} but {dataset.name} images are "
                f"{(dataset.channels, *dataset.image_size)}; evaluate on the dataset the set was distilled from.")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= dataset.num_classes):
            raise BenchmarkError(f"synthetic labels span {int(y.min())}..{int(y.max())} but {dataset.name} has "
                                 f"{dataset.num_classes} classes.")

    # ------------------------------------------------------------------------------------------------------------
    def save(self, path):
        """Atomic save (write to a temp file, then rename)."""
        blob = {"format": FORMAT, "images": self.images.detach().cpu(), "labels": self.labels.cpu(),
                "space": self.space, "extras": _cpu(self.extras), "metadata": self.metadata}
        try:
            save_torch_atomic(path, blob)
        except OSError as e:
            raise BenchmarkError(f"cannot write the synthetic set to {path} ({e.strerror or e}); choose a writable "
                                 f"--out path") from e

    @classmethod
    def load(cls, path, factor=None):
        """Load our format, the DC/DSA/DM reference's {'data': [[images, labels], ...]} (normalised; its result
        files' numpy accuracies are allowed), IDC's [images, targets] (pixel space; pass factor for multi-formation
        sets), or MTT's trio images_best.pt / labels_best.pt / syn_lr.pt (a folder holding them, or the images
        file; normalised; the learned learning rate goes to extras['lr'] and the 'mtt' evaluation protocol)."""
        trio = _mtt_trio(path)
        if trio is not None:
            images, labels, lr = (safe_load(p) if p else None for p in trio)
            extras = {"lr": float(lr)} if lr is not None else {}
            meta = {"source": "mtt-reference", "path": str(path), "evaluation": "mtt" if lr is not None else "dsa"}
            if labels.dim() == 2:  # soft labels (DATM and its successors learn them): probabilities, or logits
                soft = labels.float()
                if not ((soft >= 0).all() and torch.allclose(soft.sum(1), torch.ones(len(soft)), atol=1e-4)):
                    soft = torch.softmax(soft, 1)
                extras["soft_labels"], labels = soft, soft.argmax(1)
            return cls(images.float(), labels.long(), "normalized", extras, meta)
        blob = safe_load(path)
        if isinstance(blob, dict) and blob.get("format") == FORMAT:
            return cls(blob["images"], blob["labels"], blob["space"], blob["extras"], blob["metadata"])
        if isinstance(blob, dict) and "data" in blob and isinstance(blob["data"], (list, tuple)) and blob["data"]:
            images, labels = blob["data"][0][0], blob["data"][0][1]
            return cls(images.float(), labels.long(), "normalized", {},
                       {"source": "dc-reference", "path": str(path), "experiments_in_file": len(blob["data"])})
        if isinstance(blob, (list, tuple)) and len(blob) == 2 and all(torch.is_tensor(t) for t in blob):
            extras = {"factor": int(factor)} if factor else {}
            return cls(blob[0].float(), blob[1].long(), "pixel", extras, {"source": "idc-reference", "path": str(path)})
        raise BenchmarkError(
            f"{path} is not a synthetic set this tool knows (ours, the DC/DSA/DM reference's {{'data': [[x, y]]}}, "
            f"or IDC's [x, y]); got a {type(blob).__name__}.")


def _mtt_trio(path):
    """(images, labels, lr-or-None) paths if `path` is MTT's images_best.pt or a folder holding it, else None."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not (os.path.isdir(path) or os.path.basename(path) == "images_best.pt"):
        return None
    images, labels, lr = (os.path.join(folder, f) for f in ("images_best.pt", "labels_best.pt", "syn_lr.pt"))
    if not (os.path.exists(images) and os.path.exists(labels)):
        raise BenchmarkError(f"{path}: MTT's format needs images_best.pt and labels_best.pt side by side in {folder}")
    return images, labels, lr if os.path.exists(lr) else None


def _cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _numpy_data_globals():
    """numpy scalars and dtypes: data, not code (the DC/DSA/DM reference pickles its accuracies as numpy floats
    beside its tensors). Allowed through torch's safe-globals allowlist; weights_only stays on."""
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] if hasattr(np, "dtypes") else []
    return [core.multiarray.scalar, np.dtype, *dtypes]


def safe_load(path, remedy="re-save it from where it was made"):
    """torch.load with weights_only=True (numpy scalars allowed as data) and errors that name the problem. `remedy`:
    what to do with a damaged file (only the files this program writes, checkpoints, may say "delete it")."""
    if not os.path.exists(path):
        raise BenchmarkError(f"file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch's zip format nor a pickle
        raise BenchmarkError(f"{path} is not a torch .pt file (a synthetic set, checkpoint or tensor file): "
                             f"check the path")
    try:
        with torch.serialization.safe_globals(_numpy_data_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        text = str(e)
        if "Unsupported global" in text or "GLOBAL" in text:
            name = text.split("GLOBAL", 1)[-1].split()[0] if "GLOBAL" in text else "an object"
            raise BenchmarkError(
                f"{path} needs arbitrary code to load (it pickles {name}, not just tensors); refusing for safety. "
                f"Re-save it from its source as plain tensors, lists and dicts.") from None
        reason = next((ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln
                       and "Weights only" not in ln), type(e).__name__)
        raise BenchmarkError(f"{path} is corrupt or truncated and cannot be read ({reason[:160]}); {remedy}.") from None


# what makes a result: a change elsewhere (README, results/ tables a run itself rewrites) does not make it "dirty"
CODE_PATHSPECS = [":/*.py", ":/*.yaml", ":/*.yml", ":/*.cfg", ":/*.toml"]


def commit_of(directory):
    """The commit of the checkout holding `directory`, with "+dirty" when a tracked code or config file differs
    from it; "unknown" outside a git checkout (an installed wheel)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=directory, capture_output=True,
                                text=True, timeout=5).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHSPECS],
                               cwd=directory, capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + "+dirty" if dirty and commit != "unknown" else commit
    except Exception:  # noqa: BLE001  (no git)
        return "unknown"


@functools.lru_cache(maxsize=None)
def code_commit():
    """The commit of the code this process imported. Asked once, at import: a run lasts hours, and a commit made in
    the checkout meanwhile must not be credited with its result."""
    return commit_of(os.path.dirname(os.path.abspath(__file__)))


def provenance(device="cpu"):
    """Commit, library versions and hardware (the GPU that ran it for cuda[:N]), recorded with every result."""
    import kornia

    commit = code_commit()
    dev = device_name(device)
    return {"commit": commit, "torch": str(torch.__version__), "kornia": str(kornia.__version__),
            "python": platform.python_version(), "hardware": f"{platform.machine()} {dev}",
            "threads": torch.get_num_threads(), "allocator": allocator.mode()}


code_commit()  # pin the commit now, while the checkout still holds the code being imported
