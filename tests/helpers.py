"""Helpers shared by test files: run.py in a subprocess, and a tiny suite on digits."""
import os
import subprocess
import sys

import torch
import yaml

from benchmark.grid.suites import load_suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DC = ["iterations=3", "net_width=8", "batch_real=8", "inner_loop=2"]


def tiny_suite(tmp_path, name="tiny", **kw):
    spec = {"datasets": ["digits"], "methods": ["random", "dc", "iwd+dc"], "ipc": [1], "seeds": [0],
            "preset": "reference", "protocol": "dc-quick", "num_eval": 2, "eval_networks": ["ConvNetW32"],
            "overrides": {"dc": TINY_DC, "iwd+dc": TINY_DC}, "reduced": True, "description": "test suite"}
    spec.update(kw)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_suite(str(path))


def cli(*args, **kw):
    """run.py in a subprocess, at the tests' torch thread count (2, or IWD_TEST_THREADS beside a background run:
    oversubscribed threads slow torch down 10-40x here)."""
    threads = ["--threads", str(torch.get_num_threads())]
    return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *threads, *args], capture_output=True,
                          text=True, cwd=kw.pop("cwd", ROOT), timeout=kw.pop("timeout", 600), **kw)


def cli_in_process(*args, cwd=None):
    """run.py's click group called in this process (no interpreter start, no torch import: ~2 s saved per call)
    for checks of what a command prints and returns. Same fields as subprocess's result; an exception other than
    run.py's own exit raises here, so a traceback cannot pass for a clean error."""
    from click.testing import CliRunner

    import run
    old = os.getcwd()
    try:
        os.chdir(cwd or ROOT)
        r = CliRunner().invoke(run.cli, list(args))
    finally:
        os.chdir(old)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)
