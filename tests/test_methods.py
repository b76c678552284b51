"""Distillation methods: matching distance, weighted statistic, determinism, resume, PDD stages, loss decrease."""
import math
import os
import time

import pytest
import torch

from benchmark.platform.errors import BenchmarkError
from benchmark.core.protocol import uniform_weights
from benchmark.core.registry import create_method
from methods.matching import dc_loops, match_distance, weighted_grad

TINY = ["iterations=3", "net_width=8", "batch_real=8", "inner_loop=2"]


def test_match_distance_against_direct_formula():
    g = torch.Generator().manual_seed(0)
    gs = [torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g), torch.randn(5, 6, generator=g)]
    gr = [torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g), torch.randn(5, 6, generator=g)]
    expected = 0.0
    for s, r in ((gs[0].reshape(4, -1), gr[0].reshape(4, -1)), (gs[2], gr[2])):  # 1-D tensors contribute 0
        for i in range(s.shape[0]):
            expected += 1 - float(s[i] @ r[i]) / (float(s[i].norm() * r[i].norm()) + 1e-6)
    assert math.isclose(float(match_distance(gs, gr, "ours")), expected, rel_tol=1e-5)
    mse = sum(float(((a - b) ** 2).sum()) for a, b in zip(gs, gr))
    assert math.isclose(float(match_distance(gs, gr, "mse")), mse, rel_tol=1e-5)
    l1 = sum(float((a - b).abs().sum()) for a, b in zip(gs, gr))
    assert math.isclose(float(match_distance(gs, gr, "l1")), l1, rel_tol=1e-5)
    fs, fr = torch.cat([t.flatten() for t in gs]), torch.cat([t.flatten() for t in gr])
    assert math.isclose(float(match_distance(gs, gr, "cos")), 1 - float(fs @ fr) / float(fs.norm() * fr.norm()),
                        rel_tol=1e-5)


def test_uniform_weights_reproduce_the_unweighted_statistic(digits):
    from benchmark.nn.networks import get_network
    net = get_network("ConvNetW32", 1, 10, 8, seed=0)
    params = list(net.parameters())
    x, y = digits.x_train[:20], digits.y_train[:20]
    w = torch.full((20,), 1 / 20)
    g_w = weighted_grad(net, params, x, y, w)
    g = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x), y), params)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g_w, g))
    # DM: sum_i w_i embed(x_i) with uniform w is the mean embedding
    dm = create_method("dm", None, ["net_width=8", "batch_real=16", "dsa=false"])
    from benchmark.core.method import Task
    task = Task(digits, 1, 0)
    leaf = digits.x_train[torch.cat([digits.class_indices[c][:1] for c in range(10)])]
    dm = dm.for_task(task)
    step = dm.build_step(task, dm.fresh_net(task, 0), dm.synthetic_batches(task, leaf, 1),
                         torch.Generator().manual_seed(0), 0)
    w0 = uniform_weights(step)
    with torch.no_grad():
        emb = dm.fresh_net(task, 0).embed(step.batches[3].x)  # the same seeded network, per-class pass
    assert torch.allclose(step.real_statistic(3, w0[3])[0], emb.mean(0), atol=1e-5)


