"""Figures of the 2-D toy experiment (paper Fig. 4–6). Each function draws on given axes or returns a
figure; nothing here computes a bound."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Polygon, Rectangle  # noqa: E402

STYLE = {
    "true": dict(color="0.35", label="true polytope (image of the ε-box)"),
    "dual": dict(facecolor="#2ca02c", alpha=0.25, edgecolor="#1a7a1a", linewidth=1.4,
                 label="dual network (convex outer bound)"),
    "lp": dict(facecolor="none", edgecolor="#1f5fbf", linewidth=1.3, linestyle="--",
               label="LP (optimal over the same relaxation)"),
    "milp": dict(color="#d62728", linewidth=1.0, label="MILP exact support lines (solved to optimality)"),
    "box": dict(facecolor="none", edgecolor="#ff7f0e", linewidth=1.5, label="interval (layerwise) box"),
}
CLASS_COLORS = ("#1f77b4", "#d62728")


def _true_set(ax, mask, extent):
    """The rasterised true set (grey where covered)."""
    ax.imshow(np.ma.masked_where(~mask.T, mask.T), origin="lower", extent=extent, interpolation="nearest",
              cmap=ListedColormap([STYLE["true"]["color"]]), aspect="auto", zorder=1)


def _polygon(ax, vertices, style):
    ax.add_patch(Polygon(vertices, closed=True, **{k: v for k, v in style.items() if k != "label"}, zorder=2))


def _limits(ax, vertices, pad=0.08, square=False):
    """View the points' bounding box (each axis scaled to fill the panel, or one scale when ``square``)."""
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    half = (hi - lo) * (0.5 + pad)
    if square:
        half = np.full(2, half.max())
    mid = (lo + hi) / 2
    ax.set_xlim(mid[0] - half[0], mid[0] + half[0])
    ax.set_ylim(mid[1] - half[1], mid[1] + half[1])
    ax.autoscale(False)


