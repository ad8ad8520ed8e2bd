"""Small helpers that turn stage results into Dagster metadata (tables and Markdown the UI renders)."""


from collections.abc import Mapping
from typing import Any

import dagster as dg


def counts_md(counts: Mapping[str, Any], key: str = "reason", value: str = "count") -> dg.MetadataValue:
    if not counts:
        return dg.MetadataValue.md("_none_")
    lines = [f"| {key} | {value} |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in sorted(counts.items())]
    return dg.MetadataValue.md("\n".join(lines))


def histogram_md(values: list[float], bins: int = 10, lo: float | None = None, hi: float | None = None) -> dg.MetadataValue:
    values = [v for v in values if v is not None]
    if not values:
        return dg.MetadataValue.md("_no values_")
    lo = min(values) if lo is None else lo
    hi = max(values) if hi is None else hi
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / width)))] += 1
    top = max(counts)
    lines = ["| bin | count | |", "| --- | --- | --- |"]
    for i, c in enumerate(counts):
        lines.append(f"| {lo + i * width:.3f}–{lo + (i + 1) * width:.3f} | {c} | {'█' * round(20 * c / top) if top else ''} |")
    return dg.MetadataValue.md("\n".join(lines))


def path_md(path) -> dg.MetadataValue:
    return dg.MetadataValue.path(str(path))


def table_md(frame, max_chars: int = 60) -> dg.MetadataValue:
    """A polars frame as a Markdown table (cells cut to ``max_chars``)."""
    header = "| " + " | ".join(frame.columns) + " |"
    lines = [header, "|" + " --- |" * len(frame.columns)]
    for row in frame.iter_rows():
        cells = [str(v).replace("|", "\\|").replace("\n", " ")[:max_chars] for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return dg.MetadataValue.md("\n".join(lines))
