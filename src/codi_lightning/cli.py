"""``codi-lightning``: LightningCLI with fit/validate/test/predict, plus ``shards``."""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import CLI, ArgumentParser
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from .checkpoints import (
    CheckpointError,
    TeacherNotFoundError,
    check_checkpoint,
    consolidate_checkpoint,
    is_missing_local_path,
    is_sharded,
    newest_checkpoint,
)
from .compat import parser_options
from .data import ShardDataModule, write_depth_shards, write_edit_shards, write_shards
from .data.cache import write_cached_shards
from .data.datamodule import MissingShardsError, check_local_shards, shard_sources
from .data.folder import ConditionFolder
from .export import export_checkpoint
from .serve import serve
from .training import (
    CoDiDistillation,
    ImageWriter,
    NonFiniteTrainingError,
    StepProgressBar,
    StreamedCheckpointIO,
)

DEFAULT_MODEL = CoDiDistillation

EXTRA_COMMANDS = {
    "shards": write_shards,
    "cache": write_cached_shards,
    "edit-shards": write_edit_shards,
    "depth-shards": write_depth_shards,
    "export": export_checkpoint,
    "consolidate": consolidate_checkpoint,
    "serve": serve,
}
# options of the extra commands that also answer to the name the Lightning commands use
OPTION_ALIASES = {"serve": {"--model.pretrained": "--pretrained"}}
# the teacher, VAE, text encoder and EMA target are in eval mode on purpose
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# predict batches are named by the data (ImageWriter), not by Lightning's sampler indices
warnings.filterwarnings("ignore", message=r"Couldn't infer the batch indices .*LockstepLoader")


class _NoCloudTips(logging.Filter):
    """Drops Lightning's tips to install its cloud services (litlogger, litmodels), printed
    at every Trainer start; Lightning has no switch for them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoCloudTips())

PROG = "codi-lightning"

EPILOG = (
    "Also: `codi-lightning shards --help` writes WebDataset shards from an image folder "
    "(`edit-shards` from a JSONL manifest of editing triples, `depth-shards` with depth "
    "maps estimated at write time); "
    "`codi-lightning cache --help` adds the teacher's VAE latents and text embeddings to "
    "shards, so training skips both encoders; "
    "`codi-lightning export --help` writes diffusers folders from a checkpoint; "
    "`codi-lightning consolidate --help` gathers a sharded checkpoint into one file; "
    "`codi-lightning serve --help` opens a local page to try a model in the browser."
)
SUBCOMMAND_EPILOG = (
    "The model's options (model.*) are listed by `codi-lightning {command} --model.help "
    "CoDiDistillation` (or DiffusionTraining, ControlNetBaseline)."
)


class UsageError(ValueError):
    """A command line or config the parser refuses; the message names the problem and the
    fix in a few lines (no usage dump)."""


class _ShortErrors:
    """Parser errors raise :class:`UsageError` with a short message (and, for an unknown
    option, the closest known one) instead of printing the whole usage; ``main`` prints it.
    Parsers that do not exit on errors (jsonargparse's inner ones) keep their behaviour,
    and so does JSONARGPARSE_DEBUG."""

    def error(self, message: str, ex: Exception | None = None):
        debug = os.environ.get("JSONARGPARSE_DEBUG", "").lower() not in ("", "0", "false")
        if not self.exit_on_error or debug:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        raise UsageError(short_error(parser, message)) from ex


class CoDiArgumentParser(_ShortErrors, LightningArgumentParser):
    pass


class CommandArgumentParser(_ShortErrors, ArgumentParser):
    pass


def _option_strings(parser: Any) -> list[str]:
    return parser_options(parser)


def _class_options(class_path: str, key: str) -> list[str]:
    """``--key.*`` options of the class at ``class_path`` (its init args, nested ones too)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        inner = ArgumentParser(exit_on_error=False)
        inner.add_class_arguments(cls, key, fail_untyped=False)
    except Exception:
        return []
    return _option_strings(inner)


def _did_you_mean(option: str, known: list[str]) -> str:
    close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def short_error(parser: Any, message: str) -> str:
    """A few lines for a parser error: what is wrong, and what to do."""
    prog = parser.prog.replace(" [options]", "")
    see = f"see `{prog} --help` for the options"
    missing = re.search(r'Parser key "config":.*File does not exist: (.+)', message)
    if missing:
        return (
            f"config file not found: {missing.group(1).strip()}\n"
            f"give an existing YAML file, e.g. --config configs/tiny_cpu.yaml"
        )
    unknown = re.match(r"unrecognized arguments: (\S+)", message)
    if unknown:
        option = unknown.group(1).split("=")[0]
        return f"unknown option {option}{_did_you_mean(option, _option_strings(parser))}\n{see}"
    nested = re.search(
        r'Parser key "([\w.]+)":.*class_path \'([\w.]+)\':\s*Option \'([\w.]+)\' is not accepted',
        message,
        re.DOTALL,
    )
    if nested:
        key, class_path, name = nested.groups()
        option = f"--{key}.{name}"
        hint = _did_you_mean(option, _class_options(class_path, key))
        command = prog.split()[-1] if " " in prog else "fit"
        return (
            f"unknown option {option}{hint}\n"
            f"see `{PROG} {command} --{key}.help {class_path.rpartition('.')[2]}` for the options"
        )
    return f"{message.rstrip()}\n{see}"


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
    "predict_tasks",
    "tiling",
)
# Teacher locations: a local path recorded in the checkpoint that does not exist here
# gives way to this command's value (flags, --config) when that one resolves.
TEACHER_OPTIONS = ("pretrained", "init_from")
# `--ckpt_path` values that are not local paths (before any ":"): Lightning's keywords
# (`registry:<name>:<version>` too), URLs, and our `auto`
CKPT_KEYWORDS = ("last", "best", "hpc", "registry", "auto", "http", "https", "s3", "gs")


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _say(message: str) -> None:
    """One line to stderr, from the first process only, without terminal colour codes
    (a relayed library message may carry them)."""
    if getattr(rank_zero_only, "rank", 0) == 0:
        print(ANSI.sub("", message), file=sys.stderr, flush=True)


