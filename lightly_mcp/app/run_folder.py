"""The output folder of a run: one process at a time, one recipe per folder.

- :func:`output_lock` takes an exclusive ``fcntl.flock`` on ``OUT/.lock`` (which holds
  the owner's pid). A second ``lightly-mcp`` process writing into the same folder is
  refused with a message naming the folder and that pid. The kernel releases the lock
  when its process exits, however it exits (SIGKILL, OOM killer, crash), so a stale
  ``.lock`` file never blocks a later run.
- :func:`check_recipe` compares the recipe with the one each finished or started
  stage of the folder recorded (``pretrain/recipe.yaml``, ``prune/recipe.yaml``,
  ``recipe.yaml``), on the settings that change that stage's results, and refuses a
  mismatch with the differing keys. :func:`clear_outputs` (``--restart``) deletes
  what earlier runs wrote there, and nothing else.
- Under a multi-process launch (Lightning's DDP launcher, torchrun, SLURM) only the
  process of global rank 0 locks, checks, clears and writes:
  :func:`~lightly_mcp.app.ranks.launch_rank` reads the rank from the launcher's
  environment variables, which exist before Lightning starts its process group.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightly_mcp.app.ranks import is_rank_zero, launch_rank  # noqa: F401 - re-exported
from lightly_mcp.errors import MAX_MESSAGE, OutputFolderError, RecipeError, clipped
from lightly_mcp.io.safe_yaml import load_yaml

LOCK = ".lock"

STAGES: tuple[str, ...] = ("pretrain", "prune", "export", "evaluate")
"""The stages of a run, in order; each one's results depend on the ones before."""

TRAINING_STAGES: tuple[str, ...] = ("pretrain", "prune")
"""The stages that train (a Lightning fit with checkpoints, resumable)."""

FINAL, LAST, DONE = "final.ckpt", "last.ckpt", "done.json"
"""A training stage's finished checkpoint, its resumable checkpoint, and the record
that says the stage is complete."""

EXPORT_REPORT, EVAL_FILE = "export/report.json", "eval/eval.json"
"""The records of the export and evaluate stages (relative to the run folder)."""


def stages_of(recipe: Any) -> tuple[str, ...]:
    """The stages ``lightly-mcp run`` runs for ``recipe``: all of them, or from
    ``prune`` when the recipe starts from a dense checkpoint.
    """
    return STAGES[1:] if recipe.pretrain.dense_checkpoint is not None else STAGES


def final_checkpoint(out: Path, stage: str) -> Path:
    """``out/<stage>/final.ckpt`` of a training stage."""
    return Path(out) / stage / FINAL


def completion_record(out: Path, stage: str) -> Path:
    """The file whose presence says ``stage`` is complete: ``done.json`` of a
    training stage, the export's ``report.json``, the evaluation's ``eval.json``.
    """
    if stage in TRAINING_STAGES:
        return Path(out) / stage / DONE
    return Path(out) / (EXPORT_REPORT if stage == "export" else EVAL_FILE)


def kept_output(out: Path, stage: str) -> Path:
    """What a complete ``stage`` keeps for the next one: the final checkpoint, the
    export folder, the evaluation record.
    """
    if stage in TRAINING_STAGES:
        return final_checkpoint(out, stage)
    return Path(out) / "export" if stage == "export" else Path(out) / EVAL_FILE


STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "pretrain": ("seed", "data", "backbone", "pretrain", "trainer"),
    "prune": ("mcp",),
    "export": ("export",),
    "evaluate": ("eval",),
}
"""The recipe sections a stage adds to those of the stages before it."""

IGNORED_KEYS: frozenset[str] = frozenset(
    {
        # Where and how to run, not what is computed. A resume on another number of
        # devices is supported (the interrupted epoch restarts, with a warning).
        "trainer.accelerator",
        "trainer.devices",
        "trainer.strategy",
        "trainer.log_every_n_steps",
        "trainer.channels_last",  # the memory layout: equal up to float rounding
        "data.num_workers",
        "data.download",
        # Which extra checkpoints are kept, and how often latency is timed.
        "pretrain.keep_every_n_epochs",
        "export.latency_repeats",
    }
)
"""Recipe keys never compared: they do not change a run's results."""