def test_real_pass_modes_against_eager_autograd(digits64, monkeypatch):
    """DC's faster real-gradient passes (#18) against eager autograd: compile to rounding (float64), bf16 to a
    cosine above 0.95 per weight tensor (0.97 measured on the first layer); a compiler failure falls back to eager
    with one warning; an unknown mode is a clear error."""
    import warnings

    from benchmark.nn.networks import get_network
    from benchmark.nn import real_pass
    net = get_network("ConvNetW32", 1, 10, 8, seed=0).double()
    params = list(net.parameters())
    x, y = digits64.x_train[:64], digits64.y_train[:64]
    w = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = weighted_grad(net, params, x, y, w)
    compiled = real_pass.run(weighted_grad, "compile", "cpu", net, params, x, y, w)
    assert "reason" not in real_pass._broken  # it compiled (no silent fallback)
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(compiled, ref))
    net32 = get_network("ConvNetW32", 1, 10, 8, seed=0)
    p32, x32, w32 = list(net32.parameters()), x.float(), w.float()
    bf16 = real_pass.run(weighted_grad, "bf16", "cpu", net32, p32, x32, y, w32)
    for a, b in zip(bf16, weighted_grad(net32, p32, x32, y, w32)):
        if b.dim() > 1:  # conv/linear weights (instance norm makes the conv biases' gradients ~0)
            assert a.dtype == torch.float32 and torch.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.95
    def no_compiler(*args):
        raise RuntimeError("no compiler")
    monkeypatch.setitem(real_pass._compiled, weighted_grad, no_compiler)
    with pytest.warns(UserWarning, match="real_pass=compile failed .*no compiler.*eager"):
        fallback = real_pass.run(weighted_grad, "compile", "cpu", net, params, x, y, w)
    assert all(torch.equal(a, b) for a, b in zip(fallback, ref))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, then eager quietly
        real_pass.run(weighted_grad, "compile", "cpu", net, params, x, y, w)
    real_pass._broken.clear()
    with pytest.raises(BenchmarkError, match="real_pass must be one of eager, compile, bf16"):
        create_method("dc", None, ["real_pass=fast"])
    with pytest.raises(BenchmarkError, match="real_pass must be one of"):
        create_method("iwd+idc", None, ["real_pass=fast"])


def test_dc_loop_table_and_rule():
    assert dc_loops(1) == (1, 1) and dc_loops(10) == (10, 50) and dc_loops(50) == (50, 10)
    assert dc_loops(5) == (1, 1) and dc_loops(15) == (10, 50) and dc_loops(100) == (50, 10)


@pytest.mark.parametrize("method", ["dc", "dsa", "dm", "idc", "pdd", "pdd-dc", "iwd+dc", "iwd+idc",
                                    "iwd+idc warm_start=true"])
def test_deterministic_and_resume_equals_uninterrupted(digits, task_of, tmp_path, method):
    method, *extra = method.split()
    over = TINY + extra + (["n_data=16", "factor=1"] if "idc" in method or method == "pdd" else []) + \
        (["stages=2", "iterations=2", "condition_epochs=1"] if method.startswith("pdd") else [])
    if method == "dm":
        over = ["iterations=3", "net_width=8", "batch_real=8"]
    ipc = 2
    a = create_method(method, None, over).distill(task_of(digits, ipc, 1))
    b = create_method(method, None, over).distill(task_of(digits, ipc, 1))
    assert torch.equal(a.images, b.images)
    # kill after the first checkpoint (simulated by an exception), then resume from it
    ck = str(tmp_path / "run.ckpt")
    m = create_method(method, None, over)
    calls = {"n": 0}
    orig = m.iteration

    def crash_second(task, state, it, gen):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return orig(task, state, it, gen)
    m.iteration = crash_second
    with pytest.raises(KeyboardInterrupt):
        m.distill(task_of(digits, ipc, 1, checkpoint_path=ck, checkpoint_every=1))
    from benchmark.core.synthetic import safe_load
    assert safe_load(ck)["next_iteration"] == 1  # the first iteration was checkpointed before the stop
    again, ran = create_method(method, None, over), []
    orig_again = again.iteration
    again.iteration = lambda task, state, it, gen: ran.append(it) or orig_again(task, state, it, gen)
    resumed = again.distill(task_of(digits, ipc, 1, checkpoint_path=ck, checkpoint_every=1))
    assert ran and ran[0] == 1 and 0 not in ran  # resumed from the checkpoint, not restarted from scratch
    assert [s["from_iteration"] for s in resumed.metadata["distill_segments"]] == [0, 1]
    assert torch.equal(resumed.images, a.images)


