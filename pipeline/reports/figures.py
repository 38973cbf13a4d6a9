"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot: no global state, no display).

Each function draws one small PNG into the figures folder and returns a FigureRef: the anchor other
parts of the report link to, the path relative to reports/, a title and a one-line caption.
A function returns None when its runs hold nothing to draw.
"""
from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator

from pipeline.reports.records import RunRecord, finite, loss_quantities, pareto_front

# Figures are drawn on Figure objects (no pyplot, no global figure state); Agg renders them. Set for any
# pyplot user in the same process too: never a display backend on a headless runner.
matplotlib.use("Agg")

DPI = 100  # small files and quick encoding, and 7-point text still readable on screen (≈10 px)
FIGURE_DIR = "figures"
# axes.titley fixed: otherwise every draw measures all tick labels to lift the title clear of them, which
# was a quarter of a figure's time; our margins leave the room.
STYLE = {"axes.titley": 1.02, "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7,
         "xtick.labelsize": 7, "ytick.labelsize": 7, "axes.spines.top": False, "axes.spines.right": False}
matplotlib.rcParams.update(STYLE)


@dataclass(frozen=True)
class FigureRef:
    anchor: str  # id in the HTML and the markdown, e.g. "fig-grad-digits_mlp"
    path: str  # relative to the reports folder, with forward slashes: "figures/grad_digits_mlp.png"
    title: str
    caption: str
    kind: str = "chart"  # "samples": a model's own image grid, shown pixelated and at least 240 px wide


def slug(*parts: str) -> str:
    """A name safe for files and anchors: lowercase letters, digits, '_' and '-'."""
    return "-".join(re.sub(r"[^a-z0-9_]+", "-", str(p).lower()).strip("-") for p in parts)


def anchor_curves(dataset: str, task: str) -> str:
    return f"fig-curves-{slug(dataset, task)}"


def anchor_gap(dataset: str, task: str) -> str:
    return f"fig-gap-{slug(dataset, task)}"


def anchor_grad(name: str) -> str:
    return f"fig-grad-{slug(name)}"


def colors_for(records: list[RunRecord]) -> dict[str, tuple]:
    """One stable colour per experiment of a group, shared by all of that group's figures."""
    from matplotlib import colormaps
    cmap = colormaps["tab10" if len(records) <= 10 else "tab20"]
    return {r.name: cmap(i % cmap.N) for i, r in enumerate(sorted(records, key=lambda r: r.name))}


class FigureWriter:
    """Saves figures into reports/figures/ and hands back their references."""

    def __init__(self, folder: Path, link_dir: str = FIGURE_DIR):
        self.folder = Path(folder)
        self.link_dir = link_dir  # the folder as the report links it, relative to the report
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, fig: Figure, stem: str, anchor: str, title: str, caption: str) -> FigureRef:
        name = f"{stem}.png"
        # compress_level 1: PNG encoding is most of a figure's cost; the files stay small at this size.
        fig.savefig(self.folder / name, dpi=DPI, pil_kwargs={"compress_level": 1})
        return FigureRef(anchor, f"{self.link_dir}/{name}", title, caption)

    def copy(self, source: Path, stem: str, anchor: str, title: str, caption: str) -> FigureRef:
        name = f"{stem}{source.suffix.lower()}"
        shutil.copyfile(source, self.folder / name)
        return FigureRef(anchor, f"{self.link_dir}/{name}", title, caption, kind="samples")


def new_figure(width: float, height: float, rows: int = 1, cols: int = 1, *, left: float = 0.6,
               right: float = 0.15, top: float = 0.3, bottom: float = 0.45, wspace: float = 0.25,
               sharey: bool = False, width_ratios: list[float] | None = None) -> tuple[Figure, list]:
    """A figure with margins fixed in inches: no layout engine, which would cost a second draw per figure."""
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey, gridspec_kw={
        "left": left / width, "right": 1 - right / width, "top": 1 - top / height, "bottom": bottom / height,
        "wspace": wspace, "width_ratios": width_ratios})
    return fig, list(axes.flat)


