"""Figures. Each function takes tidy DataFrames and writes <stem>.png and <stem>.pdf."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import NullFormatter

from ntkrun.atomic import atomic_write

STYLE = {"font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "savefig.dpi": 200}


def _save(fig: plt.Figure, stem: Path) -> None:
    """<stem>.png and <stem>.pdf, each written to a temporary name and renamed into place."""
    for ext, extra in (("png", {}), ("pdf", {"metadata": {"CreationDate": None}})):
        atomic_write(
            stem.with_suffix(f".{ext}"),
            lambda tmp, ext=ext, extra=extra: fig.savefig(tmp, format=ext, bbox_inches="tight", **extra),
        )
    plt.close(fig)


def _step_styles(steps: list[int]) -> dict[int, str]:
    """First recorded step solid, last dashed, any in between dotted."""
    return {s: "-" if i == 0 else "--" if i == len(steps) - 1 else ":" for i, s in enumerate(steps)}


def convergence_figure(
    summary: pd.DataFrame, kernels: pd.DataFrame, stem: Path, *, lr: float, seeds: int, title: str
) -> None:
    """Paper Figure 1 with the analytic limit: Theta(x0, x) against gamma (t = step * lr).

    Left: every seed (colour per width, solid t = first step, dashed t = last step).
    Right: the seed mean with a +-1 std band per width and step.
    """
    widths = sorted(kernels["width"].unique())
    steps = sorted(kernels["step"].unique())
    styles = _step_styles(steps)
    colors = {w: plt.get_cmap("tab10")(i) for i, w in enumerate(widths)}
    limit = summary.drop_duplicates("gamma").sort_values("gamma")
    with plt.rc_context(STYLE):
        fig, (ax_all, ax_mean) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        for (width, step, _seed), g in kernels.groupby(["width", "step", "seed"], sort=True):
            ax_all.plot(g["gamma"], g["theta"], styles[step], color=colors[width], lw=0.7, alpha=0.6)
        for (width, step), g in summary.groupby(["width", "step"], sort=True):
            label = f"n = {width}, step {step} (t = {step * lr:g})"
            ax_mean.plot(g["gamma"], g["mean"], styles[step], color=colors[width], lw=1.2, label=label)
            ax_mean.fill_between(
                g["gamma"], g["mean"] - g["std"], g["mean"] + g["std"], color=colors[width], alpha=0.15
            )
        for ax in (ax_all, ax_mean):
            ax.plot(limit["gamma"], limit["theta_inf"], color="black", lw=1.4, label=r"$\Theta^{(L)}_\infty$")
            if "theta_inf_se" in limit:  # a Monte-Carlo limit: its +-2 standard errors
                low, high = (
                    limit["theta_inf"] - 2 * limit["theta_inf_se"],
                    limit["theta_inf"] + 2 * limit["theta_inf_se"],
                )
                ax.fill_between(limit["gamma"], low, high, color="black", alpha=0.2, lw=0)
            ax.set_xlabel(r"$\gamma$")
            ax.set_xlim(-3.1416, 3.1416)
        handles = [plt.Line2D([], [], color=colors[w], label=f"n = {w}") for w in widths]
        handles += [plt.Line2D([], [], color="gray", ls=styles[s], label=f"step {s} (t = {s * lr:g})")
                    for s in steps]  # fmt: skip
        name = "Monte-Carlo limit +- 2 SE" if "theta_inf_se" in limit else r"limit $\Theta_\infty^{(L)}$"
        handles += [plt.Line2D([], [], color="black", lw=1.4, label=name)]
        ax_all.legend(handles=handles, frameon=False, fontsize=8)
        ax_all.set_ylabel(r"$\Theta(x_0, x)$,  $x = (\cos\gamma, \sin\gamma)$")
        ax_all.set_title(f"{seeds} seeds per width")
        ax_mean.set_title(rf"seed mean $\pm$ 1 std;  t = lr $\times$ steps, lr {lr:g}")
        fig.suptitle(title, fontsize=10)
        _save(fig, stem)


def regression_figure(
    functions: pd.DataFrame,
    limit: pd.DataFrame,
    training: pd.DataFrame,
    stem: Path,
    *,
    band: tuple[float, float],
    seeds: int,
    title: str,
) -> None:
    """Paper Figure 2: f_T on the circle for every seed and width, with the percentile band
    (band = (lower, upper) percentile) of the limiting Gaussian at t = inf (shaded, median
    dashed) and at t = T (dotted)."""
    widths = sorted(functions["width"].unique())
    colors = {w: plt.get_cmap("tab10")(i + 2) for i, w in enumerate(widths)}
    lo, mid, hi = (f"p{p:g}" for p in (band[0], 50, band[1]))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        inf = limit[np.isinf(limit["t"])].sort_values("gamma")
        finite = limit[~np.isinf(limit["t"])].sort_values("gamma")
        ax.fill_between(
            inf["gamma"],
            inf[lo],
            inf[hi],
            color="0.85",
            lw=0,
            label=f"limit {lo[1:]}-{hi[1:]}% band, t = inf",
        )
        if mid in inf:
            ax.plot(inf["gamma"], inf[mid], "--", color="black", lw=1.2, label="limit median, t = inf")
        for col in (lo, hi):
            ax.plot(
                finite["gamma"],
                finite[col],
                ":",
                color="0.35",
                lw=1.0,
                label=f"limit band, t = T = {finite['t'].iloc[0]:g}" if col == lo else None,
            )
        for (width, _seed), g in functions.groupby(["width", "seed"], sort=True):
            ax.plot(g["gamma"], g["f_T"], color=colors[width], lw=0.8, alpha=0.8)
        for w in widths:
            ax.plot([], [], color=colors[w], label=f"n = {w} ({seeds} seeds)")
        ax.plot(training["gamma"], training["y"], "o", color="black", ms=5, label="training points")
        ax.set_xlabel(r"$\gamma$")
        ax.set_ylabel(r"$f_\theta(\cos\gamma, \sin\gamma)$ after training")
        ax.set_xlim(-3.1416, 3.1416)
        ax.set_title(title)
        ax.legend(frameon=False, fontsize=7, loc="best")
        _save(fig, stem)


SCALING_TITLES = {
    "dist_init": r"$\|\Theta_n(0) - \Theta_\infty\| / \|\Theta_\infty\|$",
    "spread_init": r"$\|\Theta_n(0) - \overline{\Theta_n(0)}\| / \|\overline{\Theta_n(0)}\|$ (seeds)",
    "change_T": r"$\|\Theta_n(T) - \Theta_n(0)\| / \|\Theta_n(0)\|$",
    "func_dist_T": r"$\|f_T - f^{lin}_T\| / \|f^{lin}_T - f_0\|$",
}


def scaling_figure(table: pd.DataFrame, fits: pd.DataFrame, stem: Path, *, title: str) -> None:
    """Log-log panels per metric: seed mean +- SE per width and depth, fitted lines, reference slope;
    where the limit is a Monte-Carlo estimate, twice the jackknife SE its noise adds to a metric
    ({metric}_se: a metric near that line measures the estimate's noise, not the network)."""
    depths = sorted(table["depth"].unique())
    colors = {d: plt.get_cmap("viridis")(i / max(len(depths) - 1, 1) * 0.85) for i, d in enumerate(depths)}
    metrics = list(SCALING_TITLES)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.0 * len(metrics), 3.8), layout="constrained")
        for ax, metric in zip(axes, metrics, strict=True):
            for depth in depths:
                g = table[table["depth"] == depth].groupby("width")[metric]
                mean, se = g.mean(), g.std() / np.sqrt(g.count())
                fit = fits[(fits["depth"] == depth) & (fits["metric"] == metric)].iloc[0]
                label = f"L = {depth}: slope {fit['slope']:.2f} [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]"
                ax.errorbar(mean.index, mean, yerr=se, fmt="o", ms=3.5, color=colors[depth], label=label)
                w = np.array(mean.index, float)
                ax.plot(w, np.exp(fit["intercept"]) * w ** fit["slope"], "-", color=colors[depth], lw=1)
                if f"{metric}_se" in table:  # a Monte-Carlo limit: how far its noise reaches
                    noise = 2 * table[table["depth"] == depth].groupby("width")[f"{metric}_se"].mean()
                    ax.plot(noise.index, noise, "--", color=colors[depth], lw=0.8, alpha=0.7)
            w = np.array(sorted(table["width"].unique()), float)
            ref = fits[fits["metric"] == metric]["reference_slope"].iloc[0]
            anchor = table[table["width"] == w[0]][metric].mean()
            ax.plot(w, anchor * (w / w[0]) ** ref, ":", color="gray", label=f"slope {ref:g} (reference)")
            if f"{metric}_se" in table:
                ax.plot([], [], "--", color="gray", lw=0.8, label="2 SE of the Monte-Carlo limit")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("width n")
            ax.set_title(SCALING_TITLES[metric], fontsize=9)
            ax.legend(frameon=False, fontsize=7, loc="lower left")  # the points fall to the right
        fig.suptitle(title, fontsize=10)
        _save(fig, stem)


