"""The ``lightly-mcp`` command line (also ``python -m lightly_mcp``)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXIT_USAGE = 2

RESTART_HELP = (
    "delete what earlier runs wrote in OUT for this stage and the later ones (other "
    "files stay) and start over; without it, a folder holding outputs of another "
    "recipe is refused"
)

SET_HELP = (
    "override a recipe value, e.g. --set mcp.pruning_ratio=0.5 or "
    "--set data.subset=null (values are parsed as YAML; repeatable)"
)


def _version() -> str:
    """The installed package's version, read without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightly-mcp")
    except PackageNotFoundError:  # a source tree that was not installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightly-mcp",
        description=(
            "Momentum Contrastive Pruning: prune a MoCo model once, without labels "
            "and without fine-tuning, and export a compact momentum subnet."
        ),
        epilog="Each subcommand has --help. Recipes live in recipes/.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks on errors"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, **kwargs)
        p.set_defaults(command_parser=p)
        return p

    def common(p: argparse.ArgumentParser, recipe: bool = True) -> None:
        if recipe:
            p.add_argument(
                "--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP
            )
            p.add_argument(
                "--print-recipe",
                action="store_true",
                help="print the resolved recipe (file, defaults and --set) as YAML "
                "and exit; nothing runs and --out is not needed",
            )
        p.add_argument(
            "--out", type=Path, default=None, help="output directory (required)"
        )
        if recipe:
            p.add_argument(
                "--accelerator",
                "--device",
                dest="device",
                metavar="ACCELERATOR",
                default=None,
                help="Lightning accelerator: cpu, cuda, gpu, auto, ... (overrides "
                "trainer.accelerator; --device is the same option)",
            )
            p.add_argument(
                "--devices",
                default=None,
                help="number of devices, -1 (all) or indices such as 0,1 "
                "(overrides trainer.devices)",
            )
        p.add_argument(
            "--quiet",
            action="store_true",
            help="no progress bars" if recipe else "print only where the model went",
        )
        p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    def preflight_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dry-run",
            action="store_true",
            help="only the preflight: check in seconds, on a few images, that every "
            "stage will succeed with this recipe; train and write nothing",
        )
        p.add_argument(
            "--no-preflight",
            action="store_true",
            help="skip the preflight that runs before training",
        )

    p = command(
        "pretrain",
        help="dense MoCo v2 → OUT/pretrain/",
        description="Dense MoCo v2 pretraining → OUT/pretrain/.",
    )
    p.add_argument("recipe", type=Path, help="YAML recipe")
    p.add_argument("--restart", action="store_true", help=RESTART_HELP)
    common(p)
    preflight_options(p)

    p = command(
        "prune",
        help="MCP from a dense checkpoint → OUT/prune/",
        description="MCP from a dense MoCo checkpoint → OUT/prune/.",
    )
    p.add_argument("recipe", type=Path, help="YAML recipe")
    p.add_argument(
        "--from",
        dest="dense",
        type=Path,
        default=None,
        help="dense MoCo checkpoint (default: pretrain.dense_checkpoint)",
    )
    p.add_argument("--restart", action="store_true", help=RESTART_HELP)
    common(p)
    preflight_options(p)

    p = command(
        "export",
        help="compact model + report → OUT/",
        description="Physically prune an MCP checkpoint's momentum "
        "subnet, fold its BatchNorm layers and write model.pt2 (torch.export), "
        "model.onnx, model.pt, report.json.",
    )
    p.add_argument("checkpoint", type=Path, help="MCP checkpoint")
    p.add_argument(
        "--round-to",
        type=int,
        default=None,
        help="widen the trained channel counts to multiples of this after training "
        "(adds back pruned channels; MCP's mcp.round_to aligns them in training)",
    )
    p.add_argument("--no-latency", action="store_true", help="skip latency timing")
    p.add_argument(
        "--latency-at-224",
        action="store_true",
        help="also time dense and compact at 224 px (default: the training size)",
    )
    p.add_argument(
        "--torchscript",
        action="store_true",
        help="also write model.ts (TorchScript, deprecated; for LibTorch C++)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    common(p, recipe=False)

    p = command(
        "evaluate",
        help="kNN and linear-probe top-1 → OUT/eval.json",
        description="kNN and linear-probe top-1 of a checkpoint or an exported "
        "model (model.pt2, or an export folder) → OUT/eval.json.",
    )
    p.add_argument(
        "model",
        type=Path,
        help="MoCoV2/MCP checkpoint (read with weights_only=True), exported model.pt2 "
        "(torch.export, checked, nothing in it is run), or an export folder (its "
        "model.pt2); model.ts (TorchScript) and model.pt only with --trust-pickle",
    )
    p.add_argument("recipe", type=Path, help="YAML recipe (data and eval sections)")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow MODEL to be a whole pickled nn.Module (export's model.pt) or "
        "TorchScript (model.ts): loading them RUNS CODE FROM THE FILE, use only for "
        "files you trust",
    )
    common(p)

    p = command(
        "run",
        help="pretrain → prune → export → evaluate",
        description="All stages in order, skipping complete ones "
        "(an interrupted run continues) → OUT/report.json.",
    )
    p.add_argument("recipe", type=Path, help="YAML recipe")
    p.add_argument("--restart", action="store_true", help=RESTART_HELP)
    common(p)
    preflight_options(p)

    p = command(
        "inspect",
        help="the recipe settings a dense checkpoint needs",
        description="Print the recipe sections (backbone, pretrain) that a dense "
        "MoCo checkpoint's tensors need, read from their shapes (e.g. a checkpoint "
        "of lightly's examples/pytorch_lightning/moco.py), for prune --from CKPT.",
    )
    p.add_argument("checkpoint", type=Path, help="dense MoCo checkpoint")

    command("smoke", help="quick check of the building blocks (no data)")
    return parser


def _recipe(args: argparse.Namespace) -> Any:
    from lightly_mcp.app.recipe import load_recipe, read_recipe_file
    from lightly_mcp.errors import RecipeError

    recipe = load_recipe(args.recipe, args.set)
    if not read_recipe_file(args.recipe):
        raise RecipeError(
            f"recipe '{args.recipe}' is empty (every key would take its default); "
            "start from a recipe in recipes/, e.g. recipes/quickstart.yaml."
        )
    if args.device is not None:
        recipe.trainer.accelerator = args.device
    if args.devices is not None:
        recipe.trainer.devices = (
            int(args.devices) if args.devices.isdigit() else args.devices
        )
    _check_devices(recipe, args)
    return recipe


_DEVICE_LIST = re.compile(r"\d+(,\d+)*,?")


def _check_devices(recipe: Any, args: argparse.Namespace) -> None:
    """Refuses accelerator and devices values Lightning would reject with a
    traceback: an unknown devices value, or CUDA where torch sees no GPU.
    """
    import torch

    from lightly_mcp.errors import RecipeError

    t = recipe.trainer
    source = "--devices" if args.devices is not None else "trainer.devices"
    devices = t.devices
    if isinstance(devices, bool) or not (
        (isinstance(devices, int) and (devices >= 1 or devices == -1))
        or (
            isinstance(devices, str)
            and (devices.strip() in ("auto", "-1") or _DEVICE_LIST.fullmatch(devices))
        )
    ):
        raise RecipeError(
            f"{source} must be a number of devices (e.g. 2), -1 (all), auto or "
            f"device indices such as 0,1; got {devices!r}."
        )
    if t.accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        source = "--accelerator" if args.device is not None else "trainer.accelerator"
        raise RecipeError(
            f"{source} is '{t.accelerator}' but torch sees no CUDA GPU "
            "(torch.cuda.is_available() is False); use --accelerator cpu or auto."
        )
    if t.accelerator not in ("auto", "cpu", "cuda", "gpu"):
        from pytorch_lightning.accelerators import AcceleratorRegistry

        try:
            available = AcceleratorRegistry[t.accelerator]["accelerator"].is_available()
        except Exception:  # noqa: BLE001 (a registry entry that cannot say: refuse)
            available = False
        if not available:
            source = (
                "--accelerator" if args.device is not None else "trainer.accelerator"
            )
            raise RecipeError(
                f"{source} is '{t.accelerator}' but no such device is available "
                "here; use --accelerator cpu, cuda or auto."
            )


def _eval_device(recipe: Any) -> str:
    import torch

    accelerator = recipe.trainer.accelerator
    if accelerator in ("cuda", "gpu") or (
        accelerator == "auto" and torch.cuda.is_available()
    ):
        return "cuda"
    return "cpu"


def _dispatch(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lightly_mcp.app import pipeline

    console = Console()
    progress = not args.quiet if hasattr(args, "quiet") else True
    if args.command == "inspect":
        from lightly_mcp.methods.checkpoints import inspect_checkpoint

        print(inspect_checkpoint(args.checkpoint))
        return 0
    if args.command == "smoke":
        from lightly_mcp.app.smoke import smoke

        smoke()
        return 0
    from lightly_mcp.app.run_folder import check_output_path

    if args.command == "export":
        from lightly_mcp.formats.export import export

        check_output_path(args.out)
        export(
            args.checkpoint,
            args.out,
            round_to=args.round_to,
            latency=not args.no_latency,
            latency_at_224=args.latency_at_224,
            torchscript=args.torchscript,
            console=Console(quiet=True) if args.quiet else console,
            overwrite=args.overwrite,
        )
        console.print(f"exported to {args.out}")
        return 0
    recipe = _recipe(args)
    if args.print_recipe:
        from lightly_mcp.app.recipe import recipe_yaml

        print(recipe_yaml(recipe), end="")
        return 0
    out: Path = args.out
    check_output_path(out)
    if args.command in ("pretrain", "prune", "run"):
        return _train(args, recipe, out, progress, console)
    if args.command == "evaluate":
        from lightly_mcp.app import manifest

        networks = pipeline.load_backbone_for_eval(
            args.model, recipe, trust_pickle=args.trust_pickle
        )
        manifest.claim(out, ["eval.json"])
        provenance = pipeline.evaluation_provenance(
            recipe, dict.fromkeys(networks, Path(args.model))
        )
        results = pipeline.evaluate(
            networks,
            recipe,
            out / "eval.json",
            _eval_device(recipe),
            progress,
            provenance=provenance,
        )
        manifest.record(out, ["eval.json"])
        evaluations = {"": results, **results.get("transfer", {})}
        for on, part in evaluations.items():
            for name, r in part.get("models", {}).items():
                console.print(
                    f"{on + ': ' if on else ''}{name}: kNN top-1 "
                    f"{r['knn_top1']:.4f}, linear top-1 {r['linear_top1']:.4f}"
                )
    return 0


def _preflight(args: argparse.Namespace, recipe: Any, out: Path, console: Any) -> None:
    from lightly_mcp.app.preflight import for_command

    dense = getattr(args, "dense", None) or recipe.pretrain.dense_checkpoint
    for_command(
        args.command,
        recipe,
        out,
        Path(dense) if dense else None,
        _eval_device(recipe),
        console,
        always=args.dry_run,
    )


def _train(
    args: argparse.Namespace, recipe: Any, out: Path, progress: bool, console: Any
) -> int:
    """``pretrain``, ``prune`` and ``run``: one process per output folder.

    The folder is locked for the whole command (a dry run, which writes nothing,
    does not lock); ``--restart`` clears what earlier runs wrote there, otherwise
    outputs made with another recipe are refused, both before the preflight. Under a
    multi-process launch the ranks other than 0 skip the preflight, only train, and
    return when their last training stage ends.
    """
    from lightly_mcp.app import pipeline
    from lightly_mcp.app.manifest import refuse_foreign
    from lightly_mcp.app.run_folder import (
        STAGE_FILES,
        check_no_links,
        check_recipe,
        clear_outputs,
        is_rank_zero,
        output_lock,
        stages_of,
    )
    from lightly_mcp.formats.report import print_run_summary
    from lightly_mcp.methods.checkpoints import checkpoint_file

    if args.dry_run:
        _preflight(args, recipe, out, console)
        console.print("dry run: nothing was trained or written")
        return 0

    dense = None
    if args.command == "prune":
        dense = args.dense or recipe.pretrain.dense_checkpoint
        # Recorded in prune/recipe.yaml, so a resume from another file is refused.
        recipe.pretrain.dense_checkpoint = str(dense) if dense else None
    elif args.command == "run":
        dense = recipe.pretrain.dense_checkpoint
    if dense:  # a missing file or a folder is refused before OUT is created
        checkpoint_file(dense, "dense checkpoint")
    first_stage = "prune" if args.command == "prune" else "pretrain"
    stages: tuple[str, ...] = (first_stage,)
    if args.command == "run":
        stages = stages_of(recipe)
    with output_lock(out):
        if is_rank_zero():
            _check_recipe_not_an_output(args.recipe, out, stages)
        if args.restart:
            clear_outputs(out, first_stage)
        check_recipe(recipe, out, stages)
        if is_rank_zero():
            check_no_links(out, stages)
            if args.command == "run":  # before the preflight, writing nothing
                refuse_foreign(out, STAGE_FILES["evaluate"])
        if not args.no_preflight and is_rank_zero():
            _preflight(args, recipe, out, console)
        if args.command == "pretrain":
            path = pipeline.pretrain(recipe, out, progress)
            if is_rank_zero():
                console.print(f"dense checkpoint: {path}")
        elif args.command == "prune":
            path = pipeline.prune(recipe, Path(dense) if dense else None, out, progress)
            if is_rank_zero():
                console.print(f"MCP checkpoint: {path}")
        else:
            report = _run(args, recipe, out, progress, console)
            if is_rank_zero():
                print_run_summary(report, console)
    return 0


def _check_recipe_not_an_output(
    recipe_file: Path, out: Path, stages: Sequence[str]
) -> None:
    """Refuses a recipe file that is one the command would write (or delete with
    ``--restart``) in ``out`` and that no run wrote there: the user's own file,
    e.g. ``run DIR/recipe.yaml --out DIR``.
    """
    from lightly_mcp.app import manifest
    from lightly_mcp.app.run_folder import STAGE_FILES
    from lightly_mcp.errors import OutputFolderError

    target = os.path.realpath(recipe_file)
    files: dict[str, str | None] | None = None
    for stage in stages:
        for relative in STAGE_FILES[stage]:
            if os.path.realpath(out / relative) != target:
                continue
            files = manifest.read_manifest(out) if files is None else files
            if not manifest.is_ours(out, relative, files):
                raise OutputFolderError(
                    f"the recipe '{recipe_file}' is the file in which this run "
                    "records its recipe; copy it elsewhere or choose another --out "
                    "folder."
                )


def _run(
    args: argparse.Namespace, recipe: Any, out: Path, progress: bool, console: Any
) -> Any:
    """``pipeline.run``; a failure after a finished stage says what is kept and
    names the command that continues (``lightly_mcp.app.continuation``).
    """
    from lightly_mcp.app import pipeline
    from lightly_mcp.app.continuation import (
        export_options,
        late_stage_failure,
        rerun_argv,
    )

    try:
        return pipeline.run(recipe, out, progress, console, _eval_device(recipe))
    except (_stage_interrupted(), KeyboardInterrupt):
        raise
    except Exception as error:
        e = recipe.export
        late = late_stage_failure(
            error,
            out,
            rerun_argv(args),
            args.recipe,
            export_options(e.round_to, e.latency, e.latency_at_224, e.torchscript),
        )
        if late is None:
            raise
        raise late from error


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What the command line reports as bad input (exit 2): lightly-mcp's
    ``InputError`` family, a missing file, and Lightning's bad-Trainer-settings error
    (e.g. an unknown strategy). Anything else is a bug (exit 1, "unexpected").
    """
    from lightly_mcp.errors import InputError

    errors: list[type[BaseException]] = [InputError, FileNotFoundError]
    try:
        from lightning_fabric.utilities.exceptions import MisconfigurationException

        errors.append(MisconfigurationException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _stage_interrupted() -> type[BaseException]:
    from lightly_mcp.errors import StageInterrupted

    return StageInterrupted


@contextmanager
def _progress_log(show: bool) -> Iterator[None]:
    """Shows lightly-mcp's own progress lines (the ``lightly_mcp`` logger at level
    INFO, e.g. which backbone is being traced) on stdout inside the block.
    """
    if not show:
        yield
        return
    from rich.console import Console

    console = Console()

    class ConsoleHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            console.print(self.format(record), markup=False, highlight=False)

    logger = logging.getLogger("lightly_mcp")
    handler = ConsoleHandler(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _is_sigterm_exit(error: SystemExit) -> bool:
    """Whether Lightning raised ``error`` for a SIGTERM (in a ``Trainer.fit`` that
    ``lightly_mcp.app.pipeline`` does not wrap, e.g. the preflight's); Lightning turns
    Ctrl-C into ``sys.exit(1)`` after its own cleanup, with the ``KeyboardInterrupt``
    as context.
    """
    lightning = sys.modules.get("pytorch_lightning.utilities.exceptions")
    return lightning is not None and isinstance(error, lightning.SIGTERMException)


def quiet_third_party_warnings() -> None:
    """Silences library warnings and Lightning's info logs; MCP's own warnings stay."""
    from lightly_mcp.errors import MCPWarning

    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", category=MCPWarning)
    # Lightning sets its loggers to INFO when imported: import it first, so that its
    # info lines ("GPU available", tips) stay hidden.
    import lightning_fabric  # noqa: F401
    import pytorch_lightning  # noqa: F401

    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightly-mcp`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if (
        hasattr(args, "out")
        and args.out is None
        and not getattr(args, "print_recipe", False)
    ):
        args.command_parser.error("the following arguments are required: --out")
    if not args.debug:
        quiet_third_party_warnings()
    from lightly_mcp.app.interrupts import (
        SIGINT_EXIT,
        SIGTERM_EXIT,
        interrupted_message,
        sigterm_raises,
    )
    from lightly_mcp.errors import Terminated, first_line

    training = args.command in ("pretrain", "prune", "run")
    out = getattr(args, "out", None) if training else None
    try:
        with sigterm_raises(), _progress_log(not getattr(args, "quiet", False)):
            return _dispatch(args)
    except _stage_interrupted() as error:
        print(f"lightly-mcp: {error}", file=sys.stderr)
        return int(getattr(error, "exit_code", SIGTERM_EXIT))
    except (KeyboardInterrupt, Terminated, SystemExit) as error:
        ctrl_c = isinstance(error, KeyboardInterrupt) or (
            isinstance(error, SystemExit)
            and isinstance(error.__context__, KeyboardInterrupt)
        )
        if isinstance(error, SystemExit) and not ctrl_c:
            if not _is_sigterm_exit(error):
                raise
        name = "Ctrl-C" if ctrl_c else "SIGTERM"
        print(f"lightly-mcp: {interrupted_message(name, out)}", file=sys.stderr)
        return SIGINT_EXIT if ctrl_c else SIGTERM_EXIT
    except Exception as error:  # noqa: BLE001 (one clear line, --debug for more)
        if args.debug:
            raise
        message = first_line(error)
        from lightly_mcp.errors import LateStageError

        cause = error.__cause__ if isinstance(error, LateStageError) else error
        if isinstance(cause, OSError) and cause.errno == errno.ENAMETOOLONG:
            from lightly_mcp.io.model_files import shown_path

            name = shown_path(cause.filename or "")
            print(
                f"lightly-mcp: error: the path '{name}' is too long for the file "
                "system (a name over 255 bytes?); use a shorter name.",
                file=sys.stderr,
            )
            return EXIT_USAGE
        if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
            from lightly_mcp.io.files import disk_error

            where = cause.filename or getattr(args, "out", None) or "."
            mapped = disk_error(cause, where)
            if mapped is not None:
                print(f"lightly-mcp: error: {mapped}", file=sys.stderr)
                return EXIT_USAGE
        if isinstance(cause, _expected_errors()):
            print(f"lightly-mcp: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        print(
            f"lightly-mcp: unexpected {type(cause).__name__}: {message} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
