"""Pictures of reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt
import numpy as np

from bucketing.report import Report


def plot_report(report: Report, path: str | Path) -> Path:
    """Three panels: samples over resolution x frames, aspect ratios, and drop reasons."""
    path = Path(path)
    resolutions = list(dict.fromkeys(row.bucket.resolution for row in report.buckets))
    frame_counts = sorted({row.bucket.num_frames for row in report.buckets})
    grid = np.zeros((len(resolutions), len(frame_counts)), dtype=np.int64)
    for row in report.buckets:
        grid[resolutions.index(row.bucket.resolution), frame_counts.index(row.bucket.num_frames)] += row.samples

    figure, (heat, aspects, drops) = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [1.2, 1.4, 1]})
    figure.suptitle(f"{report.rows_in} rows: {report.kept} kept, {report.dropped} dropped")

    if grid.size:
        image = heat.imshow(grid, cmap="viridis", aspect="auto")
        figure.colorbar(image, ax=heat, label="samples")
        for (i, j), value in np.ndenumerate(grid):
            heat.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                color="white" if value < grid.max() / 2 else "black",
            )
    heat.set_xticks(range(len(frame_counts)), [str(t) for t in frame_counts])
    heat.set_yticks(range(len(resolutions)), resolutions)
    heat.set_xlabel("frames (T)")
    heat.set_ylabel("resolution")
    heat.set_title("kept samples per (resolution, T)")

    labels, counts = [], []
    for resolution, per_aspect in report.aspects.items():
        for aspect, count in sorted(per_aspect.items(), key=lambda item: float(item[0])):
            labels.append(f"{resolution} {aspect}")
            counts.append(count)
    aspects.bar(range(len(counts)), counts, color="tab:blue")
    aspects.set_xticks(range(len(labels)), labels, rotation=70, fontsize=8)
    aspects.set_title("kept samples per aspect ratio (height / width)")

    reasons = [drop.reason if len(drop.reason) < 48 else drop.reason[:45] + "..." for drop in report.drops]
    drops.barh(range(len(reasons)), [drop.count for drop in report.drops], color="tab:red")
    drops.set_yticks(range(len(reasons)), reasons, fontsize=8)
    drops.invert_yaxis()
    drops.set_title("dropped samples per reason")

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