def pca_figure(
    components: pd.DataFrame,
    traj: pd.DataFrame,
    stem: Path,
    *,
    lam_k: float,
    c: float,
    k: int,
    kernel: str,
    lam_se: float | None = None,
) -> None:
    """Paper Figure 3: (a) digits at (f(2), f(3)) by label (the `kernel` named); (b) ||h_t||
    against ||g_t||; (c) ||g_t|| against t with the limit c exp(-lambda_k t) (and, for a
    Monte-Carlo lambda_k, the band of lambda_k +- 2 lam_se)."""
    widths = sorted(traj["width"].unique())
    colors = {w: plt.get_cmap("plasma")(i / max(len(widths), 1) * 0.85) for i, w in enumerate(widths)}
    with plt.rc_context(STYLE):
        fig, (ax_a, ax_b, ax_c) = plt.subplots(1, 3, figsize=(13, 4), layout="constrained")
        scatter = ax_a.scatter(
            components["f2"], components["f3"], c=components["label"], cmap="tab10", s=6, vmin=-0.5, vmax=9.5
        )
        fig.colorbar(scatter, ax=ax_a, ticks=range(10), label="digit")
        ax_a.set_xlabel("$f^{(2)}(x_i)$")
        ax_a.set_ylabel("$f^{(3)}(x_i)$")
        ax_a.set_title(f"(a) {len(components)} digits, {kernel} kernel")
        for (width, _seed), g in traj.groupby(["width", "seed"], sort=True):
            ax_b.plot(g["g_norm"], g["h_norm"], color=colors[width], lw=1)
            ax_c.plot(g["t"], g["g_norm"], color=colors[width], lw=1)
        for w in widths:
            for ax in (ax_b, ax_c):
                ax.plot([], [], color=colors[w], label=f"n = {w}")
        t = np.linspace(0, traj["t"].max(), 200)
        ax_c.plot(
            t, c * np.exp(-lam_k * t), "--", color="black", label=rf"${c:g}\,e^{{-\lambda_{k} t}}$ (limit)"
        )
        if lam_se is not None:
            low, high = c * np.exp(-(lam_k + 2 * lam_se) * t), c * np.exp(-(lam_k - 2 * lam_se) * t)
            ax_c.fill_between(
                t, low, high, color="gray", alpha=0.25, lw=0, label=rf"$\lambda_{k} \pm$ 2 SE (Monte Carlo)"
            )
        ax_b.plot([c, 0], [0, 0], "--", color="black", lw=1, label="limit")
        ax_b.set_xlabel(r"$\|g_t\|$")
        ax_b.set_ylabel(r"$\|h_t\|$")
        ax_b.set_title(f"(b) trajectory along / off $f^{{({k})}}$")
        ax_b.invert_xaxis()
        ax_c.set_xlabel(r"t = lr $\times$ GD steps")
        ax_c.set_ylabel(r"$\|g_t\|$")
        ax_c.set_yscale("log")
        ax_c.set_title(rf"(c) decay along $f^{{({k})}}$, $\lambda_{k}$ = {lam_k:.3g}")
        for ax in (ax_b, ax_c):
            ax.legend(frameon=False, fontsize=7)
        _save(fig, stem)


