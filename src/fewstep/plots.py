"""Pictures of samples: a scatter for 2-D points, a grid for images, 3-D scatters for
point clouds (matplotlib, Agg)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path) -> Path:
    """Lay out, write (making the folder) and close a figure; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def image_grid(x: torch.Tensor, nrow: Optional[int] = None) -> torch.Tensor:
    """[n, C, H, W] in [-1, 1] -> one [H', W', C] image in [0, 1] with 1-pixel gaps."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    n, c, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = torch.ones(c, ncol * (h + 1) + 1, nrow * (w + 1) + 1)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = x[i]
    return grid.permute(1, 2, 0)


def save_strip_png(x: torch.Tensor, path, scale: int = 4) -> Path:
    """Images [n, C, H, W] in [-1, 1] side by side in one row (a turntable strip), each pixel
    ``scale`` x ``scale`` (nearest), written as a PNG of exactly that size."""
    plt = _plt()
    strip = image_grid(x, nrow=len(x)).numpy()
    strip = strip.repeat(scale, 0).repeat(scale, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, strip[..., 0] if strip.shape[2] == 1 else strip, cmap="gray", vmin=0, vmax=1)
    return path


def draw_samples(ax, x: torch.Tensor, labels: Optional[torch.Tensor] = None, title: str = "", lim=None) -> None:
    """Draw samples on a matplotlib axis: scatter (2-D and up: first two coords) or grid."""
    x = x.detach().float().cpu()
    if x.ndim == 4:
        g = image_grid(x[:64])
        ax.imshow(g.squeeze(-1) if g.shape[-1] == 1 else g, cmap="gray" if g.shape[-1] == 1 else None)
        ax.axis("off")
    else:
        x = x.reshape(len(x), -1)
        y = x[:, 1] if x.shape[1] > 1 else torch.zeros(len(x))
        c = labels.cpu().numpy() if labels is not None else None
        ax.scatter(x[:, 0].numpy(), y.numpy(), s=2, alpha=0.5, c=c, cmap="tab10" if c is not None else None)
        ax.set_aspect("equal")
        if lim is not None:
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
    if title:
        ax.set_title(title, fontsize=9)


def save_clouds_png(rows: dict, path, n: int = 4) -> Path:
    """One row per entry of ``rows`` ({title: clouds [k, N, 3]}), the first ``n`` clouds
    of each as 3-D scatters on shared axes."""
    plt = _plt()
    rows = {k: v.detach().float().cpu()[:n] for k, v in rows.items()}
    lim = max(float(v.abs().max()) for v in rows.values()) or 1.0
    cols = max(len(v) for v in rows.values())
    fig = plt.figure(figsize=(2.4 * cols, 2.4 * len(rows)), dpi=100)
    for r, (title, clouds) in enumerate(rows.items()):
        for c, cloud in enumerate(clouds):
            ax = fig.add_subplot(len(rows), cols, r * cols + c + 1, projection="3d")
            ax.scatter(cloud[:, 0].numpy(), cloud[:, 1].numpy(), cloud[:, 2].numpy(), s=1.5, c=cloud[:, 2].numpy(),
                       cmap="viridis")
            for set_lim in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
                set_lim(-lim, lim)
            ax.set_box_aspect((1, 1, 1), zoom=1.5)
            ax.set_axis_off()
            if c == 0:
                ax.set_title(title, fontsize=8, loc="left")
    return _save(plt, fig, path)


def save_samples_png(x: torch.Tensor, path, labels=None, title: str = "") -> Path:
    """Write a PNG of samples (scatter for points, grid for images, 3-D scatters of the
    first clouds for point clouds [n, N, 3])."""
    if x.ndim == 3 and x.shape[-1] == 3:
        return save_clouds_png({title or "samples": x}, path)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    draw_samples(ax, x, labels, title)
    return _save(plt, fig, path)


def save_mels_png(rows: dict, path, n: int = 4) -> Path:
    """Log-mel spectrograms side by side: ``rows`` maps a title to a list of mels [F, bins]
    (natural log), the first ``n`` of each drawn as columns, frames left to right, low
    frequencies at the bottom, one colour scale for all."""
    plt = _plt()
    rows = {k: [m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else m for m in v][:n] for k, v in rows.items()}
    cols = max(len(v) for v in rows.values())
    values = [m for v in rows.values() for m in v]
    lo, hi = min(float(m.min()) for m in values), max(float(m.max()) for m in values)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.2 * cols, 2.0 * len(rows)), squeeze=False)
    for r, (title, mels) in enumerate(rows.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(mels):
                ax.imshow(mels[c].T, origin="lower", aspect="auto", vmin=lo, vmax=hi, cmap="magma")
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
    return _save(plt, fig, path)
