"""The prompt inbox: a local directory or any fsspec URL (``s3://bucket/inbox``) of ``*.jsonl`` batch files, one
``prompt_batches`` partition per file (the key is the sanitised file stem).

Files that cannot become a partition are *reported*, never raised: two files whose names sanitise to one key
(both skipped, so neither silently wins) and files that are not a batch at all (not UTF-8, no line that is a JSON
object). Row-level problems (an unknown task, a missing image) are not the inbox's business: the
``prompt_batches`` asset drops those rows and counts them by reason.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path

MAX_BATCH_BYTES = 64 << 20  # a batch file larger than this is refused rather than read into a sensor's memory


@dataclass(frozen=True)
class InboxFile:
    key: str  # the partition key
    url: str  # where the file is (a local path or a URL)
    fingerprint: str  # changes when the file does (size + modification time or the store's checksum)


def _fs(inbox: str):
    import fsspec

    return fsspec.core.url_to_fs(str(inbox))


def _fingerprint(info: dict) -> str:
    for field in ("ETag", "etag", "md5", "checksum"):
        if info.get(field):
            return str(info[field]).strip('"')
    return f"{info.get('size')}:{info.get('mtime') or info.get('LastModified') or info.get('created')}"


def list_inbox(inbox: str) -> tuple[dict[str, InboxFile], list[str]]:
    """Every batch file under ``inbox`` (hidden directories skipped) by partition key, and the problems found
    (key collisions). A missing inbox is empty."""
    from pipelines.paths import safe_key

    fs, root = _fs(inbox)
    if not fs.exists(root):
        return {}, []
    local = "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol))
    by_key: dict[str, list[InboxFile]] = {}
    for path, info in sorted(fs.find(root, detail=True).items()):
        rel = posixpath.relpath(path, root)
        if not path.endswith(".jsonl") or any(part.startswith(".") for part in rel.split("/")):
            continue
        url = path if local else fs.unstrip_protocol(path)
        key = safe_key(posixpath.basename(path)[: -len(".jsonl")])
        by_key.setdefault(key, []).append(InboxFile(key, url, _fingerprint(info)))
    files, problems = {}, []
    for key, found in by_key.items():
        if len(found) > 1:
            problems.append(f"{len(found)} inbox files map to partition {key!r}: "
                            f"{', '.join(f.url for f in found)}; rename all but one")
        else:
            files[key] = found[0]
    return files, problems


def batch_file_problem(data: bytes) -> str | None:
    """Why ``data`` is not a batch file at all, or None. Only whole-file problems: a file with one usable line
    is a batch (its other lines are the asset's to drop)."""
    if len(data) > MAX_BATCH_BYTES:
        return f"{len(data)} bytes, more than the {MAX_BATCH_BYTES} a batch file may have; split it"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    first_error = None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            if isinstance(json.loads(line), dict):
                return None
            first_error = first_error or f"line {number}: not a JSON object"
        except json.JSONDecodeError as exc:
            first_error = first_error or f"line {number}: {exc.msg} at column {exc.colno}"
    return f"no line is a JSON object ({first_error})" if first_error else "empty file"


def read_batch(file: InboxFile) -> bytes:
    import fsspec

    with fsspec.open(file.url, "rb") as handle:
        return handle.read(MAX_BATCH_BYTES + 1)


def stage_batch(file: InboxFile, staging: Path) -> Path:
    """A local path to ingest ``file`` from: the file itself when the inbox is local, else a copy in ``staging``
    together with the images its rows name by relative path (the same relative layout, so ingestion resolves
    them exactly as for a local inbox). Paths that would leave the batch's folder are not fetched."""
    import fsspec

    if "://" not in file.url or file.url.startswith("file://"):
        return Path(file.url.removeprefix("file://"))
    fs, path = fsspec.core.url_to_fs(file.url)
    base = posixpath.dirname(path)
    staging.mkdir(parents=True, exist_ok=True)
    local = staging / posixpath.basename(path)
    fs.get_file(path, str(local))
    for line in local.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            continue
        refs = [row.get("source_image")] + list(row.get("reference_images") or [])
        for ref in refs:
            if not isinstance(ref, str) or not ref or "://" in ref or ref.startswith("/"):
                continue
            rel = posixpath.normpath(ref)
            if rel.startswith(".."):
                continue
            target = staging / rel
            if not target.exists() and fs.exists(posixpath.join(base, rel)):
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(posixpath.join(base, rel), str(target))
    return local