KERNEL_STYLES = {
    "ntk": ("C0", "NTK (t = inf)"),
    "nngp": ("C1", "NNGP"),
    "ntk_t": ("C2", "NTK at the nets' t"),
    "mlp_ntk": ("C9", "MLP NTK"),
    "mlp_nngp": ("C3", "MLP NNGP"),
}


def generalization_figure(
    accuracy: pd.DataFrame,
    distance: pd.DataFrame,
    fits: pd.DataFrame,
    stem: Path,
    *,
    n_net: int,
    title: str,
) -> None:
    """(a) learning curves: test accuracy vs N_train, a line per kernel (a Monte-Carlo kernel's with
    its +-2 jackknife SE band), the nets (trained on n_net points) as points; (b) test accuracy vs
    width, the kernel predictors at n_net as lines; (c) distance of the nets to the NTK predictor vs
    width (log-log) with the fitted slopes. Without nets (kernel predictors only), (a) alone."""
    nets = accuracy[accuracy["predictor"] == "net"]
    with plt.rc_context(STYLE):
        if not len(nets) and not len(distance):
            fig, ax = plt.subplots(figsize=(6.0, 3.8))
            _learning_curves(ax, accuracy, nets, n_net)
            ax.set_title("learning curves", fontsize=9)
        else:
            fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8), gridspec_kw={"wspace": 0.35})
            _learning_curves(axes[0], accuracy, nets, n_net)
            axes[0].set_title("(a) learning curves", fontsize=9)
            _accuracy_vs_width(axes[1], accuracy, nets, n_net)
            _distances(axes[2], distance, fits)
        fig.suptitle(title, fontsize=10)
        _save(fig, stem)


