"""``dagster asset materialize ... 2>&1 | python -m pipelines.progress LOG``: every line goes to ``LOG``; the
terminal gets one line per finished step (with its duration), the assets' own INFO messages (shards written,
batches labelled, training steps...) and anything that failed, so `make demo` fits on a screen or two.

Dagster's CLI prints every event at DEBUG; the full log keeps them for when something needs explaining.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TextIO

# "2026-12-05 22:41:24 +0000 - dagster - INFO - __ASSET_JOB - <run id> - [<pid> - ]<step> - <message>"
EVENT = re.compile(r"^\S+ \S+ \S+ - dagster - (?P<level>[A-Z]+) - \S+ - [0-9a-f-]{36} - (?:\d+ - )?"
                   r"(?P<step>[A-Za-z0-9_]+) - (?P<message>.*)$")
DONE = re.compile(r'STEP_SUCCESS - Finished execution of step "[^"]+" in (?P<took>[0-9.]+\s*[a-z]+)')
# DEBUG event names shown anyway
SHOWN_EVENTS = ("STEP_FAILURE", "RUN_FAILURE", "STEP_UP_FOR_RETRY")
# the assets' INFO lines worth a terminal line (the rest stay in the log)
QUIET_INFO = ("Loading", "reusing", "Pipes", "[pipes]", "trainer started")
COUNT = re.compile(r"(?P<done>\d+)\s*/\s*(?P<total>\d+)")


def bar(done: int, total: int, width: int = 24) -> str:
    filled = round(width * done / max(1, total))
    return "█" * filled + "·" * (width - filled) + f" {done}/{total}"


def condense(line: str) -> str | None:
    """The terminal line for one line of Dagster CLI output, or None to keep it in the log only."""
    match = EVENT.match(line.rstrip("\n"))
    if not match:
        text = line.strip()
        return text if text.startswith(("Error", "dagster._core.errors")) else None
    step, message, level = match["step"], match["message"], match["level"]
    done = DONE.search(message)
    if done:
        return f"  ✓ {step} ({done['took']})"
    if any(message.startswith(e) for e in SHOWN_EVENTS):
        return f"  ✗ {step}: {message[:300]}"
    if level in ("INFO", "WARNING", "ERROR", "CRITICAL") and not message.startswith(QUIET_INFO):
        return f"    {step}: {message}"
    return None


def _metric_line(shown: str) -> tuple[str, int, str] | None:
    """``(step name, training step, "    <step>: step N loss X")`` for a trainer's JSON metrics line, else None."""
    import json

    head, _, body = shown.partition(": ")
    if not body.startswith('{"step"'):
        return None
    try:
        row = json.loads(body)
    except ValueError:
        return None
    step = head.strip()
    extra = " ".join(f"{k} {row[k]:.4g}" for k in ("loss", "reward_mean", "implicit_acc") if isinstance(row.get(k), float))
    return step, int(row.get("step", 0)), f"    {step}: step {row.get('step')} {extra}"


def run(stream: TextIO, log_path: Path, out: TextIO = sys.stdout) -> int:
    """Copy ``stream`` to ``log_path`` and print the condensed lines. Messages that count ("labelled 48/1096",
    "step 30/240") become one progress bar per step: redrawn in place on a terminal, else printed at each quarter."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tty = out.isatty()
    lines, open_bar, quarter = 0, None, {}
    with open(log_path, "a", encoding="utf-8") as log:
        for line in stream:
            log.write(line)
            lines += 1
            shown = condense(line)
            if not shown:
                continue
            metric = _metric_line(shown)
            if metric is not None:  # a trainer's per-step metrics: a line of its own, redrawn / every 50 steps
                step, number, text = metric
                if tty:
                    out.write(("\r" if open_bar == step else ("\n" if open_bar else "")) + text)
                    out.flush()
                    open_bar = step
                elif number % 50 == 0:
                    print(text, file=out, flush=True)
                continue
            count = COUNT.search(shown) if shown.startswith("    ") else None
            if count:
                step = shown.split(":", 1)[0].strip()
                done, total = int(count["done"]), int(count["total"])
                label = f"    {step}: {bar(done, total)}"
                if tty:
                    out.write(("\r" if open_bar == step else ("\n" if open_bar else "")) + label)
                    out.flush()
                    open_bar = step
                else:
                    q = 4 * done // max(1, total)
                    if q > quarter.get(step, -1):
                        quarter[step] = q
                        print(label, file=out, flush=True)
                continue
            if open_bar:
                out.write("\n")
                open_bar = None
            print(shown[:220], file=out, flush=True)
    if open_bar:
        out.write("\n")
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: dagster ... 2>&1 | python -m pipelines.progress LOG_FILE")
    try:
        run(sys.stdin, Path(sys.argv[1]))
    except BrokenPipeError:  # the terminal side went away (| head); the log has everything
        sys.exit(0)
