"""run.py as a user meets it: listing, distilling, evaluating, and one-line errors that name the fix."""
import os

import torch

from helpers import cli as _cli, cli_in_process


def test_cli_list_distill_evaluate_and_clear_errors(tmp_path):
    out = _cli("list")
    assert out.returncode == 0 and "iwd+dc" in out.stdout and "fashion-mnist" in out.stdout
    bad = _cli("distill", "--method", "iwd+dcc", "--out", str(tmp_path / "x.pt"))
    assert bad.returncode == 2 and "Did you mean 'iwd+dc'" in bad.stderr and "Traceback" not in bad.stderr
    big = _cli("distill", "--method", "random", "--ipc", "1000", "--out", str(tmp_path / "x.pt"))
    assert big.returncode == 2 and "larger than the smallest class" in big.stderr
    miss = _cli("evaluate", str(tmp_path / "nothing.pt"))
    assert miss.returncode == 2 and "file not found" in miss.stderr
    ok = _cli("distill", "--method", "random", "--ipc", "2", "--out", str(tmp_path / "r.pt"))
    assert ok.returncode == 0, ok.stderr
    ev = _cli("evaluate", str(tmp_path / "r.pt"), "--protocol", "dc-quick", "--network", "ConvNetW32",
              "--num-eval", "1")
    assert ev.returncode == 0 and "dc-quick" in ev.stdout and "%" in ev.stdout
    plug = _cli("--plugin", "no_such_module_xyz", "list")
    assert plug.returncode == 2 and "failed to import" in plug.stderr


def test_bad_input_is_one_line_with_the_fix(tmp_path):
    cases = [(["distill", "-m", "random", "-d", "nosuch", "-o", "x.pt"], "unknown dataset 'nosuch'"),
             (["distill", "-m", "dc", "--ipc", "0", "-o", "x.pt"], "IPC must be at least 1"),
             (["distill", "-m", "iwd+dc", "--set", "tau=0", "-o", "x.pt"], "tau must be > 0"),
             (["distill", "-m", "dc", "--set", "iterations=1.5", "-o", "x.pt"], "expects int"),
             (["distill", "-m", "mtt", "--set", "syn_steps=0", "-o", "x.pt"], "syn_steps must be at least 1"),
             (["distill", "-m", "iwd+idc", "--set", "solver=woodbury", "--set", "curvature=hessian", "-o", "x.pt"],
              "solver=woodbury inverts the Gauss-Newton matrix only"),
             (["distill", "-m", "random", "-o", str(tmp_path / "f" / "x.pt")], "choose a writable --out"),
             (["run", "--suite", "quik"], "Did you mean 'quick'"),
             (["run", "--suite", "quick", "--run-root", str(tmp_path / "f" / "runs")], "writable --run-root"),
             (["evaluate", str(tmp_path / "nothing.pt")], "file not found")]
    (tmp_path / "f").write_text("a file where a folder should be")
    for args, message in cases:  # in this process (one interpreter start each would cost ~30 s in all)
        out = cli_in_process(*args, cwd=str(tmp_path))
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    ok = cli_in_process("distill", "-m", "random", "--ipc", "1", "-o", str(tmp_path / "r.pt"))
    assert ok.returncode == 0
    for args, message in [(["evaluate", str(tmp_path / "r.pt"), "--network", "ConvNett"], "Did you mean 'ConvNet'"),
                          (["evaluate", str(tmp_path / "r.pt"), "--protocol", "dcc"], "unknown protocol 'dcc'")]:
        out = cli_in_process(*args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_cli_run_has_download_and_refuses_absent_cuda(tmp_path):
    assert "--download" in _cli("run", "--help").stdout
    if torch.cuda.is_available():
        return
    out = _cli("run", "--suite", "quick", "--device", "cuda", "--run-root", str(tmp_path))
    assert out.returncode == 2 and "no GPU" in out.stderr and "Traceback" not in out.stderr


def test_check_runs_each_method_on_the_device_and_names_what_fails():
    """`run.py check` on cpu and on meta (the GPU stand-in): a row per method; a loaded plugin with a device bug
    is its own FAILED row with the one-line reason (the others still run) and the exit code is 1."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    for device in ("cpu", "meta"):
        out = _cli("--plugin", "leaky_plugin", "check", "--device", device, "--methods", "random,dc,test-device-leak",
                   env=env)
        rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:-1]}
        assert set(rows) == {"random", "dc", "test-device-leak"}, out.stdout + out.stderr
        assert " ok " in rows["random"] and " ok " in rows["dc"]
        if device == "meta":
            assert out.returncode == 1 and "FAILED" in rows["test-device-leak"] and "device" in rows["test-device-leak"]
            assert out.stdout.splitlines()[-1] == "2 of 3 methods ran on meta"
        else:  # nothing moves on the CPU: the bug does not show
            assert out.returncode == 0 and " ok " in rows["test-device-leak"], out.stdout
    bad = _cli("check", "--methods", "nosuch*")
    assert bad.returncode == 2 and "no registered method matches" in bad.stderr


def test_distill_checkpoints_by_time_unless_told_not_to(tmp_path, monkeypatch):
    """A plain `distill` (no checkpoint option) saves OUT.ckpt every 10 minutes of wall time, as suite cells do,
    so Ctrl-C after an hour loses at most ten minutes; --checkpoint-minutes 0 turns it off."""
    from click.testing import CliRunner

    import run
    seen = []

    def capture(*args):
        seen.append(args)
        raise SystemExit(0)
    monkeypatch.setattr(run, "_task", capture)
    out = str(tmp_path / "dc.pt")
    for extra, minutes in (([], 10.0), (["--checkpoint-minutes", "0"], 0.0)):
        CliRunner().invoke(run.cli, ["distill", "-m", "dc", "-o", out, *extra])
        assert seen[-1][8] == out + ".ckpt" and seen[-1][10] == minutes


def test_every_option_says_what_it_does():
    """Every option of every command has help text (the CLI reference and --help show it)."""
    import click

    import run
    bare = [f"{name} --{p.name}" for name, cmd in [("run.py", run.cli), *run.cli.commands.items()]
            for p in cmd.params if isinstance(p, click.Option) and not p.help]
    assert not bare, bare
