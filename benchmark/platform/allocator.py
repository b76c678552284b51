"""The CPU memory-allocator fast path (glibc's default costs up to ~2x on large activation buffers).

`run.py`, run as a program, first calls `use_tcmalloc()`: where tcmalloc is installed (Debian:
libtcmalloc-minimal4) and not yet preloaded, it re-executes the same command with LD_PRELOAD set to it, the fastest
option measured (results/bench.md: a ConvNet-3 training step 0.54 s vs 0.88 s with tuned glibc; DC at the reference
settings 1.14x), and results are bit for bit those of glibc (the allocator places buffers, it computes nothing;
tested). IWD_NO_TCMALLOC=1 (or IWD_NO_MALLOC_TUNING=1) keeps the process as started.
Then `tune()`, before torch allocates, leaves the allocator alone when tcmalloc is preloaded or when
IWD_NO_MALLOC_TUNING is set; otherwise it sets glibc's tunables in-process with mallopt, the same effect as
MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=... MALLOC_TOP_PAD_=1073741824 in the environment: big
buffers are reused from the heap instead of being mmap'ed and page-faulted on every call. Peak RSS rises ~20%.
`run.py bench` measures all three configurations side by side.
"""
import glob
import os
import sys

_mode = None


def tcmalloc_path():
    """The tcmalloc shared library if installed (Debian: libtcmalloc-minimal4), else None."""
    for pattern in ("/usr/lib/*/libtcmalloc_minimal.so*", "/usr/lib/libtcmalloc_minimal.so*",
                    "/usr/lib/*/libtcmalloc.so*"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def use_tcmalloc():
    """Re-execute this process's command with tcmalloc preloaded, where installed and not preloaded yet (never
    twice: a preload the loader refused leaves the marker set and the process runs on)."""
    path = tcmalloc_path()
    env = os.environ
    if path is None or "tcmalloc" in env.get("LD_PRELOAD", "") or env.get("IWD_TCMALLOC_REEXEC") or \
            env.get("IWD_NO_TCMALLOC") or env.get("IWD_NO_MALLOC_TUNING"):
        return
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]  # the interpreter's own flags too
    preload = " ".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, {**env, "LD_PRELOAD": preload, "IWD_TCMALLOC_REEXEC": "1"})
    except OSError:
        pass  # cannot re-execute (a frozen interpreter, say): run on with glibc


def tune():
    """Apply the glibc tunables unless tcmalloc is preloaded or tuning is switched off. Returns the mode."""
    global _mode
    if _mode is not None:
        return _mode
    if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        _mode = "tcmalloc (LD_PRELOAD)"
    elif os.environ.get("IWD_NO_MALLOC_TUNING"):
        _mode = "glibc default (IWD_NO_MALLOC_TUNING)"
    else:
        try:
            import ctypes
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
            ok = (libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) == 1
                  and libc.mallopt(m_trim_threshold, 2 ** 31 - 1) == 1
                  and libc.mallopt(m_top_pad, 1024 * 1024 * 1024) == 1)
            _mode = "glibc tuned (mallopt)" if ok else "glibc default (mallopt refused)"
        except (OSError, AttributeError):
            _mode = "default (no glibc)"
    return _mode


def mode():
    return _mode or "untuned (benchmark.platform.allocator.tune() not called)"
