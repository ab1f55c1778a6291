"""The report's plots (matplotlib, Agg backend: no display needed), each returned as a PNG data URI."""

from __future__ import annotations

import numpy as np

from .render import DROPPED_COLOUR, KEPT_COLOUR, png_data_uri

MAP_POINTS = 4000  # points in the PCA map (a seeded sample of larger pools)


HISTOGRAM_EDGES = 40  # bin edges of the CLIP-score histogram (39 bins)


def score_bins(low: float, high: float) -> np.ndarray:
    """The histogram's bin edges over the pool's score range [low, high]: fixed by the range alone,
    so counts can be summed part by part (the top edge nudged up so `high` falls in the last bin)."""
    return np.linspace(float(low), float(high) + 1e-9, HISTOGRAM_EDGES)


def score_histogram(edges: np.ndarray, kept_counts: np.ndarray, dropped_counts: np.ndarray,
                    kept_n: int, dropped_n: int) -> str:
    """Kept and dropped samples per score bin (counts from :func:`pipeline.report.pool.tally_pool`;
    `kept_n`, `dropped_n`: every kept and dropped sample, the legend's numbers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.4, 4.2))
    # one weighted point per bin, at its centre: the bars ax.hist draws of the scores themselves
    centres = (edges[:-1] + edges[1:]) / 2
    ax.hist(centres, bins=edges, weights=dropped_counts, color=DROPPED_COLOUR, alpha=0.6, label=f"dropped ({dropped_n:,})")
    ax.hist(centres, bins=edges, weights=kept_counts, color=KEPT_COLOUR, alpha=0.6, label=f"kept ({kept_n:,})")
    ax.set_xlabel("CLIP score (cosine of image and caption embeddings)")
    ax.set_ylabel("samples (log scale)")
    ax.set_yscale("log")
    ax.set_title("CLIP score of kept and dropped samples", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return png_data_uri(fig)


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The first two principal components of `vectors` (rows), sign-fixed so plots are stable."""
    centred = vectors - vectors.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:2]
    signs = np.sign(comps[np.arange(comps.shape[0]), np.abs(comps).argmax(axis=1)])
    return centred @ (comps * signs[:, None]).T


def map_rows(n: int, seed: int = 0) -> np.ndarray:
    """Sorted rows of the pool drawn in the embedding map: all, or a seeded MAP_POINTS sample."""
    return np.sort(np.random.default_rng(seed).choice(n, MAP_POINTS, replace=False)) if n > MAP_POINTS else np.arange(n)


def embedding_map(vectors: np.ndarray, kept: np.ndarray, n: int) -> str:
    """PCA scatter of the map sample: `vectors` and `kept` are its rows (:func:`map_rows`) of `n`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    xy = pca_2d(vectors / np.maximum(norms, 1e-12))
    k = np.asarray(kept, dtype=bool)
    fig, ax = plt.subplots(figsize=(5.4, 4.2))
    ax.scatter(xy[~k, 0], xy[~k, 1], s=6, c=DROPPED_COLOUR, alpha=0.35, lw=0, label="dropped")
    ax.scatter(xy[k, 0], xy[k, 1], s=9, c=KEPT_COLOUR, alpha=0.85, lw=0, label="kept")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, frameon=False, markerscale=2)
    title = f"{len(vectors):,} of {n:,} samples" if n > len(vectors) else f"all {n:,} samples"
    ax.set_title(f"image embeddings, PCA ({title})", fontsize=9)
    return png_data_uri(fig)
