"""The figure of a sweep (ntkrun.sweep): its points compared, from the run's concatenated tables
(one column per swept key). Each point's own figure is drawn by ntkrun.plots in its directory."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from ntkrun import plots


def _point_labels(frame: pd.DataFrame, keys: list[str]) -> pd.Series:
    """'depth=3, lr=0.5' per row: the swept values, each key by its last part."""
    parts = [key.split(".")[-1] + "=" + frame[key].astype(str) for key in keys]
    return parts[0].str.cat(parts[1:], sep=", ") if len(parts) > 1 else parts[0]


def _sweep_axis(frame: pd.DataFrame, keys: list[str]) -> tuple[pd.Series, str, list]:
    """The x of each row for a plot against the swept key: its value where one numeric key is swept,
    else the point's position (with its label as the tick). -> (x, axis label, the ticks)."""
    if len(keys) == 1 and pd.api.types.is_numeric_dtype(frame[keys[0]]):
        return frame[keys[0]].astype(float), keys[0], sorted(set(frame[keys[0]]))
    labels = _point_labels(frame, keys)
    order = list(dict.fromkeys(labels))
    return labels.map(order.index).astype(float), ", ".join(keys), order


def _set_sweep_ticks(ax: plt.Axes, ticks: list) -> None:
    """Ticks at the swept values (numbers), or at the points' positions with their labels."""
    if all(isinstance(t, str) for t in ticks):
        ax.set_xticks(range(len(ticks)), ticks, rotation=30, ha="right", fontsize=7)
    else:
        ax.set_xticks([float(t) for t in ticks], [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())


def _point_colors(labels: pd.Series) -> dict[str, tuple]:
    order = list(dict.fromkeys(labels))
    return {p: plt.get_cmap("viridis")(i / max(len(order) - 1, 1) * 0.9) for i, p in enumerate(order)}


def _features_sweep(tables: dict[str, pd.DataFrame], keys: list[str], fig: plt.Figure) -> None:
    """Per fitted slope of `ntkrun features` (an arm, its group, a metric): the slope with its
    interval against the swept key, beside the papers' slope."""
    fits = tables["fits.csv"]
    x, label, ticks = _sweep_axis(fits, keys)
    fits = fits.assign(_x=x)
    panels = list(dict.fromkeys(zip(fits["arm"], fits["group"], fits["metric"], strict=True)))
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharex=True))
    for ax, (arm, group, metric) in zip(axes, panels, strict=True):
        g = fits[(fits["arm"] == arm) & (fits["group"] == group) & (fits["metric"] == metric)].sort_values(
            "_x"
        )
        err = [(g["slope"] - g["ci_low"]).clip(lower=0), (g["ci_high"] - g["slope"]).clip(lower=0)]
        ax.errorbar(g["_x"], g["slope"], yerr=err, fmt="o-", ms=3.5, capsize=2, color="tab:blue")
        ax.axhline(g["reference_slope"].iloc[0], ls=":", color="gray")
        ax.set_title(f"{metric} in {arm} ({group})", fontsize=8)
        ax.set_xlabel(label)
        _set_sweep_ticks(ax, ticks)
    axes[0].set_ylabel("slope (dotted: the papers')")


