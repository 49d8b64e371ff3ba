"""Figures: t-SNE of prompt representations (paper Figures 1 and 3) and training progress (Figure 4).

matplotlib with the Agg backend (no display needed); t-SNE from scikit-learn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# Figure 1's colours: orange CW, red SA, blue SR, gray ST.
INSTRUCTION_COLORS = {"CW": "tab:orange", "SA": "tab:red", "SR": "tab:blue", "ST": "tab:gray"}
_EXTRA_COLORS = ["tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def tsne_2d(x: np.ndarray, seed: int = 0, perplexity: float | None = None) -> np.ndarray:
    """2-D t-SNE of ``[N, D]`` rows (perplexity clipped below N so small sets work)."""
    from sklearn.manifold import TSNE

    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n < 3:
        return np.pad(x[:, :2], ((0, 0), (0, max(0, 2 - x.shape[1]))))
    p = perplexity if perplexity is not None else min(30.0, max(1.0, (n - 1) / 3.0))
    p = min(p, n - 1.0)
    # exact gradients for the paper-sized sets (hundreds of points): faster than Barnes-Hut there,
    # whose thread pool crawls on a busy small machine
    method = "exact" if n <= 1000 else "barnes_hut"
    tsne = TSNE(n_components=2, perplexity=p, init="pca", random_state=seed, max_iter=1000, method=method)
    return tsne.fit_transform(x)


def plot_tsne(
    speech: Mapping[str, np.ndarray],
    text: Mapping[str, np.ndarray],
    path: str | Path,
    title: str = "",
    highlight: int = 0,
    seed: int = 0,
) -> Path:
    """Figure 1/3: colours are instructions, triangles speech, crosses text.

    ``highlight`` paired speech/text inputs (the first ones, under every instruction) are joined by
    dashed lines and circled, as in Figure 3.
    """
    plt = pyplot()
    keys = [k for k in speech if k in text]
    blocks, meta = [], []
    for k in keys:
        for modality, reps in (("speech", speech[k]), ("text", text[k])):
            blocks.append(np.asarray(reps))
            meta.append((k, modality, len(reps)))
    emb = tsne_2d(np.concatenate(blocks, 0), seed=seed)
    pos: dict[tuple[str, str], np.ndarray] = {}
    start = 0
    for k, modality, n in meta:
        pos[(k, modality)] = emb[start : start + n]
        start += n
    extra = iter(_EXTRA_COLORS)
    colors = {k: INSTRUCTION_COLORS.get(k) or next(extra, "black") for k in keys}
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    for k in keys:
        s, t = pos[(k, "speech")], pos[(k, "text")]
        ax.scatter(s[:, 0], s[:, 1], marker="^", s=28, color=colors[k], alpha=0.8, label=f"{k} speech")
        ax.scatter(t[:, 0], t[:, 1], marker="x", s=28, color=colors[k], alpha=0.8, label=f"{k} text")
        for i in range(min(highlight, len(s))):
            ax.plot([s[i, 0], t[i, 0]], [s[i, 1], t[i, 1]], "--", color=colors[k], lw=0.8)
            for p in (s[i], t[i]):
                ax.scatter([p[0]], [p[1]], s=140, facecolors="none", edgecolors=colors[k], lw=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="best", frameon=False)
    return save_figure(fig, path)


def plot_progress(
    series: Mapping[str, Sequence[tuple[int, float | None]]],
    path: str | Path,
    lower_is_better: Mapping[str, bool] | None = None,
    title: str = "",
) -> Path:
    """Figure 4: one panel per metric, metric vs training step."""
    plt = pyplot()
    names = list(series)
    fig, axes = plt.subplots(
        1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 3.4), dpi=120, squeeze=False
    )
    for ax, name in zip(axes[0], names, strict=False):
        pts = [(s, v) for s, v in series[name] if v is not None]
        pts.sort()
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4)
        arrow = ""
        if lower_is_better and name in lower_is_better:
            arrow = " ↓" if lower_is_better[name] else " ↑"
        ax.set_title(name + arrow, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_lines(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    xlabel: str = "training step",
    ylabel: str = "",
    title: str = "",
) -> Path:
    """Several named curves on one axis (e.g. each recipe's training loss)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.8), dpi=120)
    for name, pts in series.items():
        pts = sorted(pts)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if series:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def cosine_heatmap(table: Mapping[str, Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """A small heatmap of a Table 7/12 style cosine table (optional companion picture)."""
    plt = pyplot()
    keys = list(table)
    m = np.array([[table[a][b] for b in keys] for a in keys])
    fig, ax = plt.subplots(figsize=(3.6, 3.2), dpi=120)
    im = ax.imshow(m, vmin=min(0.0, float(m.min())), vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(keys)), keys)
    ax.set_yticks(range(len(keys)), keys)
    for i in range(len(keys)):
        for j in range(len(keys)):
            ax.text(
                j,
                i,
                f"{m[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="w" if m[i, j] < 0.6 else "k",
            )
    fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
