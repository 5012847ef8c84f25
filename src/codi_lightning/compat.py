"""Every private API of another library this project relies on, in one place.

Each entry of :data:`PRIVATE_APIS` names an attribute that is not part of its library's
public interface, where the project uses it, and the parameters the project's use
expects. :func:`changed_private_apis` checks them all against the installed versions;
``tests/test_compat.py`` runs it, so an upgrade that renames or re-signs one fails that
test by name instead of somewhere deep in a run. The accessors below are the only code
that touches these attributes directly (the CLI's overrides of LightningCLI's private
steps are methods of ``cli.CoDiCLI`` and are checked here by signature).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PrivateAPI:
    module: str
    attribute: str  # dotted, within the module
    # the leading parameters the use relies on; None: not a callable
    parameters: tuple[str, ...] | None
    used_by: str
    instance: str | None = None  # an instance attribute: "module:Class" to build one from


PRIVATE_APIS = (
    PrivateAPI("lightning.pytorch.cli", "LightningCLI._run_subcommand", ("self", "subcommand"),
               "cli.CoDiCLI: removes the empty log folder of a failed run"),
    PrivateAPI("lightning.pytorch.cli", "LightningCLI._prepare_subcommand_parser",
               ("self", "klass", "subcommand"), "cli.CoDiCLI: --weights_only defaults true"),
    PrivateAPI("lightning.pytorch.cli", "LightningCLI._parse_ckpt_path", ("self",),
               "cli.CoDiCLI: --ckpt_path auto, checkpoint checks before the hparams load"),
    PrivateAPI("lightning.pytorch.cli", "LightningCLI._instantiate_trainer",
               ("self", "config", "callbacks"), "cli.CoDiCLI: the step progress bar"),
    PrivateAPI("lightning.pytorch.trainer.connectors.logger_connector.logger_connector",
               "_LoggerConnector.should_update_logs", None,
               "training.run.logs_this_step (via logger_connector)"),
    PrivateAPI("torchmetrics", "Metric._defaults", None,
               "metrics.suite.EvalSuite._align_list_states (via metric_defaults)",
               "torchmetrics.aggregation:SumMetric"),
    PrivateAPI("torch.distributed.checkpoint.state_dict_loader", "_load_state_dict",
               ("state_dict", "storage_reader", "process_group", "coordinator_rank",
                "no_dist", "planner"), "checkpoints._load_sharded (via load_dcp_state)"),
    PrivateAPI("torch.distributed.checkpoint.format_utils", "_EmptyStateDictLoadPlanner", (),
               "checkpoints._load_sharded (via load_dcp_state)"),
    PrivateAPI("argparse", "ArgumentParser._actions", None,
               "cli option lists (via parser_options)", "argparse:ArgumentParser"),
    PrivateAPI("diffusers.models.transformers.transformer_flux", "FluxTransformerBlock", (),
               "models.teachers.flux.block_classes (via flux_block_classes)"),
    PrivateAPI("diffusers.models.transformers.transformer_flux", "FluxSingleTransformerBlock",
               (), "models.teachers.flux.block_classes (via flux_block_classes)"),
    PrivateAPI("diffusers.models.transformers.sana_transformer", "SanaTransformerBlock", (),
               "models.teachers.sana.block_classes (via sana_block_class)"),
)  # fmt: skip


def _resolve(api: PrivateAPI) -> Any:
    if api.instance is not None:  # built with no arguments, then the attribute read
        module, cls = api.instance.split(":")
        instance = getattr(importlib.import_module(module), cls)()
        return getattr(instance, api.attribute.split(".")[-1])
    target: Any = importlib.import_module(api.module)
    for name in api.attribute.split("."):
        target = getattr(target, name)
    return target


def changed_private_apis() -> list[str]:
    """One line per private API that is missing or whose leading parameters changed."""
    problems = []
    for api in PRIVATE_APIS:
        where = f"{api.module}.{api.attribute} (used by {api.used_by})"
        try:
            target = _resolve(api)
        except (ImportError, AttributeError) as err:
            problems.append(f"{where}: missing ({err})")
            continue
        if api.parameters:
            names = tuple(inspect.signature(target).parameters)
            if names[: len(api.parameters)] != api.parameters:
                problems.append(f"{where}: parameters {names}, expected {api.parameters} first")
    return problems


def logger_connector(trainer: Any) -> Any:
    """The trainer's logger connector (None where it has none)."""
    return getattr(trainer, "_logger_connector", None)


def metric_defaults(metric: Any) -> dict[str, Any]:
    """A torchmetrics Metric's states and their default values (``add_state``)."""
    return metric._defaults


def parser_options(parser: Any) -> list[str]:
    """The ``--long`` option strings an argparse/jsonargparse parser knows."""
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def load_dcp_state(state_dict: dict[str, Any], storage_reader: Any, planner_wrapper: Any) -> None:
    """torch's one-process distributed-checkpoint load into ``state_dict``, with the
    planner that loads whatever the checkpoint holds wrapped by ``planner_wrapper``."""
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    _load_state_dict(
        state_dict, storage_reader=storage_reader,
        planner=planner_wrapper(_EmptyStateDictLoadPlanner)(), no_dist=True,
    )  # fmt: skip


def flux_block_classes() -> tuple[type, type]:
    """Flux's double- and single-stream transformer block classes."""
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    return FluxTransformerBlock, FluxSingleTransformerBlock


def sana_block_class() -> type:
    """SANA's transformer block class (its ControlNet's blocks too)."""
    from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

    return SanaTransformerBlock