def _scaling_sweep(tables: dict[str, pd.DataFrame], keys: list[str], fig: plt.Figure) -> None:
    """Per metric, against the swept key: the fitted slope in width with its interval (top), and
    the constant at the reference rate, C = geometric mean over widths and seeds of metric x
    n^-slope_ref (bottom; a free fit's intercept moves with its slope). A line per depth where the
    points have several, else one line across the points (a sweep over depth)."""
    fits, table = tables["fits.csv"], tables["scaling.csv"]
    x, label, ticks = _sweep_axis(fits, keys)
    fits, table = fits.assign(_x=x), table.assign(_x=_sweep_axis(table, keys)[0])
    if fits.groupby(keys)["depth"].nunique().max() == 1:  # one depth per point: one line across them
        fits, table = fits.assign(depth=0), table.assign(depth=0)
    metrics = list(plots.SCALING_TITLES)
    axes = fig.subplots(2, len(metrics), sharex=True)
    depths = sorted(fits["depth"].unique())
    colors = {d: plt.get_cmap("viridis")(i / max(len(depths) - 1, 1) * 0.85) for i, d in enumerate(depths)}
    for j, metric in enumerate(metrics):
        top, bottom = axes[0][j], axes[1][j]
        ref = fits[fits["metric"] == metric]["reference_slope"].iloc[0]
        for depth in depths:
            g = fits[(fits["metric"] == metric) & (fits["depth"] == depth)].sort_values("_x")
            # a percentile interval of few seeds may miss the point estimate: no negative bar
            err = [(g["slope"] - g["ci_low"]).clip(lower=0), (g["ci_high"] - g["slope"]).clip(lower=0)]
            name = f"L = {depth}" if len(depths) > 1 else "fitted slope, 95% bootstrap interval"
            top.errorbar(
                g["_x"], g["slope"], yerr=err, fmt="o-", ms=3.5, capsize=2, color=colors[depth], label=name
            )
            rows = table[table["depth"] == depth]
            log_c = (np.log(rows[metric]) - ref * np.log(rows["width"])).groupby(rows["_x"]).mean()
            bottom.plot(log_c.index, np.exp(log_c), "o-", ms=3.5, color=colors[depth])
        top.axhline(ref, ls=":", color="gray", label=f"slope {ref:g} (reference)")
        top.set_title(plots.SCALING_TITLES[metric], fontsize=9)
        top.set_ylabel("slope in width")
        bottom.set_yscale("log")
        bottom.set_ylabel(f"C = geomean of value x n^{-ref:g}")
        bottom.set_xlabel(label)
        _set_sweep_ticks(bottom, ticks)
        plots._legend(top)


def _generalization_sweep(tables: dict[str, pd.DataFrame], keys: list[str], fig: plt.Figure) -> None:
    """(a) learning curves, a colour per point and a line style per kernel predictor; (b) test accuracy
    against the swept key, a line per kernel predictor and N_train (filled markers at the largest),
    and the nets (mean +- std over seeds at their widest width)."""
    acc = tables["accuracy.csv"].assign(_point=lambda f: _point_labels(f, keys))
    colors = _point_colors(acc["_point"])
    styles = {"ntk": "-", "nngp": "--", "mlp_ntk": "-.", "mlp_nngp": ":", "ntk_t": ":"}
    ax_curve, ax_key = fig.subplots(1, 2, gridspec_kw={"wspace": 0.3})
    kernels = acc[acc["predictor"].isin(["ntk", "nngp", "mlp_ntk", "mlp_nngp"])]
    same = []  # predictors whose curve the swept keys do not change: drawn once, in black, and said
    for kind, by_kind in kernels.groupby("predictor", sort=False):
        curves = {point: g.sort_values("n_train") for point, g in by_kind.groupby("_point", sort=False)}
        shapes = {(tuple(g["n_train"]), tuple(g["test_accuracy"])) for g in curves.values()}
        identical = len(curves) > 1 and len(shapes) == 1
        if identical:
            curves = dict(list(curves.items())[:1])
            same.append(plots.KERNEL_STYLES[kind][1])
        for point, g in curves.items():
            color = "black" if identical else colors[point]
            ax_curve.plot(g["n_train"], g["test_accuracy"], "o" + styles[kind], ms=3, color=color)
    if len(kernels):
        ax_curve.set_xscale("log")
        sizes = sorted({int(n) for n in kernels["n_train"]})
        ax_curve.set_xticks(sizes, [f"{n:d}" for n in sizes], fontsize=7)
        ax_curve.xaxis.set_minor_formatter(NullFormatter())
    # a legend entry per point (colour) and per predictor (line style), not per pair
    handles = [Line2D([], [], color=c, marker="o", ms=3, label=p) for p, c in colors.items()]
    handles += [Line2D([], [], color="gray", ls=styles[k], label=plots.KERNEL_STYLES[k][1])
                for k in dict.fromkeys(kernels["predictor"])]  # fmt: skip
    if same:
        handles.append(Line2D([], [], color="black", label=f"the same at every point: {', '.join(same)}"))
    if handles:
        ax_curve.legend(handles=handles, frameon=False, fontsize=7, ncol=2)
    ax_curve.set_xlabel("training points N_train")
    ax_curve.set_ylabel("test accuracy")
    ax_curve.set_title("(a) learning curves, a colour per point", fontsize=9)
    x, label, ticks = _sweep_axis(acc, keys)
    acc = acc.assign(_x=x)
    for kind, (color, name) in plots.KERNEL_STYLES.items():
        g = acc[acc["predictor"] == kind]
        largest = g["n_train"].max() if len(g) else None
        for n, at in g.groupby("n_train"):
            at = at.sort_values("_x")
            face = color if n == largest else "white"
            ax_key.plot(at["_x"], at["test_accuracy"], "o" + styles[kind], color=color, mfc=face, ms=4,
                        alpha=1.0 if n == largest else 0.6, label=f"{name}, N_train = {int(n)}")  # fmt: skip
    nets = acc[acc["predictor"] == "net"]
    if len(nets):
        widest = nets[nets["width"] == nets.groupby("_x")["width"].transform("max")]
        g = widest.groupby("_x")["test_accuracy"]
        ax_key.errorbar(g.mean().index, g.mean(), yerr=g.std().fillna(0), fmt="s-", color="k", ms=4,
                        label="nets (widest), mean +- std")  # fmt: skip
    ax_key.set_xlabel(label)
    ax_key.set_ylabel("test accuracy")
    ax_key.set_title("(b) accuracy against the swept key", fontsize=9)
    _set_sweep_ticks(ax_key, ticks)
    plots._legend(ax_key)