def _short(label: str, most: int = 26) -> str:
    return label if len(label) <= most else "…" + label[-(most - 1):]


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of one history column, non-finite values dropped (a diverged run's last epoch)."""
    xs, ys = [], []
    for i, row in enumerate(history):
        y = finite(row.get(key))
        if y is not None:
            xs.append(row.get("epoch", i + 1))
            ys.append(y)
    return xs, ys


def seed_band(record: RunRecord, key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """(epochs, mean, lowest, highest) of a history column over the seeds (epochs some seed reached)."""
    by_epoch: dict[float, list[float]] = {}
    for history in (record.seed_histories or {0: record.history}).values():
        for x, y in zip(*_series(history, key)):
            by_epoch.setdefault(x, []).append(y)
    xs = sorted(by_epoch)
    return (xs, [sum(by_epoch[x]) / len(by_epoch[x]) for x in xs], [min(by_epoch[x]) for x in xs],
            [max(by_epoch[x]) for x in xs])


def forest(writer: FigureWriter, dataset: str, task: str, comparisons: list) -> FigureRef | None:
    """Each comparison's advantage of A over B (mean over shared seeds) with its 95% interval, coloured by verdict."""
    shown = [c for c in comparisons if math.isfinite(c.low) and math.isfinite(c.high)]
    if not shown:
        return None
    palette = {"better": "#1a7f37", "worse": "#cf222e", "equivalent": "#0969da", "inconclusive": "#6e7781"}
    fig, (ax,) = new_figure(7.5, 0.9 + 0.32 * len(shown), left=2.6, right=1.3, bottom=0.5)
    for i, c in enumerate(shown):
        y = len(shown) - 1 - i
        ax.plot([c.low, c.high], [y, y], color=palette[c.verdict], lw=2)
        ax.plot([c.advantage], [y], "o", color=palette[c.verdict], ms=4)
        ax.text(1.01, y, f"{c.verdict} (n={c.n})", transform=ax.get_yaxis_transform(), va="center", fontsize=7,
                color=palette[c.verdict])
    ax.axvline(0, color="black", lw=0.8)
    if shown[0].margin:
        ax.axvspan(-shown[0].margin, shown[0].margin, color="#0969da", alpha=0.08, lw=0)
    ax.set_yticks(range(len(shown)), [_short(f"{c.a} vs {c.b}", 40) for c in reversed(shown)], fontsize=7)
    ax.set_xlabel(f"advantage of A over B in {shown[0].metric} (positive: A better)")
    ax.grid(axis="x", alpha=0.25)
    caption = (f"Paired differences on {dataset} ({task}): mean over shared seeds (dot) and 95% interval from the "
               "two-level bootstrap (seeds, then test examples), coloured by verdict; the shaded band is the metric's "
               "practical-equivalence margin.")
    return writer.save(fig, f"forest_{slug(dataset, task)}", f"forest-{slug(dataset, task)}",
                       f"Who beats whom — {dataset} ({task})", caption)


def log_axis(axis, low: float, high: float) -> None:
    """Plain-number labels on a log axis (an axis already on a log scale).

    Minor ticks only at 2× and 5× and only when the range spans under two decades, where they carry
    the labels (under a factor of 4, at 1.5×, 2×, 3×, 5×, 7×, so a narrow range still shows two numbers);
    wider ranges have enough decades labelled. (Default minor ticks, 8 a decade, each with
    its own text, were most of a figure's drawing time.)
    """
    axis.set_major_formatter(FuncFormatter(_tick_label))
    if high > 0 and low > 0 and math.log10(high / low) < 0.6:  # under 4×: 2× and 5× may miss it; all labelled
        axis.set_minor_locator(LogLocator(base=10, subs=(1.5, 2.0, 3.0, 5.0, 7.0)))
        axis.set_minor_formatter(FuncFormatter(_tick_label))
    elif high > 0 and low > 0 and math.log10(high / low) < 2:
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        axis.set_minor_formatter(FuncFormatter(_minor_tick_label))
    else:
        axis.set_minor_locator(NullLocator())


def _log_y(ax, values: list[float]) -> None:
    ax.set_yscale("log")
    log_axis(ax.yaxis, min(values), max(values))


def _maybe_log(ax, values: list[float]) -> None:
    """Log scale when every value is positive and they span more than a factor of 20."""
    if values and min(values) > 0 and max(values) / min(values) > 20:
        _log_y(ax, values)


def _legend_below(fig: Figure, names: list[str], colors: dict) -> None:
    handles = [Line2D([], [], color=colors[n], lw=1.5) for n in names]
    handles += [Line2D([], [], color="0.3", ls="--", lw=1), Line2D([], [], color="0.3", lw=1.5)]
    labels = [*names, "training", "validation"]
    fig.legend(handles, labels, loc="lower center", ncols=min(4, len(labels)), frameon=False)


# ── per dataset and task ─────────────────────────────────────────────────────
def learning_curves(writer: FigureWriter, dataset: str, task: str, records: list[RunRecord],
                    colors: dict) -> FigureRef | None:
    metric = next((r.main_metric for r in records if r.main_metric), None)
    panels = [("loss", "loss")] + ([(metric, metric)] if metric else [])
    drawn = [r for r in records if r.history]
    if not drawn:
        return None
    legend_rows = math.ceil((len(drawn) + 2) / 4)
    bottom = 0.5 + 0.17 * legend_rows
    fig, axes = new_figure(7.5, 2.2 + bottom, 1, len(panels), bottom=bottom, left=0.5)
    players = False  # a GAN's panel draws d_loss and g_loss: no single loss exists
    for ax, (key, label) in zip(axes, panels):
        values: list[float] = []
        for r in drawn:
            quantities = loss_quantities(r.history) if key == "loss" else [key]
            players |= quantities != [key]
            for quantity, marker in zip(quantities, ("", "o", "s", "^")):
                for split, style in (("train", "--"), ("val", "-")):
                    xs, ys, low, high = seed_band(r, f"{split}/{quantity}")
                    if ys:
                        ax.plot(xs, ys, style, marker=marker, markersize=2.5, color=colors[r.name],
                                lw=1.2 if split == "val" else 0.9)
                        if split == "val" and low != high:
                            ax.fill_between(xs, low, high, color=colors[r.name], alpha=0.18, lw=0)
                        values += low + high
        _maybe_log(ax, values)
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.25)
    _legend_below(fig, [r.name for r in drawn], colors)
    caption = (f"Learning curves on {dataset} ({task}): "
               + ("loss (left) and " + metric + " (right)" if metric else "loss")
               + " per epoch, training dashed, validation solid; with several seeds, the lines are the mean over "
               "seeds and the band spans the lowest to the highest seed (validation)."
               + (" A GAN has no single loss: its players' losses are drawn, the discriminator's d_loss plain, "
                  "the generator's g_loss with dots." if players else ""))
    return writer.save(fig, f"curves_{slug(dataset, task)}", anchor_curves(dataset, task),
                       f"Learning curves — {dataset} ({task})", caption)


def gap_chart(writer: FigureWriter, dataset: str, task: str, records: list[RunRecord]) -> FigureRef | None:
    metric = next((r.main_metric for r in records if r.main_metric), "metric")
    shown = [r for r in records if any(r.gap(q, w) is not None for q in ("loss", "metric") for w in ("best", "final"))]
    if not shown:
        return None
    labels = [_short(f"{r.name} ({r.verdict})" if r.verdict else r.name, 34) for r in shown]
    left = 0.2 + 0.055 * max(len(label) for label in labels)
    fig, axes = new_figure(7.5, 1.35 + 0.32 * len(shown), 1, 2, left=left, bottom=0.65, sharey=True)
    y = np.arange(len(shown))
    for ax, quantity, title in ((axes[0], "loss", "loss gap"), (axes[1], "metric", f"{metric} gap")):
        best = [r.gap(quantity, "best") for r in shown]
        final = [r.gap(quantity, "final") for r in shown]
        ax.barh(y - 0.2, [v if v is not None else 0 for v in best], 0.38, color="#9ecae1", label="best epoch")
        ax.barh(y + 0.2, [v if v is not None else 0 for v in final], 0.38, color="#2171b5", label="last epoch")
        ax.axvline(0, color="0.3", lw=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.set_title(f"{title} (validation − training)")
        ax.grid(axis="x", alpha=0.25)
    axes[0].set_yticks(y, labels)
    axes[0].invert_yaxis()
    fig.legend(*axes[1].get_legend_handles_labels(), loc="lower center", ncols=2, frameon=False)
    caption = (f"Generalisation gap per model on {dataset}: validation minus training loss (left) and {metric} "
               "(right) at the best epoch (light) and the last (dark); the overfitting verdict is in brackets.")
    return writer.save(fig, f"gap_{slug(dataset, task)}", anchor_gap(dataset, task),
                       f"Generalisation gap — {dataset} ({task})", caption)


def pareto(writer: FigureWriter, dataset: str, task: str, records: list[RunRecord], colors: dict,
           mode: str) -> FigureRef | None:
    metric = next((r.main_metric for r in records if r.main_metric), "metric")
    axes_spec = [("flops_forward_per_sample", "forward FLOPs per sample"), ("train_time_s", "training time (s)")]
    points = {}
    for key, _ in axes_spec:
        pts = []
        for r in records:
            cost = finite(r.cost.get(key))
            if cost is None and key == "train_time_s":
                cost = finite(r.metrics.get(key))
            if cost is not None and cost > 0 and r.test_value is not None:
                pts.append((r, cost, r.test_value))
        points[key] = pts
    if not any(points.values()):
        return None
    fig, axes = new_figure(7.5, 3.0, 1, 2, left=0.65, top=0.45, sharey=True)
    for ax, (key, label) in zip(axes, axes_spec):
        pts = points[key]
        ax.set_xlabel(label)
        ax.grid(alpha=0.25)
        if not pts:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="0.5")
            continue
        for r, x, yv in pts:
            ax.scatter([x], [yv], s=18, color=colors[r.name], zorder=3)
        front = pareto_front([(x, yv) for _, x, yv in pts], mode)
        fx, fy = [pts[i][1] for i in front], [pts[i][2] for i in front]
        ax.step(fx, fy, "--", where="post", color="0.35", lw=0.9, zorder=2)
        ax.scatter(fx, fy, s=70, facecolors="none", edgecolors="0.2", lw=0.9, zorder=4, label="Pareto front")
        ax.set_xscale("log")
        costs = [x for _, x, _ in pts]
        log_axis(ax.xaxis, min(costs) / 1.5, max(costs) * 1.5)
        ax.margins(x=0.15, y=0.12)
    axes[0].set_ylabel(f"test {metric}")
    FigureCanvasAgg(fig).draw()  # fixes the axis limits: labels are placed in display coordinates
    for ax, (key, _) in zip(axes, axes_spec):
        label_points(ax, [(r.name, x, yv, colors[r.name]) for r, x, yv in points[key]])
    if any(ax.collections for ax in axes):
        fig.legend(handles=[Line2D([], [], ls="--", color="0.35", marker="o", mfc="none", mec="0.2", ms=7)],
                   labels=["Pareto front"], loc="upper center", frameon=False)
    better = "higher" if mode == "max" else "lower"
    caption = (f"Test {metric} ({better} is better) against forward FLOPs per sample (left) and training time "
               f"(right) on {dataset}; ringed points on the dashed line form the Pareto front: no other model "
               "is both cheaper and better.")
    return writer.save(fig, f"pareto_{slug(dataset, task)}", f"fig-pareto-{slug(dataset, task)}",
                       f"Cost against quality — {dataset} ({task})", caption)


# Where a point's label may go, in points from the point: right or left of it, then ever further above and
# below (a label's line is about 9 points high).
LABEL_OFFSETS = tuple((dx, dy) for dy in (3, -9, 14, -20, 25, -31, 36, -42) for dx in (4, -4))


def label_points(ax, points: list[tuple[str, float, float, tuple]], fontsize: float = 6) -> None:
    """Name each point (name, x, y, colour) at the first nearby place where its label stays inside the axes
    and covers no point and no label placed before it, so that models with near-equal scores stay readable.
    A label in its point's colour; one moved away from its point gets a thin leader line to it; one with no
    free place goes right of and above its point. The axis limits must be final (draw first)."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dots = [ax.transData.transform((x, y)) for _, x, y, _ in points]

    def place(name: str, x: float, y: float, color, offset: tuple[float, float]):
        far = offset not in LABEL_OFFSETS[:4]
        text = ax.annotate(name, (x, y), xytext=offset, textcoords="offset points", fontsize=fontsize,
                           color=color, ha="left" if offset[0] > 0 else "right",
                           arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5, "shrinkA": 0,
                                       "shrinkB": 3} if far else None)
        text.update_positions(renderer)
        return text, Text.get_window_extent(text, renderer)  # the words alone, not the leader line

    taken, leaders = [], []
    # Right-most point first, labels to its right, leaders near-vertical: a later (left) point's leader stays left
    # of every label placed before it, so leaders do not run through labels where a free place exists.
    order = sorted(range(len(points)), key=lambda i: -dots[i][0])

    def free(box, line, strict):
        inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
        if not inside or any(box.overlaps(o) for o in taken) or any(box.contains(*d) for d in dots):
            return False
        return not strict or not (any(_crosses(seg, box) for seg in leaders)
                                  or (line is not None and any(_crosses(line, o) for o in taken)))

    for i in order:
        name, x, y, color = points[i]
        chosen = None
        for strict in (True, False):
            for offset in LABEL_OFFSETS:
                text, box = place(name, x, y, color, offset)
                far = offset not in LABEL_OFFSETS[:4]
                line = (tuple(dots[i]), (box.x0 if offset[0] > 0 else box.x1, (box.y0 + box.y1) / 2)) if far else None
                if free(box, line, strict):
                    chosen = (box, line)
                    break
                text.remove()
            if chosen:
                break
        else:
            text, box = place(name, x, y, color, LABEL_OFFSETS[0])
            chosen = (box, None)
        taken.append(chosen[0])
        if chosen[1] is not None:
            leaders.append(chosen[1])


def _crosses(segment, box, samples: int = 24) -> bool:
    """Whether a leader line (two display points) passes through a label's box (checked at evenly spaced points)."""
    (x0, y0), (x1, y1) = segment
    return any(box.contains(x0 + (x1 - x0) * t / samples, y0 + (y1 - y0) * t / samples) for t in range(1, samples))


def _tick_label(value: float, _pos=None) -> str:
    """Log-axis labels as plain numbers with an SI prefix: 0.5, 2, 40, 1.2k, 3M."""
    if value <= 0:
        return ""
    if value < 1e-3:
        return f"{value:.0e}"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:g}{prefix}"
    return f"{value:g}"


