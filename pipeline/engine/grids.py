"""Sample grids as small PNG files: images side by side (or signals as lines), in the data's original units.

Matplotlib's Agg canvas is used directly (no pyplot): no global figure state, no display needed.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.io import atomic_write_bytes

if TYPE_CHECKING:
    from pipeline.data.prepare import DataMeta

Panel = tuple[str, np.ndarray]  # (title, samples (N, ...) in original units)


def original_units(x: torch.Tensor, meta: DataMeta) -> np.ndarray:
    """Undo prepare's normalisation: one statistic, one per input element, per feature of a table or (L,)
    signal, or per channel of (C, ...) inputs (see pipeline/data/prepare.py)."""
    x = x.detach().float().cpu().numpy()
    norm = meta.normalisation or {}
    if "x_mean" not in norm:
        return x
    mean, std = np.asarray(norm["x_mean"], np.float32), np.asarray(norm["x_std"], np.float32)
    if mean.size > 1 and mean.size == x[0].size:  # one per input element (tables, (L,) signals: per feature)
        mean, std = mean.reshape(1, *x.shape[1:]), std.reshape(1, *x.shape[1:])
    elif mean.size > 1:  # (B, C, ...): one per channel
        shape = (1, -1, *([1] * (x.ndim - 2)))
        mean, std = mean.reshape(shape), std.reshape(shape)
    return x * std + mean


def is_image(sample_shape: tuple[int, ...]) -> bool:
    return len(sample_shape) == 3 and sample_shape[0] in (1, 3)


def mosaic(images: np.ndarray, cols: int, pad: int = 1, fill: float = 0.0) -> np.ndarray:
    """(N, C, H, W) → one image of `cols` columns, `pad` pixels apart: (rows·(H+pad)−pad, cols·(W+pad)−pad, C)."""
    n, c, h, w = images.shape
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), fill, dtype=np.float32)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        out[r * (h + pad):r * (h + pad) + h, k * (w + pad):k * (w + pad) + w] = img.transpose(1, 2, 0)
    return out


def grid_png(panels: list[Panel], value_range: tuple[float, float], cols: int, title: str = "") -> bytes:
    """A PNG with one row of axes per panel: images as mosaics (ink dark on white), anything else as lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    low, high = value_range
    first = panels[0][1]
    images = is_image(tuple(first.shape[1:]))
    heights = [math.ceil(len(p) / cols) if images else 1.5 for _, p in panels]
    fig = Figure(figsize=(0.5 * cols + 0.4, 0.5 * sum(heights) + 0.35 * len(panels) + 0.3), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (name, samples) in zip(axes, panels):
        ax.set_title(name, fontsize=8, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
        if images:
            scaled = np.clip((samples - low) / max(high - low, 1e-12), 0.0, 1.0)
            tile = mosaic(scaled, cols, fill=0.15 if scaled.shape[1] == 1 else 1.0)  # light grey / white gaps
            if tile.shape[2] == 1:
                ax.imshow(tile[:, :, 0], cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(tile, interpolation="nearest")
        else:
            for sample in samples[:cols]:
                ax.plot(sample.reshape(-1), linewidth=0.8)
            ax.set_ylim(low, high)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_grid(path: str | Path, panels: list[Panel], value_range: tuple[float, float], cols: int,
               title: str = "") -> None:
    atomic_write_bytes(path, grid_png(panels, value_range, cols, title))


def display_range(real: np.ndarray) -> tuple[float, float]:
    """The real data's value range: generated samples are shown on the same scale, clipped to it."""
    return float(real.min()), float(real.max())


def epoch_grid_path(run_dir: str | Path, epoch: int) -> Path:
    return Path(run_dir) / "samples" / f"epoch_{epoch:03d}.png"
