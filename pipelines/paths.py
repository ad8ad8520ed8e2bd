"""Where prefmill reads and writes: one folder per asset under the data root, corpora versioned beneath it."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ENV = "PREFMILL_DATA"
INBOX_ENV = "PREFMILL_INBOX"
CORPORA_ENV = "PREFMILL_CORPORA"
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"

_SAFE_KEY = re.compile(r"[^A-Za-z0-9._-]+")


def default_data_root() -> str:
    return os.environ.get(DATA_ENV) or str(REPO_ROOT / "data")


def default_inbox(data_root: str | None = None) -> str:
    return os.environ.get(INBOX_ENV) or str(Path(data_root or default_data_root()) / "inbox")


def safe_key(raw: str, max_len: int = 80) -> str:
    """A partition key / file name made from untrusted text: no separators, no dot-dot, bounded length."""
    key = _SAFE_KEY.sub("-", raw).strip(".-")[:max_len]
    if not key:
        raise ValueError(f"cannot make a safe key from {raw!r}")
    return key


class Layout:
    """The on-disk layout under one data root (DESIGN.md: one folder per asset, corpora by version)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def asset_dir(self, asset: str, partition: str | None = None) -> Path:
        path = self.root / asset
        return path / safe_key(partition) if partition is not None else path

    def prompts(self, partition: str) -> Path:
        return self.asset_dir("prompt_batches", partition) / "prompts.parquet"

    def candidates(self, partition: str) -> Path:
        return self.asset_dir("candidate_images", partition) / "candidates.parquet"

    def labels(self, partition: str) -> Path:
        return self.asset_dir("reward_labels", partition) / "labels.parquet"

    def pairs(self, partition: str) -> Path:
        return self.asset_dir("preference_pairs", partition) / "pairs.parquet"

    def corpus_root(self, corpus: str) -> Path:
        return self.root / "corpora" / corpus

    def run_root(self, run: str) -> Path:
        return self.root / "runs" / run

    def eval_root(self, name: str) -> Path:
        return self.root / "evals" / name
