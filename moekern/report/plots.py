"""matplotlib for the reports, imported only inside these functions (it is an optional dependency)."""

import math
from pathlib import Path

DPI = 110


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    """Write a figure as PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)
    return path


def annotate(ax, points: list[tuple[float, float, str]], log_y: bool = False) -> None:
    """Scatter labelled points; each label takes the nearest line, above or below its point, that no earlier label
    near it holds, so that labels of nearby points do not print over each other."""
    if not points:
        return
    ys = [math.log(y) if log_y and y > 0 else y for _, y, _ in points]
    xs = [x for x, _, _ in points]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    line = 0.035  # one label line (10 points), roughly, as a fraction of the spread of y
    taken: list[tuple[float, float]] = []  # label positions, normalised
    for (x, y, label), ly in zip(points, ys):
        nx, ny = (x - min(xs)) / span_x, (ly - min(ys)) / span_y
        for shift in (0, -1, 1, -2, 2, -3, 3, -4, 4, -5, 5):
            at = ny + shift * line
            if all(abs(tx - nx) > 0.2 or abs(ty - at) > 0.9 * line for tx, ty in taken):
                break
        taken.append((nx, at))
        ax.scatter(x, y)
        ax.annotate(label, (x, y), xytext=(8, -3 + shift * 10), textcoords="offset points", fontsize=7,
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="grey") if shift else None)
