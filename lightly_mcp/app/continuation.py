"""When a stage of ``lightly-mcp run`` fails after others finished: what is kept, and
the command that continues from it.

Every stage writes its output once it is complete (``done.json``, the export's
``report.json``, ``eval/eval.json``) and ``run`` skips complete stages, so a failure
in a late stage loses nothing that finished. :func:`late_stage_failure` turns the
error into a one-line message that says so and names the commands that continue:
the same ``run`` again (after fixing the cause), or the failed stage by hand from the
kept file, e.g. ``lightly-mcp export OUT/prune/final.ckpt --out OUT/export``.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from pathlib import Path

from lightly_mcp.app.run_folder import STAGES, completion_record, kept_output
from lightly_mcp.errors import (
    CheckpointError,
    LateStageError,
    OutputFolderError,
    first_line,
)


def finished_stages(out: Path) -> dict[str, Path]:
    """The complete stages of a run folder and the file each one kept."""
    return {
        stage: kept_output(out, stage)
        for stage in STAGES
        if completion_record(out, stage).is_file() and kept_output(out, stage).exists()
    }


def continue_commands(
    out: Path, rerun: Sequence[str], recipe: Path, export_options: Sequence[str] = ()
) -> list[str]:
    """The commands that continue a failed run from what ``out`` holds.

    Args:
        out: The run folder.
        rerun: The ``run`` command line that failed (without the program name).
        recipe: Its recipe file (for ``evaluate``).
        export_options: ``lightly-mcp export`` options that match the recipe
            (:func:`export_options`).

    Returns:
        The same run again (finished stages are skipped), then the next stage by
        hand; empty when no stage finished.
    """
    done = finished_stages(out)
    if not done:
        return []
    again = shlex.join(["lightly-mcp", *rerun])
    commands = [f"`{again}` (finished stages are skipped)"]
    if "prune" in done and "export" not in done:
        export = ["export", str(done["prune"]), "--out", str(out / "export")]
        commands.append(f"`{shlex.join(['lightly-mcp', *export, *export_options])}`")
    elif "export" in done and "evaluate" not in done:
        # Not OUT/eval: the run's own evaluation (dense, subnet, compact) goes there.
        evaluated = shlex.quote(str(out / "eval-compact"))
        commands.append(
            f"`lightly-mcp evaluate {shlex.quote(str(done['export']))} "
            f"{shlex.quote(str(recipe))} --out {evaluated}`"
        )
    elif "pretrain" in done and "prune" not in done:
        commands.append(
            f"`lightly-mcp prune {shlex.quote(str(recipe))} --from "
            f"{shlex.quote(str(done['pretrain']))} --out {shlex.quote(str(out))}`"
        )
    return commands


def export_options(
    round_to: int | None,
    latency: bool,
    latency_at_224: bool = False,
    torchscript: bool = False,
) -> list[str]:
    """The ``lightly-mcp export`` options of a recipe's export section."""
    options = [] if round_to is None else ["--round-to", str(round_to)]
    if torchscript:
        options.append("--torchscript")
    if not latency:
        return [*options, "--no-latency"]
    return options + (["--latency-at-224"] if latency_at_224 else [])


def late_stage_failure(
    error: BaseException,
    out: Path,
    rerun: Sequence[str],
    recipe: Path,
    export_options: Sequence[str] = (),
) -> LateStageError | None:
    """The error of a failed run with what is kept and how to continue; None when
    no stage finished or a file in the output folder or a checkpoint is refused
    (the error alone says everything, in one short line).
    """
    if isinstance(error, (OutputFolderError, CheckpointError)):
        return None  # a file in the way: its message says what to do with it
    done = finished_stages(out)
    commands = continue_commands(out, rerun, recipe, export_options)
    if not commands:
        return None
    kept = ", ".join(f"{stage} ({path})" for stage, path in done.items())
    message = first_line(error) or type(error).__name__
    return LateStageError(
        f"{message.rstrip('.')}. Kept what finished: {kept}. After fixing the cause, "
        f"continue with {' or '.join(commands)}."
    )


def rerun_argv(args: argparse.Namespace) -> list[str]:
    """The ``run`` command line of parsed ``lightly-mcp run`` arguments."""
    argv = ["run", str(args.recipe), "--out", str(args.out)]
    for override in getattr(args, "set", None) or []:
        argv += ["--set", override]
    for option in ("device", "devices"):
        value = getattr(args, option, None)
        if value is not None:
            argv += [f"--{option}", str(value)]
    return argv
