"""``codi-lightning``: LightningCLI with fit/validate/test/predict, plus ``shards``."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from jsonargparse import CLI
from lightning.pytorch.cli import LightningCLI

from .data import ShardDataModule, write_shards
from .training import CoDiDistillation

EXTRA_COMMANDS = {"shards": write_shards}
# the teacher, VAE, text encoder and EMA target are in eval mode on purpose
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

EPILOG = "Also: `codi-lightning shards --help` writes WebDataset shards from an image folder."


class CoDiCLI(LightningCLI):
    """The Lightning CLI over :class:`CoDiDistillation` and :class:`ShardDataModule`."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"epilog": EPILOG})
        super().__init__(CoDiDistillation, ShardDataModule, args=args, **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in EXTRA_COMMANDS:
        CLI(
            EXTRA_COMMANDS[args[0]],
            args=args[1:],
            prog=f"codi-lightning {args[0]}",
            as_positional=False,
        )
        return
    CoDiCLI(args=None if argv is None else args)


if __name__ == "__main__":
    main()