PATH_KEYS: frozenset[str] = frozenset({"data.root", "pretrain.dense_checkpoint"})
"""Keys compared as paths (after resolving links and ``~``)."""

# Files a stage writes, relative to the output folder (exact names, no patterns).
_TRAINING_FILES = (
    FINAL,
    LAST,
    DONE,
    "recipe.yaml",
    "logs/metrics.csv",
    "logs/hparams.yaml",
    "tensorboard/hparams.yaml",
)
STAGE_FILES: dict[str, tuple[str, ...]] = {
    "pretrain": tuple(f"pretrain/{name}" for name in _TRAINING_FILES),
    "prune": tuple(f"prune/{name}" for name in _TRAINING_FILES),
    "export": (
        "export/model.pt2",
        "export/model.pt",
        "export/model.ts",
        "export/model.onnx",
        EXPORT_REPORT,
    ),
    "evaluate": (
        EVAL_FILE,
        "report.json",
        "recipe.yaml",
        "plots/losses.png",
        "plots/transition.png",
        "plots/kept_channels.png",
    ),
}
"""The files each stage writes under these names (it also writes files named at
run time: TensorBoard events, epoch checkpoints, which the manifest lists)."""

STAGE_FOLDERS: dict[str, tuple[str, ...]] = {
    "pretrain": (
        "pretrain/logs",
        "pretrain/tensorboard",
        "pretrain/epochs",
        "pretrain",
    ),
    "prune": ("prune/logs", "prune/tensorboard", "prune/epochs", "prune"),
    "export": ("export",),
    "evaluate": ("eval", "plots"),
}
"""The folders each stage writes into (deepest first)."""


# --- the folder itself -------------------------------------------------------------
def check_output_path(out: Path) -> None:
    """Refuses an ``--out`` that is a file, lies under a file, or cannot be written.

    Creates nothing.
    """
    out = Path(out)
    longest = max((len(os.fsencode(part)) for part in out.parts), default=0)
    if longest > 255 or len(os.fsencode(str(out.absolute()))) > 4095:
        raise OutputFolderError(
            f"--out '{str(out)[:60]}...' is too long for the file system (a name "
            "is at most 255 bytes, a path 4095); choose a shorter folder name."
        )
    existing = out
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        kind = "file" if existing.is_file() else "dangling link or special file"
        what = (
            f"is a {kind}" if existing == out else f"lies under the {kind} '{existing}'"
        )
        raise OutputFolderError(
            f"--out '{out}' {what}; give a folder (it is created if missing)."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(
            f"cannot write to --out '{out}': '{existing}' is not writable "
            "(permissions, read-only or immutable); choose a folder you can write to."
        )


def _lock_holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Holds an exclusive lock on the folder ``out`` (created if missing).

    Only the launcher's rank 0 locks (the other ranks of a multi-process run are
    started by it and write nothing). The lock is ``fcntl.flock`` on ``out/.lock``:
    it is released when the block ends and, by the kernel, when the process dies.
    When the block fails and left nothing in a folder it created, the folder is
    removed again.

    Raises:
        OutputFolderError: If another process holds it, or the folder is not
            writable.
    """
    if not is_rank_zero():
        yield
        return
    out = Path(out)
    path = out / LOCK
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OutputFolderError(
                f"'{path}' is a symbolic link; lightly-mcp never writes through "
                "links: delete it or use another --out folder."
            ) from None
        raise OutputFolderError(
            f"cannot write to output folder '{out}' ({error.strerror or error}); "
            "choose a folder you can write to."
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise OutputFolderError(
                f"output folder '{out}' is in use by another lightly-mcp process "
                f"(pid {_lock_holder(path)}); wait for it to finish or use another "
                "--out folder."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        except BaseException:
            if created and [entry.name for entry in out.iterdir()] == [LOCK]:
                path.unlink(missing_ok=True)  # still locked: nobody else has it
                out.rmdir()
            raise
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --- one recipe per folder -----------------------------------------------------------
def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
    else:
        flat[prefix.rstrip(".")] = data
    return flat


def _same(key: str, recorded: Any, current: Any) -> bool:
    if key in PATH_KEYS and isinstance(recorded, str) and isinstance(current, str):
        return os.path.realpath(os.path.expanduser(recorded)) == os.path.realpath(
            os.path.expanduser(current)
        )
    return bool(recorded == current)


def stage_keys(stage: str, flat: dict[str, Any]) -> list[str]:
    """The keys of ``flat`` that ``stage``'s results depend on."""
    sections: list[str] = []
    for name in STAGES[: STAGES.index(stage) + 1]:
        sections.extend(STAGE_SECTIONS[name])
    return [
        key for key in flat if key.split(".")[0] in sections and key not in IGNORED_KEYS
    ]