def _learning_curves(ax: plt.Axes, accuracy: pd.DataFrame, nets: pd.DataFrame, n_net: int) -> None:
    for kind in ("ntk", "nngp", "mlp_ntk", "mlp_nngp"):
        g = accuracy[accuracy["predictor"] == kind].sort_values("n_train")
        if len(g):
            color, label = KERNEL_STYLES[kind]
            style = "o--" if kind.startswith("mlp_") else "o-"
            ax.plot(g["n_train"], g["test_accuracy"], style, color=color, ms=3.5, label=label)
            if "test_accuracy_se" in g and g["test_accuracy_se"].notna().any():  # Monte-Carlo kernels
                low, high = (g["test_accuracy"] + k * 2 * g["test_accuracy_se"] for k in (-1, 1))
                ax.fill_between(g["n_train"], low, high, color=color, alpha=0.2, lw=0)
    widths = sorted(nets["width"].unique())
    shades = {
        w: plt.get_cmap("Greys")(0.35 + 0.6 * i / max(len(widths) - 1, 1)) for i, w in enumerate(widths)
    }
    for w in widths:
        acc = nets[nets["width"] == w]["test_accuracy"]
        yerr = [acc.std() if len(acc) > 1 else 0]
        ax.errorbar(
            [n_net], [acc.mean()], yerr=yerr, fmt="s", ms=4, color=shades[w], label=f"net, width {w:g}"
        )
    ax.set_xscale("log")
    sizes = sorted({int(n) for n in accuracy["n_train"]})  # labelled where the points are, not 10^k
    ax.set_xticks(sizes, [f"{n:d}" for n in sizes], fontsize=7)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training points N_train")
    ax.set_ylabel("test accuracy")
    _legend(ax)


def _accuracy_vs_width(ax: plt.Axes, accuracy: pd.DataFrame, nets: pd.DataFrame, n_net: int) -> None:
    if len(nets):
        g = nets.groupby("width")["test_accuracy"]
        ax.errorbar(g.mean().index, g.mean(), yerr=g.std().fillna(0), fmt="s-", color="k", ms=4, label="nets")
    for kind, (color, label) in KERNEL_STYLES.items():
        at = accuracy[(accuracy["predictor"] == kind) & (accuracy["n_train"] == n_net)]
        if len(at):
            ax.axhline(at["test_accuracy"].iloc[0], color=color, ls="--", lw=1, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width n")
    ax.set_title(f"(b) accuracy vs width, N_train = {n_net}", fontsize=9)
    _legend(ax)


def _distances(ax: plt.Axes, distance: pd.DataFrame, fits: pd.DataFrame) -> None:
    for metric, marker, label in (
        ("dist_t", "o", "to NTK at the nets' t"),
        ("dist_inf", "^", "to NTK, t = inf"),
    ):
        if not len(distance) or fits.empty:
            break
        g = distance.groupby("width")[metric]
        fit = fits[fits["metric"] == metric].iloc[0]
        text = f"{label}: slope {fit['slope']:.2f} [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]"
        line = ax.errorbar(g.mean().index, g.mean(), yerr=g.std().fillna(0), fmt=marker, ms=4, label=text)
        w = np.array(g.mean().index, float)
        ax.plot(w, np.exp(fit["intercept"]) * w ** fit["slope"], "-", lw=1, color=line[0].get_color())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width n")
    ax.set_ylabel("||f_net - f_ntk|| / ||f_ntk|| (test)")
    ax.set_title("(c) nets approach the NTK predictor", fontsize=9)
    _legend(ax)


def _legend(ax: plt.Axes) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=7)
