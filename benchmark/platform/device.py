"""Devices: one place for choosing, checking and describing where a task runs.

Rules the rest of the code follows (so the same code runs on a laptop, a GPU and a cluster):
- A task's data lives on its device once (`Dataset.on(device)`, cached); indices are drawn from seeded CPU
  generators, so the random streams are the same on every device, and move to the device without a host sync
  (`to_device`).
- Nothing reads a device value on the host inside a matching or training step; scalars are read once per iteration.
- On CUDA the determinism flags are set (`configure`) and recorded with every result (`device_record`).
- The `meta` device (shapes, no data) stands in for a second device on a CPU-only machine: any op mixing meta and
  CPU tensors raises, as CPU and CUDA do. `meta_host_reads()` lets the few host reads (a loss printed, an argmax
  read back) return zeros there (booleans: True), so a whole method runs on meta.
"""
import contextlib
import os

import torch

from .errors import BenchmarkError


def resolve(device):
    """Check a device string up front; a clear error when CUDA is asked for and absent (before any work)."""
    device = str(device or "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BenchmarkError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchmarkError(f"--device {device} asked for CUDA, but torch sees no GPU here (torch "
                                 f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu "
                                 f"or run on a GPU machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BenchmarkError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible "
                                 f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type not in ("cpu", "meta"):
        raise BenchmarkError(f"unsupported device {device!r}; use cpu or cuda[:N]")
    return device


def is_cuda(device):
    return str(device).startswith("cuda")


def to_device(t, device, dtype=None):
    """Move a (small, CPU) tensor such as a batch of indices or augmentation parameters to the device without a
    host synchronisation (non_blocking from pageable memory: CUDA stages the copy before returning, so it is
    safe; on the CPU it changes nothing)."""
    return t.to(device=device, dtype=dtype, non_blocking=True)


def configure(device):
    """On CUDA: deterministic kernels (cuBLAS workspace, cuDNN deterministic, no autotuning, torch's deterministic
    algorithms with a warning where none exists) and TF32 off, so float32 means float32 as on the CPU. Returns the
    settings for the record."""
    if not is_cuda(device):
        return {}
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS initialises: before first use
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)  # interpolate/grid_sample backward have no such kernel
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return cuda_settings()


def cuda_settings():
    return {"cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "cudnn_version": torch.backends.cudnn.version()}


def deterministic_image_grad(x):
    """Whether an image batch takes the deterministic-gradient path of the warps and resizes that go through
    grid_sample/interpolate elsewhere (their CUDA backward accumulates with atomics): on CUDA with torch's
    deterministic mode on (every CUDA run sets it), and on meta, its stand-in in the device tests; only for
    images that need a gradient (the synthetic batch)."""
    return x.requires_grad and (x.is_meta or (x.is_cuda and torch.are_deterministic_algorithms_enabled()))


def device_name(device):
    """What ran the work: the GPU's name for cuda[:N] (N, not always GPU 0), else the CPU."""
    if is_cuda(device) and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu x{os.cpu_count()}"


def device_record(device):
    """Device facts for a record: name, CUDA settings and peak memory of this process on that device."""
    out = {"device": str(device), "device_name": device_name(device)}
    if is_cuda(device) and torch.cuda.is_available():
        out["cuda"] = cuda_settings()
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2 ** 20
    return out


def synchronize(device):
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


@contextlib.contextmanager
def meta_host_reads():
    """Let host reads of meta tensors (item, float, int, bool, tolist, copies to the CPU) return zeros, so a method
    whose data lives on `meta` runs end to end. Any op that MIXES meta and CPU tensors still raises: that is the
    device mismatch this stand-in exists to catch. Test and planning use only (it patches torch.Tensor)."""
    T = torch.Tensor
    saved = {k: getattr(T, k) for k in ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "cpu",
                                        "numpy", "to")}

    def zeros_like_on_cpu(t):  # booleans read True, like __bool__: "all finite", "all done"
        return (torch.ones if t.dtype == torch.bool else torch.zeros)(t.shape, dtype=t.dtype)

    reads = {"n": 0}  # host reads of meta tensors so far (a test counts them per matching step)

    def read(name, conv):
        def f(self, *a, **k):
            if self.device.type == "meta":
                reads["n"] += 1
                return conv(self)
            return saved[name](self, *a, **k)
        return f

    def to(self, *args, **kwargs):
        if self.device.type == "meta":
            target = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
            if target is not None and torch.device(target).type == "cpu":
                reads["n"] += 1
                dtype = kwargs.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), self.dtype))
                return zeros_like_on_cpu(self).to(dtype)
        return saved["to"](self, *args, **kwargs)

    patches = {"item": read("item", lambda t: zeros_like_on_cpu(t).item()),
               "__float__": read("__float__", lambda t: 0.0), "__int__": read("__int__", lambda t: 0),
               "__index__": read("__index__", lambda t: 0), "__bool__": read("__bool__", lambda t: True),
               "tolist": read("tolist", lambda t: zeros_like_on_cpu(t).tolist()),
               "cpu": read("cpu", zeros_like_on_cpu),
               "numpy": read("numpy", lambda t: zeros_like_on_cpu(t).numpy()), "to": to}
    try:
        for k, v in patches.items():
            setattr(T, k, v)
        yield reads
    finally:
        for k, v in saved.items():
            setattr(T, k, v)
