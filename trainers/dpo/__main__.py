"""``python -m trainers.dpo --config cfg.{json,yaml} [--set key=value ...]``"""

from trainers.common import cli_main
from trainers.dpo import DPOConfig, train

if __name__ == "__main__":
    raise SystemExit(cli_main(DPOConfig, train, prog="python -m trainers.dpo"))
