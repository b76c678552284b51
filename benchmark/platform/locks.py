"""Lock files that name their holder: one process per cell (the runner), one trainer per expert trajectory (MTT's
buffer). A lock is a file created atomically with os.link holding {pid, host, process identity, start}; a lock
whose process is gone (same host) is taken over, so a killed run never blocks the next one."""
import contextlib
import json
import os
import socket
import time

from .errors import BenchmarkError
from .files import read_json, utc_now


def holder_alive(holder):
    """Is the lock's holder still running? A holder on another host counts as alive (we cannot look)."""
    if holder.get("host") != socket.gethostname():
        return True
    return _alive(holder.get("pid"), holder.get("process"))


@contextlib.contextmanager
def file_lock(path, what, busy_hint, wait_s=0.0, poll_s=2.0, busy_error=BenchmarkError):
    """Hold the lock file `path` for `what`. If a live process holds it: wait up to `wait_s` seconds for it, then
    raise busy_error with a message naming the holder and `busy_hint` (what the user should do)."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "process": _process_identity(os.getpid()),
          "started": utc_now()}
    tmp = f"{path}.tmp{os.getpid()}-{time.time_ns()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(me, f)
    deadline, stale_takeovers = time.monotonic() + wait_s, 0
    try:
        while True:
            try:
                os.link(tmp, path)  # atomic: fails if the lock exists, and the lock is never seen half-written
                break
            except FileExistsError:
                holder = read_json(path) or {}
                if not holder_alive(holder) and stale_takeovers < 3:
                    stale_takeovers += 1
                    try:
                        os.remove(path)  # stale: its process is gone (killed, machine restarted)
                    except FileNotFoundError:
                        pass
                    continue
                if time.monotonic() < deadline:
                    time.sleep(poll_s)
                    continue
                raise busy_error(
                    f"{what} is being run by pid {holder.get('pid')} on {holder.get('host')} since "
                    f"{holder.get('started')} (lock {path}); {busy_hint}, or, if that process is gone, delete the "
                    f"lock and rerun") from None
    finally:
        os.remove(tmp)
    try:
        yield
    finally:
        if (read_json(path) or {}).get("pid") == me["pid"]:
            os.remove(path)


def _process_identity(pid):
    """Boot id and start time of a process (Linux), so a pid reused after a restart is not taken for the holder."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        with open(f"/proc/{pid}/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]  # field 22, starttime (after the command name)
        return f"{boot}/{start}"
    except (OSError, IndexError):
        return None


def _alive(pid, identity=None):
    """Is the process still running (this host)? A different identity for the pid means it died and the pid was
    reused."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive, unless its identity says it is another one
    return identity is None or _process_identity(pid) in (None, identity)
