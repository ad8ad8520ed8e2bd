"""``python -m trainers.ar_grpo --config cfg.{json,yaml} [--set key=value ...]``"""

from trainers.ar_grpo import ARGRPOConfig, train
from trainers.common import cli_main

if __name__ == "__main__":
    raise SystemExit(cli_main(ARGRPOConfig, train, prog="python -m trainers.ar_grpo"))
