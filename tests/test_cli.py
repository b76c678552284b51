"""run.py as a user meets it: listing, distilling, evaluating, and one-line errors that name the fix."""
import torch

from helpers import cli as _cli


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
    for args, message in cases:
        out = _cli(*args, cwd=str(tmp_path))
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    ok = _cli("distill", "-m", "random", "--ipc", "1", "-o", str(tmp_path / "r.pt"))
    assert ok.returncode == 0
    for args, message in [(["evaluate", str(tmp_path / "r.pt"), "--network", "ConvNett"], "Did you mean 'ConvNet'"),
                          (["evaluate", str(tmp_path / "r.pt"), "--protocol", "dcc"], "unknown protocol 'dcc'")]:
        out = _cli(*args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_cli_run_has_download_and_refuses_absent_cuda(tmp_path):
    assert "--download" in _cli("run", "--help").stdout
    if torch.cuda.is_available():
        return
    out = _cli("run", "--suite", "quick", "--device", "cuda", "--run-root", str(tmp_path))
    assert out.returncode == 2 and "no GPU" in out.stderr and "Traceback" not in out.stderr
