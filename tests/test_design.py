"""The house's shape: explicit state, declared traits, resolved configs, one-way imports."""
import dataclasses

import pytest
import torch

from benchmark.platform.errors import BenchmarkError
from benchmark.core.registry import create_method, get_method, register_method

TINY_DC = ["iterations=2", "net_width=8", "batch_real=8", "inner_loop=2"]


def test_subclassing_a_generated_iwd_config_validates_without_recursion():
    """What a user extending iwd+dc writes: a subclass of the generated config with its own validate."""
    base = get_method("iwd+dc").Config

    @dataclasses.dataclass
    class MyConfig(base):
        my_key: int = 1

        def validate(self):
            super().validate()
            if self.my_key < 0:
                raise BenchmarkError("my_key must be >= 0")

    MyConfig().validate()
    with pytest.raises(BenchmarkError, match="tau must be > 0"):
        MyConfig(tau=0).validate()
    with pytest.raises(BenchmarkError, match="init must be"):
        MyConfig(init="zeros").validate()
    with pytest.raises(BenchmarkError, match="my_key"):
        MyConfig(my_key=-1).validate()


def test_iwd_keeps_no_state_on_the_method_object(digits, task_of):
    """Everything a step's weighting needs comes in with the step and its context: distilling (checks, solver
    memory, tracked scores, statistics) leaves the method object's attributes exactly as they were."""
    m = create_method("iwd+idc", None, ["iterations=2", "inner_loop=2", "net_width=8", "batch_real=8", "n_data=16",
                                        "factor=1", "solver=cg", "solver_max_iter=3"])
    before = dict(vars(m))
    syn = m.distill(task_of(digits, 1, 0))
    assert vars(m) == before and int((syn.extras["influence"]["count"] > 0).sum()) > 0
    # the run's summary of its implicit-term solves: 2 iterations x 2 steps, CG truncated at 3 iterations
    summary = syn.metadata["solver_summary"]
    assert summary["steps"] == 4 and summary["unconverged"] == 4 and summary["max_residual"] > 1e-4
    assert summary["solver"] == "cg"


def test_the_default_solver_is_woodbury_where_it_fits_and_the_record_says_why(digits, task_of):
    """solver=auto (the default): the exact Gauss-Newton inverse (Woodbury) where its n*C rows fit woodbury_max_mb,
    computed before the solve; CG otherwise. The set's solver summary names the solver that ran and why."""
    over = ["iterations=1", "inner_loop=2", "net_width=8", "batch_real=8", "n_data=16", "factor=1"]
    fits = create_method("iwd+idc", None, over).distill(task_of(digits, 1, 0)).metadata["solver_summary"]
    assert fits["solver"] == "woodbury" and fits["unconverged"] == 0 and "<= woodbury_max_mb 1024" in fits["why"]
    tight = create_method("iwd+idc", None, over + ["woodbury_max_mb=0.01"]).distill(task_of(digits, 1, 0))
    summary = tight.metadata["solver_summary"]
    assert summary["solver"] == "cg" and "woodbury would need" in summary["why"] and "> woodbury_max_mb 0.01" in \
        summary["why"]
    hessian = create_method("iwd+idc", None, over + ["curvature=hessian"]).distill(task_of(digits, 1, 0))
    assert hessian.metadata["solver_summary"]["solver"] in ("cg", "identity")  # CG may end at the identity answer


def test_a_method_without_an_evaluation_trait_gets_a_clear_answer(digits, task_of):
    from benchmark.core.method import Method
    from benchmark.core.synthetic import SyntheticSet
    from evaluation import evaluate

    @register_method("test-undeclared-protocol")
    class Undeclared(Method):
        """A user's plugin that declares no evaluation protocol."""

        def distill(self, task):
            return SyntheticSet(task.dataset.x_train[:10].clone(), torch.arange(10), metadata=self.metadata(task))

    syn = create_method("test-undeclared-protocol").distill(task_of(digits, 1, 0))
    with pytest.raises(BenchmarkError, match="'test-undeclared-protocol' declares none.*evaluation = 'dc'"):
        evaluate(syn, digits, "auto-quick", "ConvNetD2", num_eval=1)
    assert evaluate(syn, digits, "dc-quick", "ConvNetD2", num_eval=1)["protocol"]["name"] == "dc-quick"


