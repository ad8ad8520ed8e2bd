"""``python -m trainers.sft --config cfg.{json,yaml} [--set key=value ...]``"""

from trainers.common import cli_main
from trainers.sft import SFTConfig, train

if __name__ == "__main__":
    raise SystemExit(cli_main(SFTConfig, train, prog="python -m trainers.sft"))
