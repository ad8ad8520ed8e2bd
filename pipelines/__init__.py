"""The prefmill Dagster code location and the plumbing it owns (generation, shard I/O, the tiny model zoo)."""

from labelers import torch_compat as _torch_compat

_torch_compat.install()
