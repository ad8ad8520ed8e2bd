"""``python -m trainers.rpo --config cfg.{json,yaml} [--set key=value ...]``"""

from trainers.common import cli_main
from trainers.rpo import RPOConfig, train

if __name__ == "__main__":
    raise SystemExit(cli_main(RPOConfig, train, prog="python -m trainers.rpo"))
