"""PNG plots of a bench record (matplotlib, Agg backend: no display needed).

Panels: the batch-1 latency distribution of every backend that ran (box plot over all
values, so tails and outliers show), then, when accuracy was measured, mAP against
ms/img and, when BOPs are known, mAP against BOPs.
"""

from __future__ import annotations

from pathlib import Path


def _label(row: dict) -> str:
    fmt = row.get("format", row["backend"]).replace(" (", "\n(")
    return f"{row['model']}\n{fmt}"


def plot_record(record: dict, path: Path) -> Path | None:
    """Write the figure to ``path`` (through a temporary name); None when no row ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgekit.fileio import temp_path

    ran = [r for r in record["rows"] if r.get("latency", {}).get("values")]
    if not ran:
        return None
    accurate = [r for r in ran if (r.get("accuracy") or {}).get("map") is not None]
    with_bops = [r for r in accurate if r.get("bops")]
    panels = 1 + bool(accurate) + bool(with_bops)
    fig, axes = plt.subplots(1, panels, figsize=(max(6.0, 1.7 * len(ran)) + 4.5 * (panels - 1), 4.8),
                             squeeze=False)
    ax = axes[0][0]
    values = [r["latency"]["values"] for r in ran]
    ax.boxplot(values, showfliers=True)
    if max(map(max, values)) > 20 * min(map(min, values)):
        ax.set_yscale("log")  # backends an order of magnitude apart stay readable
    ax.set_xticks(range(1, len(ran) + 1), [_label(r) for r in ran], fontsize=7)
    ax.set_ylabel("latency per call, batch 1 (ms)")
    ax.set_title("Latency distribution per backend (measured)")
    ax.grid(axis="y", alpha=0.3)
    i = 1
    if accurate:
        ax = axes[0][i]
        i += 1
        for r in accurate:
            ax.scatter(r["ms_per_img"], r["accuracy"]["map"])
            ax.annotate(r.get("format", r["backend"]), (r["ms_per_img"], r["accuracy"]["map"]), fontsize=7)
        ax.set_xlabel("ms / image")
        ax.set_ylabel("mAP@[.5:.95]")
        ax.set_title("Accuracy vs latency")
    if with_bops:
        ax = axes[0][i]
        for r in with_bops:
            ax.scatter(r["bops"] / 1e9, r["accuracy"]["map"])
            ax.annotate(r.get("format", r["backend"]), (r["bops"] / 1e9, r["accuracy"]["map"]), fontsize=7)
        ax.set_xlabel("GBOPs (MACs x weight bits x activation bits)")
        ax.set_ylabel("mAP@[.5:.95]")
        ax.set_title("Accuracy vs BOPs")
    m = record.get("machine", {})
    fig.suptitle(f"{m.get('cpu', '')}, {m.get('cores', '?')} cores — {m.get('date', '')}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
