"""``codi-lightning``: LightningCLI with fit/validate/test/predict, plus ``shards``."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from jsonargparse import CLI
from lightning.pytorch.cli import LightningCLI

from .checkpoints import consolidate_checkpoint
from .data import ShardDataModule, write_depth_shards, write_edit_shards, write_shards
from .export import export_checkpoint
from .training import CoDiDistillation, ImageWriter

DEFAULT_MODEL = CoDiDistillation

EXTRA_COMMANDS = {
    "shards": write_shards,
    "edit-shards": write_edit_shards,
    "depth-shards": write_depth_shards,
    "export": export_checkpoint,
    "consolidate": consolidate_checkpoint,
}
# the teacher, VAE, text encoder and EMA target are in eval mode on purpose
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")

EPILOG = (
    "Also: `codi-lightning shards --help` writes WebDataset shards from an image folder "
    "(`edit-shards` from a JSONL manifest of editing triples, `depth-shards` with depth "
    "maps estimated at write time); "
    "`codi-lightning export --help` writes diffusers folders from a checkpoint; "
    "`codi-lightning consolidate --help` gathers a sharded checkpoint into one file."
)


# Options that say how to evaluate or sample, not what was trained. With `--ckpt_path`,
# Lightning's CLI applies the checkpoint's saved hyperparameters over the parsed command
# line (upstream: Lightning-AI/pytorch-lightning#21455, open), so `test --ckpt_path X
# --model.test_steps [1]` would silently evaluate the training run's step counts. For
# validate/test/predict these options keep the values of this command (flags, --config).
RUN_TIME_OPTIONS = (
    "val_steps",
    "val_images",
    "val_guidance_scale",
    "test_steps",
    "eval_weights",
    "eval_guidance_scale",
    "eval_stochastic",
    "metrics",
    "predict_steps",
)


class CoDiCLI(LightningCLI):
    """The Lightning CLI over any LightningModule (default :class:`CoDiDistillation`, so
    configs without ``model.class_path`` distil; ``DiffusionTraining`` trains a teacher,
    ``ControlNetBaseline`` the two-stage baseline) and :class:`ShardDataModule`."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"epilog": EPILOG})
        super().__init__(
            L.LightningModule, ShardDataModule, subclass_mode_model=True, args=args, **kwargs
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(
            {"model": {"class_path": f"{DEFAULT_MODEL.__module__}.{DEFAULT_MODEL.__name__}"}}
        )

    def before_instantiate_classes(self) -> None:
        """Fail early, with the fix, on a model seed that differs from the data seed:
        Lightning refuses hparams that the module and the datamodule both have with
        different values, but only once fitting starts, and its message names no option."""
        command = self.config.get("subcommand")
        config = self.config[command] if command else self.config
        model_seed = (config.get("model") or {}).get("init_args", {}).get("seed")
        data_seed = (config.get("data") or {}).get("seed")
        if model_seed is not None and data_seed is not None and model_seed != data_seed:
            raise ValueError(
                f"model.seed={model_seed} but data.seed={data_seed}: Lightning requires the "
                f"two to be equal (both are saved as hyperparameters); pass "
                f"--data.seed {model_seed} as well (or --model.seed {data_seed})"
            )

    def _parse_ckpt_path(self) -> None:
        command = self.config.get("subcommand")
        init = None
        if command in ("validate", "test", "predict"):
            init = self.config[command].get("model", {}).get("init_args")
        keep = {k: init[k] for k in RUN_TIME_OPTIONS if init is not None and k in init}
        super()._parse_ckpt_path()
        if keep:
            restored = self.config[command]["model"]["init_args"]
            for key, value in keep.items():
                restored[key] = value

    def before_predict(self) -> None:
        """Write predictions to files unless the config already has a writer."""
        if not any(isinstance(cb, ImageWriter) for cb in self.trainer.callbacks):
            out = self.datamodule.hparams.predict_output
            out = out or str(Path(self.trainer.default_root_dir) / "predictions")
            self.trainer.callbacks.append(ImageWriter(out))


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
