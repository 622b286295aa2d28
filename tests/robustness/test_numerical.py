"""Numerical faults end in one clear line naming the unit (or the spec key) and the remedy."""

from __future__ import annotations

from typer.testing import CliRunner

from ntkrun.cli import app

QUICK = ["--preset", "quick", "--seeds", "1", "--width", "64", "--quiet"]


def invoke(tmp_path, *args: str):
    result = CliRunner().invoke(app, [*args, "--output-root", str(tmp_path)])
    assert "Traceback" not in result.output and result.stderr.count("\n") == 1, result.output
    return result


def test_divergence_names_the_network_and_the_step(tmp_path):
    result = invoke(tmp_path, "convergence", *QUICK, "--set", "training.lr=100")
    assert result.exit_code == 1
    assert "width 64, seed 0: training diverged at step" in result.stderr
    assert "lower training.lr (now 100.0)" in result.stderr and ".failed" in result.stderr
    (run,) = (tmp_path / "convergence").iterdir()
    assert run.name.endswith(".failed") and not (run / "meta.json").exists()


def test_a_singular_kernel_names_the_unit_and_the_remedy(tmp_path):
    result = invoke(tmp_path, "regression", *QUICK, "--kernel", "empirical", "--set", "kernel_width=1")
    assert result.exit_code == 1
    assert "unit limit: kernel matrix is singular" in result.stderr
    assert "kernel_width 1 is too narrow (or use kernel: analytic)" in result.stderr


def test_duplicate_training_points_are_refused_up_front(tmp_path):
    angles = "data.train_angles=[0.5, 2.0, 6.783185307179586]"  # 0.5 + 2 pi: the same point
    result = invoke(tmp_path, "regression", *QUICK, "--set", angles)
    assert result.exit_code == 2 and "repeat a point of the circle" in result.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_float32_underflow_of_a_deep_relu_network_is_refused(tmp_path):
    deep = ["convergence", *QUICK, "--set", "network.depth=300", "--set", "network.beta=0"]
    result = invoke(tmp_path, *deep)
    assert result.exit_code == 2
    assert "depth 300 with relu and beta 0.0 drives the kernels to 9.8" in result.stderr
    assert "float32 would underflow" in result.stderr and "use dtype: float64" in result.stderr
    accepted = CliRunner().invoke(app, [*deep, "--set", "dtype=float64", "--check"])
    assert accepted.exit_code == 0, accepted.output


def test_the_range_check_asks_the_architecture_not_the_mlp_recursion(tmp_path):
    """A depth-109 ReLU (beta 0) network in float32: the MLP's Sigma(109) = 0.1 / 2^109 = 3.1e-34
    stays above the 1.2e-34 the check keeps (tiny x 1e4), but a CNN's with zero padding loses
    variance at the image's borders at every layer: its output's Sigma is 9.35e-35, refused, where
    judging it by the MLP's recursion accepted it."""
    base = ["scaling", "--preset", "quick", "--quiet", "--check", "--set", "network.depth=[109]",
            "--set", "network.beta=0", "--set", "dtype=float32"]  # fmt: skip
    mlp = CliRunner().invoke(app, base)
    assert mlp.exit_code == 0, mlp.output
    cnn = ["--set", "network.arch=cnn", "--set", "data.inputs=gaussian", "--set", "data.image=[1, 28, 28]"]
    result = invoke(tmp_path, *base, *cnn)
    assert result.exit_code == 2, result.output
    assert "depth 109 with relu and beta 0.0 drives the kernels to 9.35e-35" in result.stderr


def test_status_of_a_failed_run_names_the_failed_unit_and_the_error(tmp_path):
    """The unit that crashed is "failed" with its reason (it said "not started"), and the run's
    ERROR is pointed at with the command that resumes it; once resumed and done, the note goes."""
    result = invoke(tmp_path, "convergence", *QUICK, "--set", "training.lr=100")
    assert result.exit_code == 1
    (run,) = (tmp_path / "convergence").iterdir()
    status = CliRunner().invoke(app, ["status", str(run)])
    assert status.exit_code == 0, status.output
    row = next(line for line in status.stdout.splitlines() if "w64_s0" in line)
    assert "failed" in row and "DivergenceError" in row and "not started" not in row
    assert "run FAILED: DivergenceError: width 64, seed 0: training diverged at step" in status.stdout
    assert f"({run / 'ERROR'}); resume with: ntkrun resume {run}" in status.stdout
    assert (run / "units" / "w64_s0.failed").is_file()