def _minor_tick_label(value: float, _pos=None) -> str:
    """Minor ticks labelled at 2× and 5× a power of ten only, so a narrow log axis still has numbers."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return _tick_label(value) if round(mantissa, 6) in (2.0, 5.0) else ""


# ── per model ────────────────────────────────────────────────────────────────
MAX_LABELLED_ROWS = 80  # a gradient heatmap labels every layer up to this many, then every k-th


def _tick_every(n: int, most: int) -> int:
    return max(1, math.ceil(n / most))


def _dead_fraction_last(record: RunRecord) -> tuple[list[str], list[float]] | None:
    """Dead-unit fraction per probed ReLU-family layer at the last epoch (per-epoch rows or a single row)."""
    act = record.diagnostics.get("activations")
    if not isinstance(act, dict) or not act.get("layers") or not act.get("dead_fraction"):
        return None
    dead = act["dead_fraction"]
    last = dead[-1] if isinstance(dead[0], list) else dead
    layers = list(act["layers"])
    if len(last) != len(layers):
        return None
    relu = act.get("relu_family")
    keep = [i for i in range(len(layers)) if not isinstance(relu, list) or len(relu) != len(layers) or relu[i]]
    if not keep:
        return None  # no ReLU-family layer: "dead" has no meaning for tanh or sigmoid units
    return [layers[i] for i in keep], [finite(last[i]) or 0.0 for i in keep]


def grad_health(writer: FigureWriter, record: RunRecord) -> FigureRef | None:
    matrix = record.grad_norm_matrix()
    if matrix is None:
        return None
    layers, epochs, mean = matrix
    grid = np.array([[finite(v) or np.nan for v in row] for row in mean], dtype=float).T  # (L, E)
    dead = _dead_fraction_last(record)
    # Panels placed in inches: the heatmap's and the dead-unit bars' label widths vary with layer names.
    label_w = 0.15 + 0.05 * max(len(_short(name)) for name in layers)
    dead_label_w = 0.15 + 0.05 * max(len(_short(name)) for name in dead[0]) if dead else 0.0
    heat_w, cbar_gap, global_w, dead_w, gap = 3.2, 1.45, 2.0, 1.2, 0.55
    width = label_w + heat_w + cbar_gap + global_w + (gap + dead_label_w + dead_w if dead else 0) + 0.25
    # 0.13 in per layer: every row keeps its label (6 pt) up to MAX_LABELLED_ROWS layers.
    plot_h = 0.9 + 0.13 * min(len(layers), MAX_LABELLED_ROWS)
    # Below the plots 0.5 in for the epoch axis; above them 0.75 in: the panel titles, then the figure's title.
    height = plot_h + 1.25
    fig = Figure(figsize=(width, height))
    place = lambda x, w: fig.add_axes((x / width, 0.5 / height, w / width, plot_h / height))
    _layer_heatmap(fig, place(label_w, heat_w), grid, layers, epochs, colorbar_x=(label_w + heat_w + 0.08) / width,
                   colorbar_w=0.1 / width)
    _global_norm_panel(place(label_w + heat_w + cbar_gap, global_w), record, epochs)
    if dead:
        _dead_units_panel(place(width - 0.25 - dead_w, dead_w), *dead)
    flags = record.raised_flags()
    fig.suptitle(f"{record.name}: " + (", ".join(flags) if flags else "no gradient flags"), fontsize=9,
                 y=1 - 0.12 / height, va="top")
    caption = (f"Gradient health of {record.name}: mean gradient norm per layer and epoch (log colour, first layer "
               "on top), the global norm's epoch mean and max"
               + (", and the fraction of dead units per layer at the last epoch." if dead else "."))
    return writer.save(fig, f"grad_{slug(record.name)}", anchor_grad(record.name),
                       f"Gradient health — {record.name}", caption)


def _layer_heatmap(fig, ax, grid: np.ndarray, layers: list[str], epochs: list[int], colorbar_x: float,
                   colorbar_w: float) -> None:
    """Mean gradient norm per layer (rows, first on top) and epoch, in log colour, with its colour bar."""
    positive = grid[np.isfinite(grid) & (grid > 0)]
    if positive.size:
        norm = LogNorm(vmin=max(positive.min(), 1e-12), vmax=max(positive.max(), positive.min() * 10))
        image = ax.imshow(np.where(grid > 0, grid, np.nan), aspect="auto", interpolation="nearest", norm=norm,
                          cmap="viridis", extent=(epochs[0] - 0.5, epochs[-1] + 0.5, len(layers) - 0.5, -0.5))
        colorbar_ax = fig.add_axes((colorbar_x, ax.get_position().y0, colorbar_w, ax.get_position().height))
        bar = fig.colorbar(image, cax=colorbar_ax, label="mean ‖grad‖")
        log_axis(bar.ax.yaxis, norm.vmin, norm.vmax)
    labels = [_short(name) for name in layers]
    step = _tick_every(len(layers), MAX_LABELLED_ROWS)
    ax.set_yticks(range(0, len(layers), step), [labels[i] for i in range(0, len(layers), step)], fontsize=6)
    ax.set_xlabel("epoch")
    ax.set_title("per-layer gradient norm")


def _global_norm_panel(ax, record: RunRecord, epochs: list[int]) -> None:
    """The global gradient norm's epoch mean and max."""
    grad = record.diagnostics.get("grad_norm", {})
    for key, style, label in (("global_mean", "-", "mean"), ("global_max", ":", "max")):
        values = [finite(v) for v in grad.get(key) or []]
        pts = [(e, v) for e, v in zip(epochs, values) if v is not None and v > 0]
        if pts:
            ax.plot(*zip(*pts), style, color="#2171b5", lw=1.2, label=label)
    if ax.lines:
        _maybe_log(ax, [v for line in ax.lines for v in line.get_ydata()])
        ax.legend(frameon=False)
    ax.set_xlabel("epoch")
    ax.set_title("global gradient norm")
    ax.grid(alpha=0.25)


