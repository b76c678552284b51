"""How a run is watched: the one object through which a planner, a timer or a meta-device run observes a method.

A task carries an `Observer` (`Task.observer`); the loops that cost time consult it, and nothing else:
- `counting`: True while `run.py plan` counts FLOPs on the meta device. A loop of n alike steps then calls
  `repeat(n, run_one, component)` instead of running n times (one step is counted and scaled).
- `section(component)`: a context manager around work of one component ('train': SGD training loops); the planner's
  calibration times the training loops apart from the rest.
- `units_to_make(path, amount, stored)`: how many of `amount` units of a cached artefact (a feature network, an
  expert's epochs) the run makes, given `stored` units found at `path`. A real run makes what is missing; a meta run
  stores nothing and makes every unit; the planner also knows what earlier planned cells will have made.
The default observer watches nothing: loops run in full, untimed.
"""
import contextlib


class Observer:
    counting = False

    def repeat(self, n, run_one, component=None):
        """Run `run_one` n times (a counting observer runs it once and scales its cost)."""
        for _ in range(n):
            run_one()

    def section(self, component):
        return contextlib.nullcontext()

    def units_to_make(self, path, amount, stored, device="cpu"):
        return amount if str(device) == "meta" else max(0, amount - stored)


PLAIN = Observer()