# (csv, column, which step rows: first/last/None, title, log y) of the width panels per experiment
WIDTH_PANELS = {
    "convergence": [
        ("metrics.csv", "rel_dist_to_limit", "first", "(a) ||Theta_n(0) - Theta_inf|| / ||Theta_inf||", True),
        ("metrics.csv", "rel_change_from_first", "last", "(b) kernel change in training, relative", True),
    ],
    "regression": [
        ("metrics.csv", "in_band_inf", None, "(a) nets inside the limit's percentile band (t = inf)", False),
        ("metrics.csv", "mean_dist_in_std", None, "(b) rms(seed mean - limit mean) / rms(limit std)", True),
    ],
    "pca": [
        ("metrics.csv", "max_h_over_c", None, "(a) max ||h_t|| / c, off the principal direction", True),
        ("metrics.csv", "rate_over_lambda", None, "(b) fitted decay rate of ||g_t|| / lambda_k", False),
    ],
}


def _width_sweep(panels: list, tables: dict[str, pd.DataFrame], keys: list[str], fig: plt.Figure) -> None:
    """A metric against width per panel, a line per point (log-log where the panel says)."""
    axes = fig.subplots(1, len(panels), gridspec_kw={"wspace": 0.3})
    for ax, (csv, column, step, title, log_y) in zip(axes, panels, strict=True):
        frame = tables[csv]
        if step is not None:
            pick = frame.groupby(keys)["step"].transform("min" if step == "first" else "max")
            frame = frame[frame["step"] == pick]
        frame = frame.assign(_point=_point_labels(frame, keys))
        colors = _point_colors(frame["_point"])
        for point, g in frame.groupby("_point", sort=False):
            g = g.groupby("width")[column].mean()
            ax.plot(g.index, g.values, "o-", ms=3.5, color=colors[point], label=point)
        ax.set_xscale("log")
        widths = sorted({int(w) for w in frame["width"]})
        ax.set_xticks(widths, [f"{w:d}" for w in widths], fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("width n")
        ax.set_title(title, fontsize=9)
        plots._legend(ax)


def sweep_figure(experiment: str, tables: dict[str, pd.DataFrame], keys: list[str], stem: Path, *,
                 title: str) -> None:  # fmt: skip
    """The figure comparing a sweep's points, from its concatenated tables (one column per swept key)."""
    with plt.rc_context(plots.STYLE):
        if experiment == "scaling":
            fig = plt.figure(figsize=(4.3 * len(plots.SCALING_TITLES), 6.5))
            _scaling_sweep(tables, keys, fig)
        elif experiment == "generalization":
            fig = plt.figure(figsize=(11, 4))
            _generalization_sweep(tables, keys, fig)
        elif experiment == "features":
            fig = plt.figure(figsize=(16, 3.6))
            _features_sweep(tables, keys, fig)
        else:
            fig = plt.figure(figsize=(10, 3.8))
            _width_sweep(WIDTH_PANELS[experiment], tables, keys, fig)
        fig.suptitle(title, fontsize=10)
        plots._save(fig, stem)