def _stage_record(out: Path, stage: str) -> tuple[Path, str | None]:
    """The recipe a stage's outputs were made with, and the first of its outputs
    found (relative to ``out``; None when it has none).
    """
    if stage in TRAINING_STAGES:
        found = [
            f"{stage}/{name}"
            for name in (LAST, FINAL, DONE)
            if (out / stage / name).is_file()
        ]
        return out / stage / "recipe.yaml", found[0] if found else None
    report = EXPORT_REPORT if stage == "export" else EVAL_FILE
    return out / "recipe.yaml", report if (out / report).is_file() else None


def recipe_differences(
    recipe: Any, recorded_raw: dict[str, Any], stage: str
) -> list[tuple[str, Any, Any]]:
    """``(key, recorded, current)`` of every result-changing key that differs from
    the recorded recipe (its YAML document).
    """
    from lightly_mcp.app.recipe import Recipe

    current = _flatten(recipe.to_dict())
    defaults = _flatten(Recipe().to_dict())
    recorded = _flatten(recorded_raw)
    differences = []
    for key in stage_keys(stage, current):
        old = recorded.get(key, defaults.get(key))
        if not _same(key, old, current[key]):
            differences.append((key, old, current[key]))
    return differences


def check_recipe(recipe: Any, out: Path, stages: Sequence[str]) -> None:
    """Refuses to continue in ``out`` with a recipe other than the one its outputs
    were made with.

    For every stage in ``stages`` that has outputs in ``out`` (a ``done.json``,
    ``last.ckpt`` or ``final.ckpt``; export's and evaluation's reports), the recipe
    that stage recorded is compared with ``recipe`` on the keys that change the
    stage's results: its own section and those of the stages before it, less
    ``IGNORED_KEYS``. Only rank 0 checks.

    Raises:
        OutputFolderError: Naming the differing keys, the recorded and the new
            values, and the two ways out (a new ``--out`` folder, ``--restart``).
    """
    if not is_rank_zero():
        return
    out = Path(out)
    for stage in stages:
        record, found = _stage_record(out, stage)
        if found is None:
            continue
        relative = record.relative_to(out)
        if not record.is_file() or record.is_symlink():
            what = (
                "is a symbolic link"
                if record.is_symlink()
                else "is a folder"
                if record.is_dir()
                else "is not a regular file"
                if os.path.lexists(record)
                else "is missing"
            )
            raise OutputFolderError(
                f"'{out}' holds {found} but its recorded recipe {relative} {what}; "
                "pass --restart or use a new --out folder."
            )
        recorded = _read_record(record)
        if not isinstance(recorded, dict):
            raise OutputFolderError(
                f"'{out}' holds {found} but its recorded recipe {relative} cannot "
                "be read; pass --restart or use a new --out folder."
            )
        differences = recipe_differences(recipe, recorded, stage)
        if not differences:
            continue
        head = f"'{out}' holds a {stage} stage of another recipe ({relative}): "
        tail = "; use a new --out or pass --restart."
        shown: list[str] = []
        for key, old, new in differences:
            item = f"{key} {_shown(old)} there, {_shown(new)} now"
            rest = len(differences) - len(shown) - 1
            more = f" and {rest} more" if rest else ""
            if shown and len(head + ", ".join([*shown, item]) + more + tail) > (
                MAX_MESSAGE
            ):
                break
            shown.append(item)
        rest = len(differences) - len(shown)
        more = f" and {rest} more" if rest else ""
        raise OutputFolderError(f"{head}{', '.join(shown)}{more}{tail}")


