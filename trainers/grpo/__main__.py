"""``python -m trainers.grpo --config cfg.{json,yaml} [--set key=value ...]``"""

from trainers.common import cli_main
from trainers.grpo import GRPOConfig, train

if __name__ == "__main__":
    raise SystemExit(cli_main(GRPOConfig, train, prog="python -m trainers.grpo"))