def _as_list(value: Any) -> list[Any]:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _is_checkpoint_callback(class_path: str | None) -> bool:
    module, _, name = (class_path or "").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, ModelCheckpoint)


def checkpoint_folders(trainer: Any) -> tuple[list[str], list[str]]:
    """Where a run configured by ``trainer`` (the parsed ``trainer`` section) writes its
    checkpoints: the ``dirpath`` of each ModelCheckpoint in ``trainer.callbacks``; and the
    folders to search recursively when one has none (Lightning then writes under the
    logger's folder): ``default_root_dir`` (else ``./lightning_logs``) and each logger's
    ``save_dir``."""
    folders, search = [], False
    for callback in _as_list(trainer.get("callbacks")):
        if _is_checkpoint_callback(callback.get("class_path")):
            dirpath = (callback.get("init_args") or {}).get("dirpath")
            if dirpath:
                folders.append(str(dirpath))
            else:
                search = True
    if folders and not search:
        return folders, []
    roots = [str(trainer.get("default_root_dir") or "lightning_logs")]
    for logger in _as_list(trainer.get("logger")):
        save_dir = (logger.get("init_args") or {}).get("save_dir")
        if save_dir:
            roots.append(str(save_dir))
    return folders, roots


RUN_DIR_BOILERPLATE = ("config.yaml", "hparams.yaml")


def discard_empty_run_dir(trainer: L.Trainer) -> Path | None:
    """After a failed command, remove the run's log folder (``version_N``) if the run left
    nothing in it but its config copies and event files: no training step done, no
    checkpoint, sample grid or metrics written. Rank 0 only (it owns the folder); reads
    the logger's own path, not the collective ``Trainer.log_dir``. Returns the folder
    removed, if any."""
    import shutil

    logger = trainer.logger
    if logger is None or trainer.global_rank != 0 or trainer.global_step > 0:
        return None
    folder = getattr(logger, "log_dir", None)
    if folder is None or not Path(folder).is_dir():
        return None
    folder = Path(folder)
    for entry in folder.iterdir():
        boilerplate = entry.name in RUN_DIR_BOILERPLATE or entry.name.startswith(
            "events.out.tfevents."
        )
        if entry.is_dir() or not boilerplate:
            return None
    shutil.rmtree(folder)
    return folder


