"""Writing results safely, and the one timestamp format every record uses."""
import datetime
import json
import os
import time
from .errors import BenchmarkError


def check_writable(folder, option):
    """Create `folder` and prove a file can be written there, before hours of work depend on it."""
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise BenchmarkError(f"cannot write to {folder} ({e.strerror or e}); choose a writable {option}") from None


def atomic_write(path, write):
    """write(tmp) to a unique temporary file next to `path`, then rename it over `path`: a reader (or a crash) sees
    the old file or the new one, never half of one, and two writers never share a temporary file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}-{time.time_ns()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)


def save_torch_atomic(path, obj):
    import torch
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_json(path):
    """The JSON in `path`, or None if it is missing or damaged (a damaged file is treated as absent)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def utc_now():
    """Now, as the ISO-8601 UTC timestamp (seconds) records carry."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
