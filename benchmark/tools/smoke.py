"""A tiny end-to-end run of a method on another device than the one its data was loaded on: the guard that keeps
device mismatches from landing (the `meta` device stands in for CUDA on a CPU-only machine; any op mixing meta and
CPU tensors raises, exactly as CPU and CUDA do). Works for any registered method, a user's plugin method too.
"""
import dataclasses
from benchmark.core.method import Task
from benchmark.core.registry import create_method, get_method
from benchmark.platform.device import meta_host_reads
from evaluation import evaluate, resolve_protocol

# The loop lengths a shrunk run caps, where a method's config has them (others are left as the preset sets them):
# `plan` calibrates on these and scales by the real counts; a tiny device-check run also shrinks the work per loop.
LOOP_CAPS = {"iterations": 1, "inner_loop": 2, "outer_loop": 2, "max_outer_loop": 2, "condition_epochs": 2,
             "feature_epochs": 1, "base_set": ("iterations=1",)}
TINY_OVERRIDES = {**LOOP_CAPS, "condition_epochs": 1, "n_data": 64, "num_nets": 1, "solver_max_iter": 3,
                  "batch_real": 16, "num_experts": 1, "syn_steps": 2, "stages": 2}


def shrunk(config, limits):
    """The overrides that cap `config`'s loop lengths at `limits` (only keys the config has; a count already below
    its limit is kept). Shared by the device guard's tiny runs and `plan`'s calibration probes."""
    out = {}
    for f in dataclasses.fields(config):
        if f.name in limits:
            cur, cap = getattr(config, f.name), limits[f.name]
            out[f.name] = min(cur, cap) if isinstance(cap, int) and cur else cap
    return out


def tiny_config_overrides(method_cls, preset="quick"):
    return shrunk(method_cls.make_config(preset if preset in method_cls.presets else None), TINY_OVERRIDES)


def run_on_device(method_name, dataset, device="meta", ipc=2, network="ConvNetD2", preset="quick", overrides=None):
    """Distil one tiny iteration of `method_name` and evaluate the set for one epoch, with the task on `device`
    (the dataset stays where it was loaded; the task copies it once). Returns the synthetic set. On `meta`, host
    reads return zeros (device.meta_host_reads); mixing devices raises."""
    import contextlib


    cls = get_method(method_name)
    over = {**tiny_config_overrides(cls, preset), **(overrides or {})}
    method = create_method(method_name, preset if preset in cls.presets else None, over)
    reads = meta_host_reads() if str(device) == "meta" else contextlib.nullcontext()
    with reads:
        synset = method.distill(Task(dataset, ipc, 0, device))
        # a device check, not a protocol check: a method that declares no protocol is trained the DC way
        declared = synset.metadata.get("evaluation")
        protocol = dataclasses.replace(resolve_protocol("auto-quick" if declared else "dc-quick", synset), epochs=1)
        evaluate(synset, dataset, protocol, network, num_eval=1, device=device)
    return synset
