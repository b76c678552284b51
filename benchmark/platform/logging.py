"""TensorBoard helpers: one log root, one run directory per cell, image grids."""
import os

import torch


def image_grid(images, nrow=10):
    """(N, C, H, W) pixel-space images -> a (3, H', W') grid in [0, 1] for SummaryWriter.add_image."""
    from torchvision.utils import make_grid
    x = images.detach().float().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return make_grid(x, nrow=max(1, nrow), padding=1, pad_value=1.0)


def make_writer(log_root, run_name):
    """A SummaryWriter under log_root/run_name, or None when logging is off."""
    if not log_root:
        return None
    from torch.utils.tensorboard import SummaryWriter
    path = os.path.join(log_root, run_name)
    os.makedirs(path, exist_ok=True)
    return SummaryWriter(path)


def log_histogram(writer, tag, values, step):
    if writer is not None and values is not None and len(values):
        writer.add_histogram(tag, torch.as_tensor(values).detach().float().cpu(), step)


class LineProgress:
    """Progress for logs (stderr not a terminal): one line at most every `every_s` seconds and one at the end,
    instead of a bar that writes each update into the log."""

    def __init__(self, total, desc, initial=0, every_s=60.0):
        import sys
        import time
        self.total, self.desc, self.n, self.initial, self.every_s = total, desc, initial, initial, every_s
        self.postfix, self.t0, self._time, self._out = "", time.perf_counter(), time.perf_counter, sys.stderr
        self._last = self.t0

    def update(self, k=1):
        self.n += k
        if self._time() - self._last >= self.every_s:
            self._emit()

    def set_postfix(self, **kw):
        self.postfix = " ".join(f"{k}={v}" for k, v in kw.items())

    def _emit(self):
        self._last = self._time()
        elapsed, done = self._last - self.t0, self.n - self.initial  # this segment's pace (a resumed run's too)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = f", about {(self.total - self.n) * elapsed / done / 60:.1f} min left" \
            if self.total and done > 0 and self.n < self.total else ""
        print(f"{self.desc}: {self.n}/{self.total}{pct} {self.postfix} [{elapsed / 60:.1f} min{eta}]",
              file=self._out, flush=True)

    def close(self):
        self._emit()


def progress_bar(total, desc, initial=0, leave=False):
    """A tqdm bar on a terminal (its ETA after '<'); periodic one-line progress with an ETA when stderr is a log."""
    import sys
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=desc, leave=leave, file=sys.stderr)
    return LineProgress(total, desc, initial)
