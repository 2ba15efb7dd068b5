"""Rendering the demo's measured rows as a Markdown table and a PNG plot."""

from __future__ import annotations

COLUMNS = [
    ("refusal_harmful", "refusal on held-out harmful ↑"),
    ("over_refusal_benign", "over-refusal on benign look-alikes ↓"),
    ("general_accuracy", "general accuracy after ↑"),
]


def summarise_seeds(runs: dict[int, list[dict]]) -> list[dict]:
    """One row per model: each metric's mean over the seeds, and its `range` (min, max) over them."""
    first = next(iter(runs.values()))
    summary = []
    for index, row in enumerate(first):
        same_model = [rows[index] for rows in runs.values()]
        if any(other["model"] != row["model"] for other in same_model):
            raise ValueError(f"Seeds ran different models at row {index}: {[r['model'] for r in same_model]}")
        keys = [key for key, value in row.items() if isinstance(value, int | float)]
        summary.append(
            {
                "model": row["model"],
                **{key: sum(other[key] for other in same_model) / len(same_model) for key in keys},
                "range": {key: (min(o[key] for o in same_model), max(o[key] for o in same_model)) for key in keys},
                "seeds": sorted(runs),
                "cpu": row.get("cpu"),
            }
        )
    return summary


def _cell(row: dict, key: str) -> str:
    """`12.5%`, or with several seeds `12.5% (6.2–18.8)`: the mean and the range over the seeds."""
    if "range" not in row:
        return f"{row[key]:.1%}"
    low, high = row["range"][key]
    return f"{row[key]:.1%} ({low:.1%}–{high:.1%})" if high > low else f"{row[key]:.1%}"


def format_table(rows: list[dict]) -> str:
    header = "| model | " + " | ".join(title for _, title in COLUMNS) + " | general accuracy before | wall time (s) |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 3)]
    for row in rows:
        before = "general_accuracy_before" if "general_accuracy_before" in row else "general_accuracy"  # the base row
        cells = [_cell(row, key) for key, _ in COLUMNS] + [_cell(row, before), f"{row['seconds']:.1f}"]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_plot(rows: list[dict], path: str) -> str:
    """Grouped bars, one group per metric, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(rows)
    for index, row in enumerate(rows):
        positions = [group + index * width for group in range(len(COLUMNS))]
        bars = axis.bar(positions, [row[key] for key, _ in COLUMNS], width, label=row["model"])
        axis.bar_label(bars, labels=[f"{row[key]:.0%}" for key, _ in COLUMNS], fontsize=8)
    axis.set_xticks([group + width * (len(rows) - 1) / 2 for group in range(len(COLUMNS))])
    axis.set_xticklabels([title for _, title in COLUMNS], fontsize=9)
    axis.set_ylim(0, 1.3)
    axis.set_ylabel("rate")
    axis.set_title("Safety SFT: plain TRL vs null-space (measured in one run)")
    axis.legend(fontsize=8, loc="upper center", ncol=len(rows))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
