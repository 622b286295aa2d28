"""The figure of `ntkrun features` (docs/science.md §11): where the kernel regime ends."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import NullFormatter

from ntkrun.plots import STYLE, _save

COLORS = {"ntk": "tab:blue", "mup": "tab:red", "meanfield": "tab:orange"}
NAMES = {"ntk": "NTK", "mup": "muP", "meanfield": "mean-field"}


def _band(ax: plt.Axes, g: pd.DataFrame, x: str, metric: str, **style: object) -> None:
    """Mean over seeds +- its standard error against x."""
    stats = g.groupby(x)[metric].agg(["mean", "std", "count"])
    se = (stats["std"] / np.sqrt(stats["count"])).fillna(0)
    ax.errorbar(stats.index, stats["mean"], yerr=se, ms=3.5, **style)  # type: ignore[arg-type]


def _fit_label(fits: pd.DataFrame, arm: str, group: str, metric: str) -> str:
    row = fits[(fits["arm"] == arm) & (fits["group"] == group) & (fits["metric"] == metric)]
    if not len(row):
        return ""
    r = row.iloc[0]
    return f": slope {r['slope']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"


def _fit_line(
    ax: plt.Axes, fits: pd.DataFrame, arm: str, group: str, metric: str, xs: np.ndarray, color: str
) -> None:
    row = fits[(fits["arm"] == arm) & (fits["group"] == group) & (fits["metric"] == metric)]
    if len(row):
        r = row.iloc[0]
        ax.plot(xs, np.exp(r["intercept"]) * xs ** r["slope"], "-", color=color, lw=0.8, alpha=0.7)


def features_figure(arms: dict[str, pd.DataFrame], fits: pd.DataFrame, stem: Path, *, title: str) -> None:
    """(a) kernel change against width, a line per parametrization; (b) kernel change and distance
    to the linearized model against the output scale alpha; (c) the NTK's seed fluctuation at
    init against (depth - 1) / width, a colour per depth (the collapse); (d) test accuracy of the
    nets of (a) against the NTK predictor's; (e) kernel-label alignment before and after training."""
    width, alpha, ratio = arms["width"], arms["alpha"], arms["ratio"]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 5, figsize=(21, 4), gridspec_kw={"wspace": 0.3})
        ax = axes[0]
        for p, g in width.groupby("parametrization", sort=False):
            color = COLORS[p]
            label = f"{NAMES[p]} (depth {g['depth'].iloc[0]}){_fit_label(fits, 'width', p, 'change_T')}"
            _band(ax, g, "width", "change_T", fmt="o", color=color, label=label)
            _fit_line(ax, fits, "width", p, "change_T", np.array(sorted(g["width"].unique()), float), color)
        ax.set(
            xscale="log", yscale="log", xlabel="width n", title=r"(a) $\|\Theta_T-\Theta_0\|/\|\Theta_0\|$"
        )
        ax = axes[1]
        distance = "distance to its linearization"
        for metric, color, name in (
            ("change_T", "tab:blue", "kernel change"),
            ("lin_dist_T", "tab:green", distance),
        ):
            _band(ax, alpha, "alpha", metric, fmt="o", color=color,
                  label=f"{name}\n{_fit_label(fits, 'alpha', 'ntk', metric).removeprefix(': ')}")  # fmt: skip
            _fit_line(
                ax, fits, "alpha", "ntk", metric, np.array(sorted(alpha["alpha"].unique()), float), color
            )
        w = alpha["width"].iloc[0] if len(alpha) else 0
        ax.set(
            xscale="log",
            yscale="log",
            xlabel=r"output scale $\alpha$",
            title=f"(b) NTK, width {w}: lazy as alpha grows",
        )
        ax = axes[2]
        depths = sorted(ratio["depth"].unique())
        cmap = plt.get_cmap("viridis")
        for i, d in enumerate(depths):
            g = ratio[ratio["depth"] == d]
            color = cmap(i / max(len(depths) - 1, 1) * 0.85)
            _band(ax, g, "ratio", "spread_0", fmt="o-", color=color,
                  label=f"depth {d}{_fit_label(fits, 'ratio', f'depth {d}', 'spread_0')}")  # fmt: skip
        if len(ratio):
            r = np.array(sorted(ratio["ratio"].unique()), float)
            anchor = ratio[ratio["ratio"] == r[0]]["spread_0"].mean()
            ax.plot(r, anchor * (r / r[0]) ** 0.5, ":", color="gray", label="slope 1/2 (Hanin & Nica)")
        ax.set(xscale="log", yscale="log", xlabel="(depth - 1) / width",
               title=r"(c) seed fluctuation of $\Theta_0$")  # fmt: skip
        if not len(ratio):
            ax.text(0.5, 0.5, "not run (depth_width: [])", transform=ax.transAxes, ha="center", color="gray")
        ratios = sorted(ratio["ratio"].unique())
        ax.set_xticks(ratios, [f"1/{1 / x:.3g}" for x in ratios])  # often within one decade
        ax = axes[3]
        for p, g in width.groupby("parametrization", sort=False):
            _band(ax, g, "width", "acc_net", fmt="o-", color=COLORS[p], label=f"nets, {NAMES[p]}")
        for d, g in width.groupby("depth"):  # one NTK predictor per depth, whatever the parametrization
            ax.axhline(g["acc_ntk"].mean(), ls="--", color="gray", lw=1, label=f"NTK predictor (depth {d})")
        ax.set(
            xscale="log", xlabel="width n", ylabel="test accuracy", title="(d) nets against the NTK predictor"
        )
        ax = axes[4]
        for p, g in width.groupby("parametrization", sort=False):
            _band(ax, g, "width", "align_T", fmt="o-", color=COLORS[p], label=f"{NAMES[p]}, after training")
            ax.plot(sorted(g["width"].unique()), g.groupby("width")["align_0"].mean(), ":", color=COLORS[p],
                    label=f"{NAMES[p]}, at initialization")  # fmt: skip
        ax.set(xscale="log", xlabel="width n", title=r"(e) alignment $y^T\Theta y/(\|\Theta\|\,\|y\|^2)$")
        for ax in axes:
            ax.xaxis.set_minor_formatter(NullFormatter())
            if ax.get_legend_handles_labels()[0]:  # an arm not run (a composition's depth) draws nothing
                ax.legend(frameon=False, fontsize=7, loc="lower left" if ax is axes[1] else "best")
        fig.suptitle(title, fontsize=10)
        _save(fig, stem)