def _read_record(record: Path) -> Any:
    """A recorded recipe's YAML document; None when it cannot be read."""
    try:
        return load_yaml(record.read_bytes(), str(record))
    except (OSError, RecipeError):
        return None


def _shown(value: Any) -> str:
    """``repr(value)``, cut to 40 characters (a message stays one short line)."""
    return clipped(repr(value), 40)


def clear_outputs(out: Path, first_stage: str) -> list[Path]:
    """Deletes what runs wrote in ``out`` for ``first_stage`` and every later stage.

    Only files the folder's manifest lists (``lightly_mcp.app.manifest``) are deleted,
    and a listed record the user has since changed is kept; in a folder without a
    manifest (an older lightly-mcp's), the files of ``STAGE_FILES`` under the stage
    folders. Then the project's own stale temporary folders and the stage folders
    left empty. Anything else in ``out`` stays. Only rank 0 deletes.

    Returns:
        The deleted paths.
    """
    from lightly_mcp.app import manifest

    if not is_rank_zero():
        return []
    out = Path(out)
    stages = STAGES[STAGES.index(first_stage) :]
    files = manifest.read_manifest(out)
    has_manifest = os.path.lexists(out / manifest.MANIFEST)
    deleted: list[Path] = []
    for stage in stages:
        if has_manifest:
            prefixes = tuple(f"{folder}/" for folder in STAGE_FOLDERS[stage])
            names = set(STAGE_FILES[stage])
            listed = sorted(
                rel for rel in files if rel in names or rel.startswith(prefixes)
            )
            for relative in listed:
                path = out / relative
                if os.path.lexists(path) and manifest.is_ours(out, relative, files):
                    if path.is_dir() and not path.is_symlink():
                        continue  # never a folder: only the files runs wrote
                    path.unlink()
                    deleted.append(path)
            manifest.forget(out, listed)
        else:
            for relative in STAGE_FILES[stage]:
                path = out / relative
                if "/" not in relative:
                    continue  # OUT/recipe.yaml, OUT/report.json: maybe the user's
                if path.is_file() or path.is_symlink():
                    path.unlink()
                    deleted.append(path)
    for stale in stale_export_folders(out):
        shutil.rmtree(stale, ignore_errors=True)
        deleted.append(stale)
    for stage in stages:
        for folder in STAGE_FOLDERS[stage]:
            try:
                (out / folder).rmdir()  # only when empty
            except OSError:
                pass
    return deleted


def stale_export_folders(parent: Path) -> list[Path]:
    """The temporary folders of exports into ``parent`` that died (SIGKILL):
    those holding the export's marker file, not locked by a live export.
    """
    from lightly_mcp.formats.export import stale_temporary_folders

    return stale_temporary_folders(Path(parent))


def check_no_links(out: Path, stages: Sequence[str]) -> None:
    """Refuses symbolic links where ``stages`` write in ``out`` (their folders and
    files): lightly-mcp never writes through a link. Only rank 0 checks.

    Raises:
        OutputFolderError: Naming the first link.
    """
    if not is_rank_zero():
        return
    out = Path(out)
    paths = [out / "recipe.yaml", out / "report.json"]
    for stage in stages:
        paths += [out / folder for folder in STAGE_FOLDERS[stage]]
        paths += [out / name for name in STAGE_FILES[stage]]
    for path in paths:
        if path.is_symlink():
            raise OutputFolderError(
                f"'{path}' is a symbolic link; lightly-mcp never writes through "
                "links: delete it (or move it out) or use another --out folder."
            )
