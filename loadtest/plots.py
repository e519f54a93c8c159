"""The concurrency sweep as two small PNGs: throughput and p99 latency against users."""

from __future__ import annotations

from pathlib import Path

from loadtest.bench_results import Row
from loadtest.report import SERVER_TITLES, median_row

STYLES = {
    "ferry": ("tab:blue", "o"),
    "ferry-ceiling": ("tab:blue", ""),
    "naive": ("tab:red", "s"),
    "timer": ("tab:orange", "^"),
    "ferry-sim": ("tab:green", "D"),
    "ferry-sim-ceiling": ("tab:green", ""),
}


def _series(points: list[Row], key: str) -> tuple[list[int], list[float]]:
    """The median run's `key` (a Row field) at each concurrency."""
    levels = sorted({p.users for p in points})
    values = []
    for users in levels:
        row = median_row([p for p in points if p.users == users])
        values.append(float(getattr(row, key) or 0.0))
    return levels, values


def plot_sweep(sweep: dict[str, list[Row]], out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, ylabel, name in (
        ("rps", "requests/s", "bench-throughput.png"),
        ("p99_s", "p99 latency (s)", "bench-p99.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=80)
        for server, points in sweep.items():
            if not points or server not in STYLES:
                continue  # variants measured at two points only (ferry-no-gather) stay in the tables
            color, marker = STYLES.get(server, ("tab:gray", "."))
            x, y = _series(points, key)
            ax.plot(x, y, marker=marker, color=color, label=SERVER_TITLES.get(server, server))
            if key == "rps" and any(p.ceiling_rps for p in points):
                cx, cy = _series(points, "ceiling_rps")
                ax.plot(
                    cx,
                    cy,
                    linestyle="--",
                    color=color,
                    alpha=0.6,
                    label=f"{server}: engine ceiling",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent users (closed loop)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