def test_time_based_checkpoint_resumes_exactly(digits, task_of, tmp_path):
    """checkpoint_minutes saves on wall time alone (an abrupt stop loses at most that much), and resumes exactly."""
    from benchmark.core.synthetic import safe_load
    full = create_method("dc", None, TINY).distill(task_of(digits, 1, 1))
    ck = str(tmp_path / "run.ckpt")
    m = create_method("dc", None, TINY)
    orig, seen = m.iteration, []

    def crash_third(task, state, it, gen):
        seen.append(it)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return orig(task, state, it, gen)
    m.iteration = crash_third
    with pytest.raises(KeyboardInterrupt):
        m.distill(task_of(digits, 1, 1, checkpoint_path=ck, checkpoint_minutes=1e-9))
    saved = safe_load(ck)
    assert saved["next_iteration"] == 2  # saved after iterations 0 and 1, no iteration count given
    resumed = create_method("dc", None, TINY).distill(task_of(digits, 1, 1, checkpoint_path=ck, checkpoint_minutes=1e-9))
    assert torch.equal(resumed.images, full.images)
    # the reported time covers both segments: the one before the stop (kept in the checkpoint) and the resumed one
    assert 0 < saved["elapsed_s"] < resumed.metadata["distill_seconds"]
    # and names the code of each segment (a run of hours may be resumed under a later commit)
    from benchmark.core.synthetic import code_commit
    assert resumed.metadata["distill_segments"] == [{"commit": code_commit(), "from_iteration": 0},
                                                    {"commit": code_commit(), "from_iteration": 2}]


def test_a_checkpoint_resumes_only_under_its_settings(digits, task_of, tmp_path, interrupt_at):
    """Resuming under other settings would give a set no single config makes: refused, naming what changed. More
    or fewer iterations may resume."""
    from benchmark.platform.errors import BenchmarkError
    ck = str(tmp_path / "run.ckpt")
    m = interrupt_at(create_method("dc", None, TINY), 2)
    with pytest.raises(KeyboardInterrupt):
        m.distill(task_of(digits, 1, 1, checkpoint_path=ck, checkpoint_every=1))
    with pytest.raises(BenchmarkError, match=r"other settings \(lr_img: 0\.1 -> 0\.5\)"):
        create_method("dc", None, TINY + ["lr_img=0.5"]).distill(task_of(digits, 1, 1, checkpoint_path=ck))
    # a checkpoint from before an option existed (its config lacks the key) resumes at the option's default, the
    # behaviour the older code had, and not under any other value
    from benchmark.platform.files import save_torch_atomic
    from benchmark.core.synthetic import safe_load
    old = safe_load(ck)
    del old["config"]["real_pass"]
    save_torch_atomic(ck, old)
    with pytest.raises(BenchmarkError, match=r"other settings \(real_pass: None -> 'compile'\)"):
        create_method("dc", None, TINY + ["real_pass=compile"]).distill(task_of(digits, 1, 1, checkpoint_path=ck))
    longer = create_method("dc", None, TINY + ["iterations=4"]).distill(task_of(digits, 1, 1, checkpoint_path=ck))
    assert longer.metadata["distill_segments"][-1]["from_iteration"] == 2


def test_commit_is_pinned_at_import(monkeypatch):
    """A record names the commit of the code the process imported, not whatever the checkout holds when it ends."""
    from benchmark.core import synthetic
    pinned = synthetic.code_commit()

    def later_checkout(*args, **kwargs):
        raise AssertionError("git asked again after import")
    monkeypatch.setattr(synthetic.subprocess, "run", later_checkout)
    assert synthetic.provenance()["commit"] == pinned


def test_commit_is_dirty_only_for_code_changes(tmp_path):
    """A README edit or a leaderboard a run rewrites under results/ leaves the code clean; a changed .py or suite
    file does not."""
    import subprocess
    from benchmark.core.synthetic import commit_of
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "results").mkdir()
    files = {"pkg/m.py": "x = 1\n", "pkg/s.yaml": "a: 1\n", "README.md": "r\n", "results/t.md": "t\n"}
    for name, text in files.items():
        (repo / name).write_text(text)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "-C", str(repo), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "c"], check=True)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    (repo / "README.md").write_text("edited\n")
    (repo / "results" / "t.md").write_text("rewritten\n")
    assert commit_of(str(repo / "pkg")) == head
    for name in ("pkg/s.yaml", "pkg/m.py"):
        subprocess.run(["git", "-C", str(repo), "checkout", "-q", "--", "."], check=True)
        (repo / name).write_text("changed\n")
        assert commit_of(str(repo / "pkg")) == head + "+dirty", name
    assert commit_of(str(tmp_path)) == "unknown"


