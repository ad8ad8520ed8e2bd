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


def _data_uri(image, size: int) -> str:
    import base64
    import io

    thumb = image.convert("RGB").copy()
    thumb.thumbnail((size, size))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def thumbnails_md(rows: list[tuple[str, Any]], size: int = 96) -> dg.MetadataValue:
    """A Markdown table of small inline PNGs (``(caption, PIL image)``), which the Dagster UI renders in place."""
    if not rows:
        return dg.MetadataValue.md("_no images_")
    lines = ["| image | |", "| --- | --- |"]
    for caption, image in rows:
        text = str(caption).replace("|", "\\|").replace("\n", " ")[:120]
        lines.append(f"| ![{text[:30]}]({_data_uri(image, size)}) | {text} |")
    return dg.MetadataValue.md("\n".join(lines))


def curves_md(history: list[dict[str, Any]], keys: list[str], width: int = 480, height: int = 160) -> dg.MetadataValue:
    """Training curves (``history``: one dict per step with ``step`` and metric values) as an inline PNG line chart
    per metric, drawn with PIL, plus the first/last values."""
    from PIL import Image, ImageDraw

    parts = []
    for key in keys:
        points = [(row["step"], float(row[key])) for row in history
                  if isinstance(row.get(key), (int, float)) and isinstance(row.get("step"), int)]
        if len(points) < 2:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        span_x, span_y = (x1 - x0) or 1, (y1 - y0) or 1
        image = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(image)
        pad = 8
        coords = [(pad + (x - x0) / span_x * (width - 2 * pad), height - pad - (y - y0) / span_y * (height - 2 * pad))
                  for x, y in points]
        draw.line(coords, fill=(31, 119, 180), width=2)
        draw.text((pad, 2), f"{key}: {ys[0]:.4g} -> {ys[-1]:.4g} (min {y0:.4g}, max {y1:.4g})", fill="black")
        parts.append(f"**{key}** (steps {x0}–{x1})\n\n![{key}]({_data_uri(image, max(width, height))})")
    return dg.MetadataValue.md("\n\n".join(parts) if parts else "_no curve: fewer than two logged steps_")
