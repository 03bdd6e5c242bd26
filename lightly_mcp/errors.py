"""Every error and warning lightly-mcp raises on purpose, and how they are shown.

The hierarchy:

- ``MCPError``: the base of every error this package raises on purpose.

  - ``InputError`` (also a ``ValueError``): the user's input cannot be used (a recipe
    value, a file, a folder, a backbone, an argument). The message is one line that
    names the problem and the fix. The command line prints it and exits 2.

    - ``RecipeError``, ``DatasetError``, ``CheckpointError``
      (``UnsafeCheckpointError``, ``CodeFileError``),
      ``ProvenanceError``, ``OutputFolderError``, ``ExportError``, ``PreflightError``,
      ``UnsupportedBackboneError`` (``NoPrunableGroupsError``),
      ``TrainingDivergedError``.

  - ``LateStageError``: a stage failed after earlier stages finished; the message says
    what is kept and how to continue, the original error is its ``__cause__``.
  - ``StageInterrupted``: a training stage was stopped by SIGTERM or Ctrl-C; the
    message says what is kept, ``exit_code`` is the command's exit status.

- ``Terminated`` (a ``BaseException``, like ``KeyboardInterrupt``): a SIGTERM outside
  a training loop (``lightly_mcp.app.interrupts``).

- ``MCPWarning``: a warning about the method itself; the command line keeps these
  when it silences third-party warnings.

Any other exception reaching the command line is a bug: it exits 1 and says
"unexpected".

Examples:
    >>> from lightly_mcp.errors import InputError, RecipeError
    >>> issubclass(RecipeError, InputError) and issubclass(RecipeError, ValueError)
    True
"""

from __future__ import annotations

import yaml


class MCPError(Exception):
    """The base of every error lightly-mcp raises on purpose."""


class InputError(MCPError, ValueError):
    """Input that cannot be used; the message names the problem and the fix."""


class RecipeError(InputError):
    """A recipe that cannot be used; the message names the key and the fix."""


class DatasetError(InputError):
    """A dataset cannot be built: missing or corrupt files, or a bad argument."""


class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message says why and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A file that ``torch.load(weights_only=True)`` refuses: truncated, corrupt, or
    holding pickled Python objects (e.g. a whole pickled ``nn.Module``).
    """


class CodeFileError(UnsafeCheckpointError):
    """A model file that is code (pickled Python objects, TorchScript), refused
    unless the user trusts it (``--trust-pickle``).
    """


class ProvenanceError(InputError):
    """A shipped checkpoint that does not match its provenance record."""


class OutputFolderError(InputError):
    """An output folder that cannot be used: in use by another process, not
    writable, or holding results of another recipe. The message says what to do.
    """


class ExportError(InputError):
    """An export that cannot be done or did not verify; the message says why."""


class PreflightError(InputError):
    """A stage of the recipe would fail; the message is the stage's own."""


class UnsupportedBackboneError(InputError):
    """Raised when MCP cannot prune a backbone's channels exactly.

    The message is one line naming the construct and the module, and backbones that
    work. Raised when the groups are traced, i.e. before any training.
    """


class NoPrunableGroupsError(UnsupportedBackboneError):
    """Raised when a backbone has no channel group that MCP can prune."""


class TrainingDivergedError(InputError):
    """The loss became NaN or infinite; the message names the likely cause (a
    setting of the recipe, such as the learning rate).
    """


class LateStageError(MCPError):
    """A stage of a run failed after earlier stages finished; the message says what
    is kept and how to continue. The original error is ``__cause__``.
    """


class StageInterrupted(MCPError, RuntimeError):
    """A training stage was stopped by SIGTERM (exit status 143) or Ctrl-C (130); the
    message says what is kept and how to continue.
    """

    def __init__(self, message: str, exit_code: int = 143) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(BaseException):
    """A SIGTERM outside a training loop, raised where it lands (as Ctrl-C raises
    ``KeyboardInterrupt``) so that cleanup code runs; see
    ``lightly_mcp.app.interrupts``.
    """


class CompactKeysError(MCPError, RuntimeError):
    """The momentum subnet's compact copy could not be built or does not reproduce
    the masked forward; the subnet falls back to its masked forward.
    """


class UnsafeYAMLError(yaml.MarkedYAMLError):
    """Well-formed YAML that ``safe_yaml.BoundedSafeLoader`` refuses (a duplicate
    key, an alias bomb, a recursive alias, nesting too deep); ``problem`` says which.
    """


class MCPWarning(UserWarning):
    """A warning about the method itself (e.g. an oscillating ADMM mask).

    The command line silences third-party warnings unless ``--debug``; these stay.
    """


#: The longest refusal line (after the ``lightly-mcp: error: `` prefix).
MAX_MESSAGE = 200


def clipped(text: str, limit: int, keep_end: bool = False) -> str:
    """``text`` cut to ``limit`` characters with "…" where it was cut (its start
    kept, or its end with ``keep_end``), so that a message stays one short line.

    Examples:
        >>> clipped("abcdef", 4), clipped("abcdef", 4, keep_end=True)
        ('abc…', '…def')
    """
    if len(text) <= limit:
        return text
    if keep_end:
        return "…" + text[len(text) - limit + 1 :]
    return text[: max(limit - 1, 0)] + "…"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ("" if it has none)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def describe_error(error: BaseException) -> str:
    """``"TypeName: first line of the message"``, or just the type name."""
    line = first_line(error)
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def describe_flat(error: BaseException) -> str:
    """``"TypeName: the whole message"`` with its whitespace (newlines included)
    collapsed to single spaces, or just the type name.
    """
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