def test_pdd_stages_leave_earlier_stages_untouched(digits, task_of):
    over = TINY + ["stages=2", "iterations=2", "condition_epochs=1"]
    m = create_method("pdd-dc", None, over)
    task = task_of(digits, 2, 0)
    snapshots = []
    orig = m.iteration

    def spy(task_, state, it, gen):
        out = orig(task_, state, it, gen)
        snapshots.append(state["images"].clone())
        return out
    m.iteration = spy
    syn = m.distill(task)
    stage_of = syn.extras["stage_of"]
    assert syn.extras["stages"] == [1, 1]
    # iterations 2-3 belong to stage 1: stage-0 rows stay exactly as stage 0 left them
    assert torch.equal(snapshots[1][stage_of == 0], snapshots[3][stage_of == 0])
    assert not torch.equal(snapshots[1][stage_of == 1], snapshots[3][stage_of == 1])
    stages = syn.stage_data(digits)
    assert [len(y) for _, y in stages] == [10, 20]


def test_a_short_distillation_lowers_the_matching_loss(digits, task_of):
    """Fixed network and real batch: image steps of DC lower the gradient-matching loss."""
    m = create_method("dc", "quick", ["init=real"])
    task = task_of(digits, 1, 0)
    state = m.init_state(task, torch.Generator().manual_seed(0))
    net = m.fresh_net(task, 0)
    leaf = state["images"].clone().requires_grad_(True)
    opt = torch.optim.SGD([leaf], lr=0.05, momentum=0.5)
    losses = []
    for _ in range(25):
        syn = {c: (leaf[c:c + 1], torch.tensor([c])) for c in range(10)}
        step = m.build_step(task, net, syn, torch.Generator().manual_seed(1), 0)
        loss = m.matching_loss(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_nan_stops_with_a_clear_message(digits, task_of, tmp_path):
    m = create_method("dc", None, TINY + ["lr_img=1e30"])
    with pytest.raises(BenchmarkError, match="non-finite .* at iteration"):
        m.distill(task_of(digits, 1, 0))


def test_ipc_larger_than_a_class(digits, task_of):
    with pytest.raises(BenchmarkError, match="larger than the smallest class"):
        create_method("dc", None, TINY).distill(task_of(digits, 500, 0))


def test_evaluation_is_deterministic_and_a_corrupt_checkpoint_is_a_clear_error(digits, task_of, tmp_path):
    from benchmark.core.synthetic import SyntheticSet
    from evaluation import evaluate
    idx = torch.cat([ix[:2] for ix in digits.class_indices])
    syn = SyntheticSet(digits.x_train[idx].clone(), digits.y_train[idx].clone())
    a = evaluate(syn, digits, "dc-quick", "ConvNetW32", num_eval=2, seed=3)
    b = evaluate(syn, digits, "dc-quick", "ConvNetW32", num_eval=2, seed=3)
    assert a["accuracies"] == b["accuracies"]
    ckpt = tmp_path / "run.pt.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(BenchmarkError, match="corrupt or truncated"):
        create_method("dc", None, TINY).distill(task_of(digits, 1, 0, checkpoint_path=str(ckpt), checkpoint_every=1))
    assert ckpt.exists()  # kept for inspection, never overwritten silently


def test_loss_prune_keeps_the_easy_instances(task_of, tmp_path):
    """Under 20% label noise, the lowest-loss fifth of each class (a briefly trained network) is nearly free of
    mislabeled instances: with `random` as the base, the selected images come from that pool."""
    from benchmark.data.datasets import get_dataset
    noisy = get_dataset("digits@label-noise=0.2")
    m = create_method("loss-prune-then-distill", "quick", ["base=random"])
    syn = m.distill(task_of(noisy, 10, 0, cache_dir=str(tmp_path)))
    picked = syn.extras["kept_index"][syn.extras["selected_index"]]  # selected within the kept pool
    kept_share = float(noisy.corrupted[picked].double().mean())
    assert syn.metadata["kept_corrupted_share"] < 0.05
    assert syn.metadata["kept"] == sum(max(10, round(len(ix) * 0.2)) for ix in noisy.class_indices)
    assert float(noisy.corrupted.double().mean()) > 0.15 and kept_share < 0.05, kept_share


def test_a_feature_network_is_cached_under_every_setting_that_changes_it(digits, task_of, tmp_path):
    """Herding's feature network lives in the task's one artefact cache, keyed by all its training settings: a run
    with another lr or batch trains its own instead of silently loading the one trained with the defaults, and a
    rerun with the same settings loads the stored network (same weights, no new file)."""
    from methods.baselines import HerdingConfig, feature_network
    task = task_of(digits, 1, 0, cache_dir=str(tmp_path))
    files = lambda: sorted(os.path.relpath(os.path.join(d, f), tmp_path)  # noqa: E731
                           for d, _, fs in os.walk(tmp_path) for f in fs)
    base = HerdingConfig(network="ConvNetD1", feature_epochs=1)
    net = feature_network(task, base)
    assert len(files()) == 1 and files()[0].startswith("feature-networks" + os.sep)
    other_lr = feature_network(task, HerdingConfig(network="ConvNetD1", feature_epochs=1, lr=0.05))
    other_batch = feature_network(task, HerdingConfig(network="ConvNetD1", feature_epochs=1, batch=64))
    assert len(files()) == 3
    w = lambda n: torch.cat([p.detach().flatten() for p in n.parameters()])  # noqa: E731
    assert not torch.equal(w(net), w(other_lr)) and not torch.equal(w(net), w(other_batch))
    from methods import baselines
    baselines._FEATURE_NETS.clear()  # a new process: from disk
    again = feature_network(task, base)
    assert again is not net and torch.equal(w(again), w(net)) and len(files()) == 3


def test_an_unwritable_cache_only_costs_a_feature_network_time(digits, task_of, tmp_path):
    """Herding with a cache that cannot be written (a file where its folder should be, unwritable even for root)
    trains its feature network in memory and selects, instead of failing."""
    from methods import baselines
    (tmp_path / "not-a-folder").write_text("")
    task = task_of(digits, 1, 0, cache_dir=str(tmp_path / "not-a-folder"))
    baselines._FEATURE_NETS.clear()
    net = baselines.feature_network(task, baselines.HerdingConfig(network="ConvNetD1", feature_epochs=1))
    assert sum(p.numel() for p in net.parameters()) > 0 and os.listdir(tmp_path) == ["not-a-folder"]


def test_a_feature_network_another_process_is_training_is_waited_for_not_trained_twice(digits, task_of, tmp_path,
                                                                                       monkeypatch):
    """Two cells of a suite running at once (two processes, or a process pool) both need herding's feature network:
    the second waits on the first's lock and loads the network it saved, instead of training its own."""
    import threading

    from benchmark.platform.files import save_torch_atomic
    from benchmark.platform.locks import file_lock
    from methods import baselines
    task = task_of(digits, 1, 0, cache_dir=str(tmp_path))
    cfg = baselines.HerdingConfig(network="ConvNetD1", feature_epochs=1)
    trained = []
    real_train = baselines._train_feature_network
    monkeypatch.setattr(baselines, "_train_feature_network", lambda *a: (trained.append(1), real_train(*a)))
    baselines.feature_network(task, cfg)  # where the cache keeps it
    path = next(os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f == "network.pt")
    stored = torch.load(path, weights_only=True)
    os.remove(path)
    baselines._FEATURE_NETS.clear()
    trained.clear()
    holding = threading.Event()
    saved = {k: v + 1 if v.is_floating_point() else v for k, v in stored.items()}  # what "the other process" saves

    def other_process():
        with file_lock(path + ".lock", "test", "wait"):
            holding.set()
            time.sleep(1.0)
            save_torch_atomic(path, saved)
    t = threading.Thread(target=other_process)
    t.start()
    holding.wait()
    net = baselines.feature_network(task, cfg)
    t.join()
    assert trained == []  # waited for the lock, then loaded
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
