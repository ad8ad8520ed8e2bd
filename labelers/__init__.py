"""Judges, rewards and pair building. Never imports Dagster; heavy libraries load inside functions."""

from labelers import torch_compat as _torch_compat

_torch_compat.install()
