"""`ntkrun scaling`: end to end and Theorem 1's rate."""

from __future__ import annotations

import pandas as pd
from typer.testing import CliRunner

from ntkrun.cli import app


def run(args: list[str], root):
    result = CliRunner().invoke(app, ["scaling", *args, "--quiet", "--output-root", str(root)])
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in (root / "scaling").iterdir() if p.name != "latest"]
    return run_dir


def test_quick_preset_shape(tmp_path):
    run_dir = run(["--preset", "quick", "--set", "network.width=[16, 32, 64]", "--seeds", "3"], tmp_path)
    table = pd.read_csv(run_dir / "scaling.csv")
    metrics = ["dist_init", "spread_init", "change_T", "func_dist_T"]
    assert list(table.columns) == ["depth", "width", "seed", *metrics]
    assert len(table) == 2 * 3 * 3 and (table[metrics] > 0).all().all()
    fits = pd.read_csv(run_dir / "fits.csv")
    assert (
        len(fits) == 2 * 4
        and (fits["ci_low"] <= fits["slope"]).all()
        and (fits["slope"] <= fits["ci_high"]).all()
    )
    assert (run_dir / "figure.png").exists()


def test_distance_at_init_decays_like_width_to_the_minus_half(tmp_path):
    """Theorem 1 with its CLT rate: the fitted slope of ||Theta_n - Theta_inf|| / ||Theta_inf||
    over widths 128..2048 (16 seeds each) has a 95% bootstrap interval containing -1/2, for
    depths 2 and 3, and that interval excludes 0 and -1 (the test can tell rates apart); so has the
    seed spread, which needs no limit."""
    run_dir = run(["--set", "network.depth=[2, 3]", "--set", "network.width=[128, 256, 512, 1024, 2048]",
                   "--seeds", "16", "--steps", "1", "--set", "training.n_train=8"], tmp_path)  # fmt: skip
    fits = pd.read_csv(run_dir / "fits.csv")
    init = fits[fits["metric"].isin(["dist_init", "spread_init"])]
    assert len(init) == 4
    for row in init.itertuples():
        assert row.ci_low <= -0.5 <= row.ci_high, row
        assert row.ci_high < 0 and row.ci_low > -1, row


def test_a_cnn_on_gaussian_images_reports_the_same_rates(tmp_path):
    """network.arch=cnn on 1x4x4 Gaussian images (3x3 circular convolutions, GAP readout): the
    distance of the empirical NTK at init to the CNN's limit falls with the channels, a 95%
    bootstrap interval below 0 (Theorem 1 for CNNs; the rate -1/2 is in the paper-scale run)."""
    run_dir = run(["--preset", "cnn", "--set", "network.depth=[2]", "--set", "network.width=[16, 64, 256]",
                   "--set", "data.image=[1, 4, 4]", "--set", "network.padding=circular",
                   "--set", "network.readout=gap", "--seeds", "4", "--steps", "2"], tmp_path)  # fmt: skip
    fits = pd.read_csv(run_dir / "fits.csv").set_index("metric")
    assert fits.loc["dist_init", "ci_high"] < 0, fits
    assert "arch: cnn" in (run_dir / "spec.yaml").read_text()


def test_a_cnn_without_images_is_refused_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["scaling", "--preset", "quick", "--set", "network.arch=cnn", "--check"])
    assert result.exit_code == 2
    assert "network.arch: a cnn takes images; set data.inputs: gaussian, data.image: [C, H, W]" in (
        result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1
