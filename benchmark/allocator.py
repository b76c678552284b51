"""The CPU memory-allocator fast path (ENVIRONMENT.md: glibc's default costs up to ~2x on large activation buffers).

`tune()` must run before torch allocates (run.py calls it first thing). It leaves the allocator alone when
tcmalloc is preloaded (LD_PRELOAD=libtcmalloc_minimal.so.4, the fastest option where installed) or when
IWD_NO_MALLOC_TUNING is set; otherwise it sets glibc's tunables in-process with mallopt, the same effect as
MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=... MALLOC_TOP_PAD_=1073741824 in the environment: big
buffers are reused from the heap instead of being mmap'ed and page-faulted on every call. Peak RSS rises ~20%.
`run.py bench` measures all three configurations side by side.
"""
import glob
import os

_mode = None


def tcmalloc_path():
    """The tcmalloc shared library if installed (Debian: libtcmalloc-minimal4), else None."""
    for pattern in ("/usr/lib/*/libtcmalloc_minimal.so*", "/usr/lib/libtcmalloc_minimal.so*",
                    "/usr/lib/*/libtcmalloc.so*"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


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
    return _mode or "untuned (benchmark.allocator.tune() not called)"
