"""Deterministic content ids: a re-run recognises what it already did."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def content_id(*parts: Any) -> str:
    """sha256 over the canonical JSON of ``parts``, first 16 bytes as 32 hex characters."""
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