def root_cause(err: BaseException) -> BaseException:
    """The first exception of ``err``'s chain (what a class raised before the parser
    wrapped it)."""
    seen = {id(err)}
    while True:
        nxt = err.__cause__ or err.__context__
        if nxt is None or id(nxt) in seen:
            return err
        seen.add(id(nxt))
        err = nxt


def _is_fsdp2(config: Any) -> bool:
    """The command's trainer uses ``ModelParallelStrategy`` (the FSDP2 preset)."""
    strategy = (config.get("trainer") or {}).get("strategy")
    name = strategy if isinstance(strategy, str) else (strategy or {}).get("class_path", "")
    return str(name).endswith("ModelParallelStrategy")


def check_accelerator(trainer: Any) -> None:
    """``--trainer.accelerator gpu`` (or ``cuda``) on a machine without a CUDA GPU is a
    one-line error naming the fix, before any model loads (Lightning's own error is a
    40-line traceback ending in "No supported gpu backend found!")."""
    import torch

    accelerator = str(trainer.get("accelerator") or "auto").lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"--trainer.accelerator {accelerator}: this machine has no CUDA GPU that torch "
            "can use; run with --trainer.accelerator cpu (or auto)"
        )
    devices = trainer.get("devices")
    try:  # a count (the command line gives it as a string); lists and "auto" pass
        count = None if isinstance(devices, bool) else int(devices)
    except (TypeError, ValueError):
        count = None
    if count is not None and count < 1 and count != -1:  # -1: Lightning's "all"
        raise UsageError(f"--trainer.devices {devices}: give a positive count (or auto)")


