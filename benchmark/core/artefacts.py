"""The one cache of reusable artefacts: a trained feature network (herding, loss-prune-then-distill), an expert
trajectory (MTT).

One root: the task's `cache_dir` (a suite's run root gives `<run root>/cache`), else $IWD_CACHE, else
~/.cache/iwd-bench. An artefact is found by a key holding every setting that changes it (the digest of its settings
names its folder), so a run with other training settings never reuses one made with the defaults. Whether a run
makes an artefact, and how much of it, is asked of the task's observer (benchmark.platform.observe), which is how
`run.py plan` counts work cached across cells once. One process makes an artefact; the others wait for it
(artefact_lock).
"""
import contextlib
import hashlib
import json
import os

from benchmark.platform.errors import BenchmarkError
from benchmark.platform.locks import file_lock

CACHE_ENV = "IWD_CACHE"


def cache_root(task):
    return task.cache_dir or os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "iwd-bench")


def artefact_dir(task, kind, settings, label):
    """<root>/<kind>/<label>__<digest of settings>: `settings` (a JSON-able dict) holds everything that changes the
    artefact; `label` is for people (the dataset, the network)."""
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    safe = label.replace("@", "_").replace("=", "")
    return os.path.join(cache_root(task), kind, f"{safe}__{digest}")


ARTEFACT_WAIT_S = 24 * 3600  # how long a process waits for another one making the same artefact


def artefact_lock(path, what, must_store=False):
    """The lock of the artefact stored at `path` (`what` names it in the busy message): a day's wait for another
    process making it. Where the cache cannot be written: none, and this process makes its own and keeps it in
    memory (an unwritable cache only costs time), or, for an artefact that `must_store` (an expert trajectory,
    read again each iteration), a clear error before any work is done."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        writable = os.access(folder, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        if must_store:
            raise BenchmarkError(f"cannot store {what}: the cache folder {folder} cannot be written; point "
                                 f"${CACHE_ENV} (or the suite's run root) at a writable folder")
        return contextlib.nullcontext()
    return file_lock(path + ".lock", what, "let that run finish it", wait_s=ARTEFACT_WAIT_S)
