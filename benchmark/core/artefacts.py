"""The one cache of reusable artefacts: a trained feature network (herding, loss-prune-then-distill), an expert
trajectory (MTT).

One root: the task's `cache_dir` (a suite's run root gives `<run root>/cache`), else $IWD_CACHE, else
~/.cache/iwd-bench. An artefact is found by a key holding every setting that changes it (the digest of its settings
names its folder), so a run with other training settings never reuses one made with the defaults. Whether a run
makes an artefact, and how much of it, is asked of the task's observer (benchmark.platform.observe), which is how
`run.py plan` counts work cached across cells once.
"""
import hashlib
import json
import os

CACHE_ENV = "IWD_CACHE"


def cache_root(task):
    return task.cache_dir or os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "iwd-bench")


def artefact_dir(task, kind, settings, label):
    """<root>/<kind>/<label>__<digest of settings>: `settings` (a JSON-able dict) holds everything that changes the
    artefact; `label` is for people (the dataset, the network)."""
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    safe = label.replace("@", "_").replace("=", "")
    return os.path.join(cache_root(task), kind, f"{safe}__{digest}")
