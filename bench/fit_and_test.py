"""Train, then test the last checkpoint, in one process.

    python bench/fit_and_test.py --config configs/toy/distill.yaml [overrides...]

The same as ``codi-lightning fit ...`` followed by ``codi-lightning test ... --ckpt_path
<last.ckpt>``, without the second start-up (the imports alone take ~14 s on 2
CPU cores, then the model is built again). Used by bench/quality.py.
"""

from __future__ import annotations

import sys

from codi_lightning.cli import CoDiCLI


def main(args: list[str]) -> None:
    cli = CoDiCLI(args=["fit", *args])
    if cli.trainer.checkpoint_callback is None or not cli.trainer.checkpoint_callback.save_last:
        raise SystemExit("fit_and_test needs a ModelCheckpoint with save_last: true")
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="last")


if __name__ == "__main__":
    main(sys.argv[1:])