def _support_lines(ax, C, values):
    """Lines cᵀz = value across the current view."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    reach = np.hypot(x1 - x0, y1 - y0)
    for c, v in zip(C, values):
        c = np.asarray(c, dtype=float)
        p, d = v * c / (c @ c), np.array([-c[1], c[0]]) / np.linalg.norm(c)
        mid = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        p = p + d * ((mid - p) @ d)                             # the line's point nearest the view centre
        seg = np.array([p - reach * d, p + reach * d])
        ax.plot(seg[:, 0], seg[:, 1], **{k: v for k, v in STYLE["milp"].items() if k != "label"}, zorder=4)


def polytope_panel(ax, panel: dict, lines: bool = True):
    """True set, dual and LP polygons and MILP support lines of one (ε, network), zoomed on the dual polygon."""
    _true_set(ax, panel["mask"], panel["extent"])
    _polygon(ax, panel["dual"], STYLE["dual"])
    if panel.get("lp") is not None:
        _polygon(ax, panel["lp"], STYLE["lp"])
    _limits(ax, panel["dual"])
    if lines and panel.get("milp") is not None:                  # only the proven ones: exact support lines
        m = panel["milp"]
        _support_lines(ax, m["C"][m["optimal"]], m["values"][m["optimal"]])
    ax.tick_params(labelsize=7)
    ax.locator_params(nbins=4)
    ax.ticklabel_format(useOffset=False)
    return ax


def legend_handles(which=("true", "dual", "lp", "milp", "box")):
    handles = []
    for key in which:
        s = STYLE[key]
        if key == "true":
            handles.append(Patch(color=s["color"], label=s["label"]))
        elif key == "milp":
            handles.append(Line2D([], [], color=s["color"], linewidth=s["linewidth"], label=s["label"]))
        else:
            handles.append(Patch(facecolor=s["facecolor"] if s["facecolor"] != "none" else "white",
                                 alpha=s.get("alpha", 1.0), edgecolor=s["edgecolor"],
                                 linestyle=s.get("linestyle", "-"), label=s["label"]))
    return handles


def polytopes_figure(panels: list, eps_values, n_nets: int, title: str):
    """Paper Fig. 4: rows ε, columns random networks."""
    fig, axes = plt.subplots(len(eps_values), n_nets, figsize=(2.55 * n_nets + 0.4, 2.55 * len(eps_values) + 1.0),
                             squeeze=False)
    for p in panels:
        ax = axes[p["row"], p["col"]]
        polytope_panel(ax, p)
        ok = p["milp"]["optimal"]
        ax.set_title(f"net {p['col'] + 1}: ×{p['ratio_dual']:.1f} dual, ×{p['ratio_lp']:.1f} LP, "
                     f"MILP {ok.sum()}/{len(ok)}", fontsize=8.5)
        if p["col"] == 0:
            ax.set_ylabel(f"ε = {eps_values[p['row']]:g}\n$z_2$", fontsize=10)
        if p["row"] == len(eps_values) - 1:
            ax.set_xlabel("$z_1$", fontsize=10)
    handles = legend_handles(("true", "dual", "lp", "milp"))
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9.5)
    fig.tight_layout(rect=(0, 0.09, 1, 0.98))
    return fig


def box_figure(panels: list, title: str):
    """The interval box around each polytope of one network (the paper's eqs. 36–37), with a zoomed inset."""
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels) + 0.3, 3.4), squeeze=False)
    for ax, p in zip(axes[0], panels):
        lo, hi = p["box"]
        ax.add_patch(Rectangle(lo, *(hi - lo), **{k: v for k, v in STYLE["box"].items() if k != "label"}))
        _polygon(ax, p["dual"], STYLE["dual"])
        ax.plot(*p["dual"].mean(axis=0), marker="o", color="#1a7a1a", markersize=3)
        _limits(ax, np.array([lo, hi]), pad=0.06, square=True)
        ax.tick_params(labelsize=7)
        ax.locator_params(nbins=4)
        w = p["dual"].max(axis=0) - p["dual"].min(axis=0)
        ax.set_title(f"ε = {p['eps']:g}: box {hi[0] - lo[0]:.3g} × {hi[1] - lo[1]:.3g}\n"
                     f"dual polytope {w[0]:.2g} × {w[1]:.2g}", fontsize=8.5)
        ax.set_xlabel("$z_1$", fontsize=9)
        # the zoomed inset goes in the corner farthest from the polytope
        where = (p["dual"].mean(axis=0) - lo) / (hi - lo)
        corner = [0.04 if where[0] > 0.5 else 0.54, 0.04 if where[1] > 0.5 else 0.54]
        inset = ax.inset_axes([*corner, 0.42, 0.42])
        polytope_panel(inset, p, lines=False)
        inset.set_xticks([])
        inset.set_yticks([])
        inset.text(0.5, 0.02, "zoom", transform=inset.transAxes, ha="center", va="bottom", fontsize=7)
    axes[0, 0].set_ylabel("$z_2$", fontsize=9)
    fig.legend(handles=legend_handles(("true", "dual", "lp", "box")), loc="lower center", ncol=2, fontsize=8,
               frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.13, 1, 0.97))
    return fig


def decision_panel(ax, grid, X, y, eps, flagged, title):
    """Decision regions on a grid, the points with their ε-squares; flagged squares (attacked) get an ×."""
    xx, yy, pred = grid
    ax.contourf(xx, yy, pred, levels=[-0.5, 0.5, 1.5], colors=["#c6dbef", "#fcbba1"])
    ax.contour(xx, yy, pred, levels=[0.5], colors="0.3", linewidths=0.8)
    for (x0, x1), label, bad in zip(X, y, flagged):
        color = CLASS_COLORS[int(label)]
        ax.add_patch(Rectangle((x0 - eps, x1 - eps), 2 * eps, 2 * eps, facecolor=color, alpha=0.55,
                               edgecolor=color, linewidth=0.8))
        if bad:
            ax.plot(x0, x1, marker="x", color="black", markersize=6, markeredgewidth=1.5)
    ax.set_xlim(xx.min(), xx.max())
    ax.set_ylim(yy.min(), yy.max())
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("$x_1$", fontsize=9)
    ax.tick_params(labelsize=7)
    return ax