def test_the_set_records_the_resolved_config_that_ran(digits, task_of):
    """By-dataset / by-IPC defaults (None) are resolved once; the set (and so the record) holds what ran, and the
    method's own config is left as the user set it."""
    m = create_method("dc", "quick", ["iterations=1"])
    cfg = m.distill(task_of(digits, 10, 0)).metadata["config"]
    assert (cfg["outer_loop"], cfg["inner_loop"], cfg["dsa_strategy"]) == (5, 10, None)  # table 10 capped at 5
    assert m.config.outer_loop is None
    idc = create_method("idc", "quick", ["iterations=1", "inner_loop=1"])
    cfg = idc.distill(task_of(digits, 1, 0)).metadata["config"]
    assert (cfg["factor"], cfg["metric"], cfg["lr_img_base"], cfg["n_data"]) == (1, "l1", 1e-4, 256)
    assert cfg["dsa_strategy"] == "color_crop_cutout_scale_rotate"  # digits declare flips label-changing
    iwd = create_method("iwd+idc", None).resolve(task_of(digits, 1, 0))
    assert iwd.implicit == "on" and create_method("iwd+dc").resolve(task_of(digits, 1, 0)).implicit == "off"


def test_traits_replace_name_lists():
    from benchmark.data.datasets import dataset_spec
    assert not get_method("random").ranked and not get_method("full").uses_ipc and get_method("dc").ranked
    assert get_method("pdd").evaluation == "idc" and get_method("dm").evaluation == "dsa"
    assert [dataset_spec(n).flip for n in ("digits", "mnist", "svhn", "fashion-mnist", "cifar10")] == \
        [False, False, False, True, True]


def test_a_bad_declaration_is_refused_when_the_method_registers():
    """Traits, config and presets are checked once, at registration (before: a typo'd preset key or trait surfaced
    only when a suite ran the method, or never)."""
    from benchmark.core.method import Method

    @dataclasses.dataclass
    class Cfg:
        steps: int = 1
    for attrs, message in (({"evaluation": "dcc"}, "evaluation = 'dcc'"), ({"ranked": "yes"}, "ranked = 'yes'"),
                           ({"presets": {"cpu": {"step": 2}}}, "preset 'cpu' sets unknown key.s. step")):
        cls = type("Bad", (Method,), {"Config": Cfg, **attrs})
        with pytest.raises(BenchmarkError, match=message):
            register_method("bad-declaration")(cls)
    with pytest.raises(BenchmarkError, match="no method|unknown method"):
        get_method("bad-declaration")


def test_iwd_embeds_the_solver_options_and_none_means_the_whole_batch():
    """IWD's solver keys are SolverConfig's fields (types from there, IWD's defaults where they differ), and
    hessian_batch none (not a 0 sentinel) estimates the curvature on every instance of the step."""
    from influence.ihvp import SolverConfig
    from influence.iwd import SOLVER_KEYS, solver_config
    from influence.scores import hessian_rows
    cfg = create_method("iwd+idc", None, ["hessian_batch=none", "solver_max_iter=7"]).config
    fields = {f.name: f.type for f in dataclasses.fields(SolverConfig)}
    assert all(dict((f.name, f.type) for f in dataclasses.fields(cfg))[k] == fields[v] for k, v in SOLVER_KEYS.items())
    solver = solver_config(cfg)
    assert (solver.solver, solver.curvature, solver.max_iter, solver.hessian_batch) == ("auto", "gauss-newton", 7, None)
    assert torch.equal(hessian_rows(640, None), torch.arange(640)) and len(hessian_rows(640, 128)) == 128
    with pytest.raises(BenchmarkError, match="hessian_batch must be >= 1, or none"):
        create_method("iwd+idc", None, ["hessian_batch=0"])


def test_progress_in_a_log_is_a_few_lines_not_one_per_update(digits, task_of, capsys):
    """stderr that is not a terminal (a log file) gets periodic one-line progress, not a bar redrawn per step."""
    create_method("dc", None, TINY_DC + ["iterations=6"]).distill(task_of(digits, 1, 0, progress=True))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dc digits ipc1: 6/6 (100%)"), lines


def test_progress_lines_in_a_log_say_how_long_is_left(capsys):
    """A resumed run (from iteration 2 of 10) that took 60 s for 4 iterations has 4 left: about 1.0 min."""
    from benchmark.platform.logging import LineProgress
    bar = LineProgress(10, "dc", initial=2, every_s=1e9)
    bar._time, bar.t0 = (lambda: 60.0), 0.0
    bar.update(4)
    bar.close()
    assert capsys.readouterr().err.strip() == "dc: 6/10 (60%)  [1.0 min, about 1.0 min left]"