class CoDiCLI(LightningCLI):
    """The Lightning CLI over any LightningModule (default :class:`CoDiDistillation`, so
    configs without ``model.class_path`` distil; ``DiffusionTraining`` trains a teacher,
    ``ControlNetBaseline`` the two-stage baseline) and :class:`ShardDataModule`."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault(
            "parser_kwargs",
            {"prog": PROG, "epilog": EPILOG}
            | {c: {"epilog": SUBCOMMAND_EPILOG.format(command=c)} for c in self.subcommands()},
        )
        kwargs.setdefault("parser_class", CoDiArgumentParser)
        super().__init__(
            L.LightningModule, ShardDataModule, subclass_mode_model=True, args=args, **kwargs
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(
            {"model": {"class_path": f"{DEFAULT_MODEL.__module__}.{DEFAULT_MODEL.__name__}"}}
        )

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            removed = discard_empty_run_dir(self.trainer)
            if removed is not None:
                print(f"removed the failed run's empty log folder {removed}", file=sys.stderr)
            raise

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        """``--weights_only`` defaults to true: the trainer unpickles a checkpoint with
        ``weights_only=True`` even on torch < 2.6 or with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, ()):
            parser.set_defaults(weights_only=True)
        return parser

    def before_instantiate_classes(self) -> None:
        """Fail early, with the fix, on a model seed that differs from the data seed:
        Lightning refuses hparams that the module and the datamodule both have with
        different values, but only once fitting starts, and its message names no option."""
        command = self.config.get("subcommand")
        config = self.config[command] if command else self.config
        data = config.get("data") or {}
        ShardDataModule.check_counts(
            **{k: data.get(k) for k in ShardDataModule.COUNTS if data.get(k) is not None}
        )
        model_args = (config.get("model") or {}).get("init_args", {}) or {}
        model_seed = model_args.get("seed")
        data_seed = data.get("seed")
        if model_seed is not None and data_seed is not None and model_seed != data_seed:
            raise ValueError(
                f"model.seed={model_seed} but data.seed={data_seed}: Lightning requires the "
                f"two to be equal (both are saved as hyperparameters); pass "
                f"--data.seed {model_seed} as well (or --model.seed {data_seed})"
            )

    def instantiate_classes(self) -> None:
        """Local shard files the command will read exist, checked before any model loads.
        An error a class raises while it is built reaches the user as that error (the
        parser would wrap it in a union error that prints the whole config)."""
        command = self.config.get("subcommand")
        config = self.config[command] if command else self.config
        self._check_shards(command, config.get("data") or {})
        check_accelerator(config.get("trainer") or {})
        try:
            super().instantiate_classes()
        except Exception as err:
            root = root_cause(err)
            if root is err:
                raise
            raise root from None

    @staticmethod
    def _check_shards(command: str | None, data: Any) -> None:
        """Local shard files the command will read exist, checked before any model loads
        (fit: the training shards; validate and test: the validation shards; fit's
        validation shards are checked when their loader is built)."""
        key = {"fit": "train_shards", "validate": "val_shards", "test": "val_shards"}.get(
            command or ""
        )
        spec = data.get(key) if key else None
        if spec:
            for urls, _ in shard_sources(spec, f"data.{key}"):
                check_local_shards(urls, f"data.{key}")

    def _parse_ckpt_path(self) -> None:
        """Before Lightning applies the checkpoint's hyperparameters over the command line:
        resolve ``--ckpt_path auto``, check the checkpoint up front (one-line
        :class:`CheckpointError`), and afterwards restore this command's run-time options
        and, where the recorded teacher is missing here, its teacher location."""
        command = self.config.get("subcommand")
        if not command:
            return super()._parse_ckpt_path()
        self._check_predict_inputs(command)
        self._check_predict_tasks(command)
        ckpt_path = self.config[command].get("ckpt_path")
        if ckpt_path == "auto":
            ckpt_path = self._newest_checkpoint(command)
            self.config[command]["ckpt_path"] = ckpt_path
        elif ckpt_path and str(ckpt_path).split(":")[0] not in CKPT_KEYWORDS:
            check_checkpoint(ckpt_path)
        if ckpt_path and is_sharded(ckpt_path):
            self._check_sharded_strategy(command, ckpt_path)
        init = (self.config[command].get("model") or {}).get("init_args") or {}
        keep = {}
        if command in ("validate", "test", "predict"):
            keep = {k: init[k] for k in RUN_TIME_OPTIONS if k in init}
        given = {k: init.get(k) for k in TEACHER_OPTIONS}
        super()._parse_ckpt_path()
        restored = (self.config[command].get("model") or {}).get("init_args")
        if restored is None:
            return None
        for key, value in keep.items():
            restored[key] = value
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return None  # Lightning applied no recorded hyperparameters
        for key in TEACHER_OPTIONS:
            recorded = restored.get(key)
            if not is_missing_local_path(recorded):
                continue
            if given[key] and not is_missing_local_path(given[key]):
                _say(f"{ckpt_path}: model.{key} {recorded!r} recorded in the checkpoint is not "
                     f"found here; using {given[key]!r} from this command")  # fmt: skip
                restored[key] = given[key]
            else:
                raise TeacherNotFoundError(
                    f"{ckpt_path}: teacher {recorded!r} recorded in the checkpoint is not found "
                    f"here; give its location with --model.{key} PATH"
                )
        return None

    def _check_predict_inputs(self, command: str) -> None:
        """``predict`` checks its input folder first (this is the first hook after parsing),
        before a checkpoint is read or the model and its teacher load."""
        if command != "predict":
            return
        config = self.config[command]
        folder = (config.get("data") or {}).get("predict_images")
        if not folder:
            raise UsageError("predict needs input images: give --data.predict_images FOLDER")
        try:
            ConditionFolder(folder)
        except FileNotFoundError as err:
            raise UsageError(f"{err}\ngive --data.predict_images a folder of images") from None

    def _check_predict_tasks(self, command: str) -> None:
        """``--model.predict_tasks {name: checkpoint, ...}``: each checkpoint checked up
        front; without ``--ckpt_path`` the first task's checkpoint builds the model (its
        teacher is the backbone every task shares)."""
        config = self.config[command]
        init = (config.get("model") or {}).get("init_args") or {}
        tasks = init.get("predict_tasks") or {}
        if not tasks:
            return
        if command != "predict":
            raise UsageError("model.predict_tasks is an option of predict")
        for path in tasks.values():
            check_checkpoint(path)
        if not config.get("ckpt_path"):
            config["ckpt_path"] = next(iter(tasks.values()))

    def _check_sharded_strategy(self, command: str, ckpt_path: str) -> None:
        """A distributed-checkpoint folder loads only under ``ModelParallelStrategy``
        (Lightning's other strategies fail on a folder with a long ``IsADirectoryError``)."""
        if not _is_fsdp2(self.config[command]):
            raise UsageError(
                f"{ckpt_path}: a sharded (FSDP2) checkpoint folder, which loads only with the "
                "FSDP2 preset (--config configs/trainer/fsdp.yaml); or gather it into one "
                f"file: codi-lightning consolidate --ckpt {ckpt_path} --output one.ckpt"
            )

    def _newest_checkpoint(self, command: str) -> str | None:
        """``--ckpt_path auto``: the newest complete checkpoint of this run's folders."""
        if command != "fit":
            raise CheckpointError(
                f"--ckpt_path auto resumes fit; give {command} a checkpoint path "
                "(or Lightning's 'best' / 'last')"
            )
        folders, search = checkpoint_folders(self.config[command].get("trainer") or {})
        found, skipped = newest_checkpoint(folders, search)
        if skipped:
            _say(f"--ckpt_path auto: skipped {len(skipped)}: " + "; ".join(skipped))
        if found is None:
            where = ", ".join(folders + [f"{s} (recursively)" for s in search])
            _say(f"--ckpt_path auto: no checkpoint in {where}: starting from scratch")
            return None
        _say(f"--ckpt_path auto: resuming from {found[0]} (global_step {found[1]})")
        return str(found[0])

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> L.Trainer:
        """Lightning's progress bar counts epochs; ours counts steps (StepProgressBar),
        unless the config has a bar of its own or none. ``predict`` logs nothing, so it
        runs without the logger and the config copy (each would add a ``version_N``).
        Checkpoint files are written by :class:`StreamedCheckpointIO` unless the config
        names a ``CheckpointIO`` plugin."""
        if getattr(self, "subcommand", None) == "predict":
            config["logger"] = False
            self.save_config_callback = None
        plugins = _as_list(config.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # no second copy in memory
            config["plugins"] = [*plugins, StreamedCheckpointIO()]
        given = [*_as_list(config.get("callbacks")), *callbacks]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in given
        ):
            callbacks = [*callbacks, StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def before_predict(self) -> None:
        """Write predictions to files unless the config already has a writer."""
        if not any(isinstance(cb, ImageWriter) for cb in self.trainer.callbacks):
            out = self.datamodule.hparams.predict_output
            out = out or str(Path(self.trainer.default_root_dir) / "predictions")
            self.trainer.callbacks.append(ImageWriter(out))


# what a mistake in the command, the config or the inputs raises (the message names the
# fix): a few lines and exit code 2, not a traceback; RuntimeError and the rest keep theirs
USER_ERRORS = (
    CheckpointError, UsageError, MissingShardsError, ValueError, FileNotFoundError,
    NotADirectoryError, IsADirectoryError, PermissionError, MisconfigurationException,
)  # fmt: skip
MAX_ERROR_LINES = 4


def error_lines(err: BaseException) -> str:
    """``err``'s message in at most ``MAX_ERROR_LINES`` lines (a longer one is cut, with
    where to see the rest)."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    if len(lines) > MAX_ERROR_LINES:
        lines = [*lines[: MAX_ERROR_LINES - 1], "... (CODI_DEBUG=1 prints all of it)"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI. A mistake in the command, config or inputs (:data:`USER_ERRORS`: a
    :class:`CheckpointError`, a :class:`UsageError`, a :class:`MissingShardsError`, an
    option a class refuses with ``ValueError``...) ends with ``error: <message>`` on stderr
    in a few lines and exit code 2; a :class:`NonFiniteTrainingError` the same way with
    exit code 1. ``CODI_DEBUG=1`` prints the traceback as well."""
    try:
        _main(argv)
    except (*USER_ERRORS, NonFiniteTrainingError) as err:
        if os.environ.get("CODI_DEBUG") == "1":
            traceback.print_exc()
        print(f"error: {error_lines(err)}", file=sys.stderr, flush=True)
        raise SystemExit(1 if isinstance(err, NonFiniteTrainingError) else 2) from None


def _alias(arg: str, aliases: dict[str, str]) -> str:
    name, eq, value = arg.partition("=")
    return aliases[name] + eq + value if name in aliases else arg


def _main(argv: Sequence[str] | None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in EXTRA_COMMANDS:
        aliases = OPTION_ALIASES.get(args[0], {})
        rest = [_alias(a, aliases) for a in args[1:]]
        CLI(
            EXTRA_COMMANDS[args[0]],
            args=rest,
            prog=f"{PROG} {args[0]}",
            as_positional=False,
            parser_class=CommandArgumentParser,
        )
        return
    CoDiCLI(args=None if argv is None else args)


if __name__ == "__main__":
    main()