def classifiers_figure(panels: list, eps: float):
    """Paper Fig. 5: standard vs robust training."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.3), squeeze=False)
    for ax, p in zip(axes[0], panels):
        decision_panel(ax, p["grid"], p["X"], p["y"], eps, p["flagged"], p["title"])
    axes[0, 0].set_ylabel("$x_2$", fontsize=9)
    handles = [Patch(facecolor=CLASS_COLORS[0], alpha=0.55, label=f"class 0 point, ε = {eps:g} square"),
               Patch(facecolor=CLASS_COLORS[1], alpha=0.55, label=f"class 1 point, ε = {eps:g} square"),
               Line2D([], [], marker="x", color="black", linestyle="none",
                      label="misclassified somewhere in its square")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def training_figure(logs: dict, panel: dict, title_right: str, note: str, marks=()):
    """Paper Fig. 6: training curves (left, middle) and one training point's polytopes (right).

    ``marks``: (step, label) drawn as dotted vertical lines on the curves (schedule changes)."""
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.5))
    colors = {"standard": "#1f77b4", "robust": "#d62728"}
    for mode, log in logs.items():
        if mode == "robust":
            axes[0].plot(log["epoch"], log["robust_loss"], color=colors[mode], label="robust: robust loss (bound)")
            axes[1].plot(log["epoch"], log["robust_error"], color=colors[mode], label="robust: robust error (bound)")
            axes[0].plot(log["epoch"], log["loss"], color=colors[mode], alpha=0.45, linestyle="--",
                         label="robust: clean loss")
        else:
            axes[0].plot(log["epoch"], log["loss"], color=colors[mode], label="standard: clean loss")
            axes[1].plot(log["epoch"], log["error"], color=colors[mode], label="standard: clean error")
    losses = np.concatenate([log[c].dropna().to_numpy() for log in logs.values() for c in ("loss", "robust_loss")])
    if losses.max() > 10 * losses.min() > 0:
        axes[0].set_yscale("log")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes[0].set_ylabel("cross-entropy (training set)", fontsize=9)
    axes[1].set_ylabel("error (training set)", fontsize=9)
    for ax in axes[:2]:
        for (step, label), color in zip(marks, ("0.55", "0.3")):
            ax.axvline(step, color=color, linewidth=0.9, linestyle=":", label=label)
        ax.set_xlabel("Adam step (full batch)", fontsize=9)
        ax.legend(fontsize=7.5)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    ax = polytope_panel(axes[2], panel, lines=False)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    handles = legend_handles(("true", "dual", "lp"))
    if 0 < x0 < 1.5 * (x1 - x0):                           # the decision boundary is near: widen the view to it
        x0 = -0.05 * x1
        ax.set_xlim(x0, x1)
    ax.set_ylim(y0 - 0.5 * (y1 - y0), y1)                  # room for the legend below the polygons
    if x0 <= 0 <= x1:
        ax.axvline(0, color="black", linewidth=1.0, linestyle="-.")
        handles.append(Line2D([], [], color="black", linestyle="-.", label="decision boundary (margin 0)"))
    ax.set_title(f"{title_right}\n{note}", fontsize=8)
    ax.set_xlabel("margin $z_y - z_{other}$", fontsize=9)
    ax.set_ylabel("mean logit $(z_1 + z_2)/2$", fontsize=9)
    ax.legend(handles=handles, fontsize=6.5, loc="lower right")
    fig.tight_layout()
    return fig
