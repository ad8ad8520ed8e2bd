"""SFT, Diffusion-DPO and GRPO trainers, each runnable as ``python -m trainers.<name> --config FILE``.

Never imports Dagster: when launched through Dagster Pipes the trainers report through ``dagster_pipes`` only.
"""

from labelers import torch_compat as _torch_compat

_torch_compat.install()