def _dead_units_panel(ax, names: list[str], fractions: list[float]) -> None:
    """The fraction of dead units per ReLU-family layer at the last epoch."""
    y = np.arange(len(names))
    ax.barh(y, fractions, color="#de2d26")
    step = _tick_every(len(names), MAX_LABELLED_ROWS)
    ax.set_yticks(y[::step], [_short(n) for n in names[::step]], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xticks([0, 0.5, 1], ["0", "0.5", "1"])
    ax.set_title("dead units (last epoch)")
    ax.set_xlabel("fraction")
    ax.grid(axis="x", alpha=0.25)


def confusion(writer: FigureWriter, record: RunRecord) -> FigureRef | None:
    matrix = record.test.get("confusion_matrix")
    if not matrix or not all(isinstance(row, list) for row in matrix):
        return None
    counts = np.array(matrix, dtype=float)  # (K true, K predicted)
    k = len(counts)
    classes = record.test.get("classes") or [str(i) for i in range(k)]
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = min(4.2, 1.3 + 0.24 * k)
    fig, (ax,) = new_figure(side + 1.6, side + 0.7, left=0.7, right=0.2, top=0.15, bottom=0.6)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03, label="share of the true class")
    if k <= 15:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=6,
                            color="white" if share[i, j] > 0.6 else "black")
    step = _tick_every(k, 20)
    ticks = list(range(0, k, step))
    ax.set_xticks(ticks, [str(classes[i]) for i in ticks], rotation=90 if k > 10 else 0)
    ax.set_yticks(ticks, [str(classes[i]) for i in ticks])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    metric, value = record.main_metric, record.test_value
    shown = f"test {metric} {value:.4f}" if value is not None else "no test metric"
    caption = (f"Confusion matrix of {record.name}, the best classifier on {record.dataset} ({shown}): rows are "
               "the true classes, columns the predicted ones, numbers are test counts.")
    return writer.save(fig, f"confusion_{slug(record.name)}", f"fig-confusion-{slug(record.name)}",
                       f"Confusion matrix — {record.name}", caption)


def sample_grids(writer: FigureWriter, record: RunRecord) -> list[FigureRef]:
    refs = []
    for source in record.sample_images:
        stem = slug(source.stem)
        when = source.stem.replace("_", " ")
        what = {"reconstruct": f"validation inputs and their reconstructions ({when})",
                "generate": f"generated samples ({when})"}.get(record.task, f"samples ({when})")
        refs.append(writer.copy(source, f"samples_{slug(record.name)}_{stem}", f"fig-samples-{slug(record.name)}-{stem}",
                                f"Samples — {record.name}",
                                f"{record.name}: {what}, from runs/{record.name}/samples/{source.name}."))
    return refs
