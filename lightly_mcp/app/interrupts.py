"""SIGTERM and Ctrl-C: where they stop a command, and what the message says is kept.

Inside ``Trainer.fit`` Lightning handles SIGTERM itself: it stops at the next step
boundary and ``lightly_mcp.app.pipeline`` saves ``last.ckpt`` (``StageInterrupted``).
Everywhere else in a command, :func:`sigterm_raises` makes a SIGTERM raise
:class:`~lightly_mcp.errors.Terminated` where it lands, as Ctrl-C raises
``KeyboardInterrupt``, so that temporary files are cleaned up; the command line then
says what is kept (:func:`interrupted_message`) and exits 143 (130 for Ctrl-C), the
shell's status for a process stopped by the signal.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from lightly_mcp.errors import Terminated

SIGINT_EXIT = 128 + signal.SIGINT
"""Exit status after Ctrl-C (130)."""

SIGTERM_EXIT = 128 + signal.SIGTERM
"""Exit status after SIGTERM (143)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # Lightning's handler, installed by Trainer.fit, calls the one it replaced too:
    # then the loop stops at the next step boundary, and nothing is raised here.
    if signal.getsignal(signal.SIGTERM) is _raise_terminated:
        raise Terminated("SIGTERM")


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the block a SIGTERM raises ``Terminated`` (outside ``Trainer.fit``,
    which stops training at a step boundary instead); the previous handler is
    restored afterwards. Nothing changes outside the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_message(signal_name: str, out: Path | None) -> str:
    """One line for a command stopped by ``signal_name`` outside a training loop:
    which stages of the run folder ``out`` are complete, and how to continue.
    """
    from lightly_mcp.app.continuation import finished_stages

    done = finished_stages(out) if out is not None and out.is_dir() else {}
    kept = f"; kept the finished stages {', '.join(done)} in '{out}'" if done else ""
    return f"stopped by {signal_name}{kept}; run the same command again to continue."
