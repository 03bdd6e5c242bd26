"""Runs one hostile or bad-input case against the ``lightly-mcp`` command line and
judges what it did (the sweep's machinery; the cases are in ``cases.py``).

A case gets a fresh folder with two parts: ``w/`` (its temp dir: inputs and
``--out`` folders live here, the command runs here) and ``s/`` (the *sentinel*:
files that must never change, e.g. symlink targets; every payload writes its marker
here). Checked for every case:

- the exit code is one of those expected (2 for bad input, 130 for Ctrl-C, 0 for
  valid input), within the case's time limit;
- no Python traceback is printed, and nothing printed suggests
  ``weights_only=False``;
- on a refusal, stderr holds exactly one ``lightly-mcp...`` error line (argparse's
  usage lines before it are allowed) whose message (after ``lightly-mcp: error: ``)
  is at most 200 characters, and names what the case says it must name;
- the sentinel folder and the shared fixtures are unchanged (no code ran from a
  file, no write went through a symlink);
- on a refusal, ``w/`` is as before (``.lock`` files aside, and what the case allows
  to change); after any case no new temp file (``.export-*``, ``*.tmp``, ...) is
  left in ``w/``; and the case's own check passes.

Three ways to run the command: ``fork`` (default for the sweep: a child forked from
a process that imported ``lightly_mcp`` once, then ``cli.main(argv)`` as
``python -m lightly_mcp`` would run it; setups and checks run in forked children
too), ``subprocess`` (a fresh ``python -m lightly_mcp`` per case, slower, the
reference), and ``inprocess`` (``cli.main`` in this process; for the harness's own
test, cases without signals or limits only).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import os
import pickle
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_MESSAGE = 200
"""The longest refusal message allowed (after the ``lightly-mcp: error: `` prefix)."""

WEIGHTS_ONLY_FALSE = re.compile(
    r"weights_only`?\s*(=|set to|to)\s*`?False", re.IGNORECASE
)
"""Advice to load with ``weights_only=False``, in any of PyTorch's phrasings."""

LEFTOVERS = (
    ".export-*",
    "*.tmp",
    ".*.tmp*",
    ".eval.json.*",
    ".report.json.*",
    ".done.json.*",
    "*.partial",
    "tmp[a-z0-9_]*",
)
"""Names of temporary files and folders that must not be left behind."""

ERROR_PREFIX = re.compile(r"^lightly-mcp(?: [a-z]+)?: (?:error: )?")


@dataclass
class Ctx:
    """A case's folders: ``w`` (its temp dir), ``s`` (sentinel), ``base`` (shared
    fixtures, read-only), ``repo`` (the checkout under test)."""

    w: Path
    s: Path
    base: Path
    repo: Path

    @property
    def marker(self) -> Path:
        """Where payloads write (inside the sentinel folder)."""
        return self.s / "pwned"

    def fmt(self, text: str) -> str:
        return text.format(w=self.w, s=self.s, base=self.base, repo=self.repo)


Hook = Callable[[Ctx], Any]


@dataclass
class Case:
    """One hostile or bad-input case.

    Attributes:
        id: Short unique id (``I01``, ``K-type-seed``, ...).
        cls: The class it belongs to (an issue class, or the sweep's own group).
        description: What the case does, one line.
        argv: The command line after ``lightly-mcp`` (``{w}``, ``{s}``, ``{base}``,
            ``{repo}`` are replaced by the case's folders).
        setup: Creates the case's files in ``ctx.w`` / ``ctx.s``.
        exit: Allowed exit codes.
        names: Regexes the error line must match (case-insensitive).
        not_names: Regexes the error line must not match.
        may_change: Glob patterns (relative to ``w``) allowed to change on a
            refusal (``**`` for anything).
        check: Returns a failure reason (or None) after the command.
        during: ``(when, action)``: once ``when(ctx, seconds)`` is true while the
            command runs, ``action(ctx, pid)`` runs (e.g. send SIGINT).
        timeout: Seconds before the command is killed (a failure).
        fsize: ``RLIMIT_FSIZE`` of the command in bytes (a full disk), or None.
        error_line: Whether a refusal must print an error line.
    """

    id: str
    cls: str
    description: str
    argv: Sequence[str]
    setup: Hook | None = None
    exit: tuple[int, ...] = (2,)
    names: tuple[str, ...] = ()
    not_names: tuple[str, ...] = ()
    may_change: tuple[str, ...] = ()
    check: Hook | None = None
    during: tuple[Callable[[Ctx, float], bool], Callable[[Ctx, int], None]] | None = (
        None
    )
    timeout: float = 240.0
    fsize: int | None = None
    error_line: bool = True

    @property
    def expected(self) -> str:
        codes = "/".join(str(c) for c in self.exit)
        extra = ", one line" if self.error_line and self.exit != (0,) else ""
        return f"exit {codes}{extra}"


@dataclass
class Outcome:
    """What a case did and the verdict."""

    id: str
    cls: str
    description: str
    argv: list[str]
    expected: str
    rc: int | None
    seconds: float
    error: str
    reasons: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "handled" if not self.reasons else "FAIL"

    @property
    def got(self) -> str:
        rc = "timeout" if self.rc is None else f"exit {self.rc}"
        return f"{rc}: {self.error}" if self.error else rc

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "class": self.cls,
            "case": self.description,
            "argv": self.argv,
            "expected": self.expected,
            "rc": self.rc,
            "seconds": round(self.seconds, 1),
            "error": self.error,
            "verdict": self.verdict,
            "reasons": self.reasons,
        }


# --- snapshots -----------------------------------------------------------------------
def snapshot(root: Path, hash_limit: int = 64 << 20) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root`` (links not followed, FIFOs and devices not read):
    ``relpath -> (kind, content hash or link target, mode)``.
    """
    entries: dict[str, tuple[Any, ...]] = {}
    if not os.path.lexists(root):
        return entries
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir", mode)
            elif stat.S_ISREG(st.st_mode):
                if st.st_size > hash_limit:
                    digest = f"{st.st_size}:{st.st_mtime_ns}"
                else:
                    with open(path, "rb") as f:
                        digest = hashlib.sha256(f.read()).hexdigest()
                entries[rel] = ("file", digest, mode)
            else:
                entries[rel] = ("special", stat.S_IFMT(st.st_mode))
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
    return entries


def quick_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Sizes and modification times under ``root`` (cheap, for shared fixtures)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out


def differences(
    before: dict[str, Any], after: dict[str, Any], ignore: Sequence[str] = ()
) -> list[str]:
    """``+new``, ``-gone``, ``~changed`` paths, less those matching ``ignore``."""

    def ignored(rel: str) -> bool:
        return any(
            fnmatch.fnmatch(rel, pattern)
            or fnmatch.fnmatch(os.path.basename(rel), pattern)
            for pattern in ignore
        )

    changes = []
    for rel in sorted(set(before) | set(after)):
        if ignored(rel):
            continue
        if rel not in before:
            changes.append(f"+{rel}")
        elif rel not in after:
            changes.append(f"-{rel}")
        elif before[rel] != after[rel]:
            changes.append(f"~{rel}")
    return changes


def leftovers(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """New entries whose name looks like a temporary file or folder."""
    return sorted(
        rel
        for rel in set(after) - set(before)
        if any(fnmatch.fnmatch(os.path.basename(rel), p) for p in LEFTOVERS)
    )


# --- judging -------------------------------------------------------------------------
def error_lines(stderr: str) -> list[str]:
    """The command's own error lines (``lightly-mcp...``), argparse's included."""
    return [line for line in stderr.splitlines() if ERROR_PREFIX.match(line)]


def judge(
    case: Case,
    ctx: Ctx,
    rc: int | None,
    stdout: str,
    stderr: str,
    seconds: float,
    work_before: dict[str, Any],
    work_after: dict[str, Any],
    sentinel_changes: list[str],
    check_result: str | None,
) -> Outcome:
    """The verdict of one finished case (see the module docstring)."""
    reasons: list[str] = []
    lines = error_lines(stderr)
    shown = lines[-1] if lines else ""
    if rc is None:
        reasons.append(f"still running after {case.timeout:.0f} s (killed)")
    elif rc not in case.exit:
        reasons.append(f"exit {rc}" if rc >= 0 else f"killed by signal {-rc}")
    text = stdout + "\n" + stderr
    if "Traceback (most recent call last)" in text:
        reasons.append("traceback printed")
        if not shown:
            tail = [line for line in stderr.splitlines() if line.strip()]
            shown = tail[-1] if tail else ""
    if WEIGHTS_ONLY_FALSE.search(text):
        reasons.append("suggests weights_only=False")
    if rc is not None and rc != 0 and case.error_line:
        if len(lines) != 1:
            reasons.append(f"{len(lines)} error lines")
        if lines:
            message = ERROR_PREFIX.sub("", lines[-1])
            if len(message) > MAX_MESSAGE:
                reasons.append(f"message {len(message)} chars")
            for pattern in case.names:
                if not re.search(pattern, lines[-1], re.IGNORECASE):
                    reasons.append(f"does not name /{pattern}/")
            for pattern in case.not_names:
                if re.search(pattern, lines[-1], re.IGNORECASE):
                    reasons.append(f"says /{pattern}/")
    if sentinel_changes:
        reasons.append("changed outside its folder: " + ", ".join(sentinel_changes[:4]))
    if rc is not None and rc not in (0,) and "**" not in case.may_change:
        changed = differences(
            work_before, work_after, ignore=(".lock", *case.may_change)
        )
        if changed:
            reasons.append("refusal changed files: " + ", ".join(changed[:4]))
    left = leftovers(work_before, work_after)
    if left:
        reasons.append("left temp files: " + ", ".join(left[:4]))
    if check_result:
        reasons.append(check_result)
    return Outcome(
        id=case.id,
        cls=case.cls,
        description=case.description,
        argv=[printable(ctx.fmt(a)) for a in case.argv],
        expected=case.expected,
        rc=rc,
        seconds=seconds,
        error=_short(shown),
        reasons=reasons,
    )


def printable(text: str) -> str:
    """``text`` with undecodable bytes (surrogates) as ``\\xNN`` escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _short(line: str, width: int = 160) -> str:
    line = printable(line)
    return line if len(line) <= width else line[: width - 1] + "…"


# --- running the command -------------------------------------------------------------
def call_main(argv: Sequence[str]) -> int:
    """``lightly_mcp.app.cli.main(argv)`` as ``python -m lightly_mcp`` runs it: an
    uncaught exception prints its traceback and exits 1.
    """
    from lightly_mcp.app.cli import main

    try:
        return int(main(list(argv)) or 0)
    except SystemExit as error:
        code = error.code
        if code is None or isinstance(code, int):
            return int(code or 0)
        print(code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return -int(signal.SIGINT)
    except BaseException:  # noqa: BLE001 - what the interpreter would print
        traceback.print_exc()
        return 1


def _limits(fsize: int | None, address_space: int | None) -> None:
    if fsize is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    if address_space is not None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))


def _vm_size() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


EXTRA_MEMORY = 4 << 30
"""Address space a command may add to the sweep process's (RLIMIT_AS): a runaway
allocation fails instead of taking the shared machine's memory."""

CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "100"}


def in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a forked child (keeps this process free of torch thread
    pools before the next fork); its exception is re-raised here as RuntimeError.
    """
    read, write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            result: Any = (True, fn(*args))
        except BaseException:  # noqa: BLE001
            result = (False, traceback.format_exc())
        try:
            data = pickle.dumps(result)
        except Exception:  # noqa: BLE001
            data = pickle.dumps((True, repr(result[1])))
        with os.fdopen(write, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    ok, value = pickle.loads(data) if data else (False, "child died")
    if not ok:
        raise RuntimeError(value)
    return value


class Running:
    """A started command: its pid, files and clock."""

    def __init__(self, case: Case, ctx: Ctx, argv: list[str], logs: Path) -> None:
        self.case, self.ctx, self.argv = case, ctx, argv
        self.stdout_path, self.stderr_path = logs / "stdout", logs / "stderr"
        self.start = time.monotonic()
        self.pid = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.rc: int | None = None
        self.done = False
        self.acted = False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def read(self) -> tuple[str, str]:
        def text(path: Path) -> str:
            try:
                return path.read_bytes().decode("utf-8", "replace")
            except OSError:
                return ""

        return text(self.stdout_path), text(self.stderr_path)


class Runner:
    """Starts commands by ``mode`` (``fork``, ``subprocess`` or ``inprocess``)."""

    def __init__(self, mode: str, repo: Path, python: str = sys.executable) -> None:
        self.mode, self.repo, self.python = mode, repo, python
        self.address_space: int | None = None
        if mode == "fork":
            preload(repo)
            self.address_space = _vm_size() + EXTRA_MEMORY

    # setups and checks
    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return in_child(fn, *args) if self.mode == "fork" else fn(*args)

    def start(self, run: Running) -> None:
        case = run.case
        if self.mode == "fork":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    os.setpgid(0, 0)
                    for fd, path, flags in (
                        (0, os.devnull, os.O_RDONLY),
                        (1, run.stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                        (2, run.stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                    ):
                        new = os.open(path, flags, 0o644)
                        os.dup2(new, fd)
                        os.close(new)
                    os.chdir(run.ctx.w)
                    os.environ.update(CHILD_ENV)
                    import torch

                    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 at start
                    if os.environ.get("SWEEP_DUMP_AFTER"):
                        import faulthandler

                        faulthandler.dump_traceback_later(
                            float(os.environ["SWEEP_DUMP_AFTER"]), repeat=True
                        )
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    _limits(case.fsize, self.address_space)
                    sys.argv = ["lightly-mcp", *run.argv]
                    code = call_main(run.argv)
                except BaseException:  # noqa: BLE001
                    traceback.print_exc()
                finally:
                    with contextlib.suppress(Exception):
                        sys.stdout.flush()
                        sys.stderr.flush()
                    if code == -int(signal.SIGINT):  # as the interpreter does
                        signal.signal(signal.SIGINT, signal.SIG_DFL)
                        os.kill(os.getpid(), signal.SIGINT)
                    os._exit(code & 0xFF)
            run.pid = pid
        elif self.mode == "subprocess":
            env = {
                **os.environ,
                **CHILD_ENV,
                "PYTHONPATH": str(self.repo),
            }
            fsize = case.fsize

            def limits() -> None:
                _limits(fsize, 16 << 30)

            with open(run.stdout_path, "wb") as out, open(run.stderr_path, "wb") as err:
                run.popen = subprocess.Popen(
                    [self.python, "-m", "lightly_mcp", *run.argv],
                    cwd=run.ctx.w,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    preexec_fn=limits,
                )
            run.pid = run.popen.pid
        else:
            if case.during or case.fsize:
                raise ValueError(f"case {case.id} cannot run in-process")
            out, err = io.StringIO(), io.StringIO()
            cwd = os.getcwd()
            try:
                os.chdir(run.ctx.w)
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    run.rc = call_main(run.argv)
            finally:
                os.chdir(cwd)
            run.stdout_path.write_text(out.getvalue())
            run.stderr_path.write_text(err.getvalue())
            run.done = True

    def poll(self, run: Running) -> bool:
        """Whether the command ended (its exit code in ``run.rc``)."""
        if run.done:
            return True
        if run.popen is not None:
            rc = run.popen.poll()
            if rc is None:
                return False
            run.rc, run.done = rc, True
            return True
        pid, status = os.waitpid(run.pid, os.WNOHANG)
        if pid == 0:
            return False
        run.rc, run.done = os.waitstatus_to_exitcode(status), True
        return True

    def kill(self, run: Running) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, signal.SIGKILL)
        while not self.poll(run):
            time.sleep(0.05)
        run.rc = None


def preload(repo: Path) -> None:
    """Imports ``lightly_mcp`` (from ``repo``) and what its commands use, once."""
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    import lightly_mcp

    where = Path(lightly_mcp.__file__).resolve()
    if not where.is_relative_to(repo.resolve()):
        raise SystemExit(f"lightly_mcp is imported from {where}, not from {repo}")
    import lightly_mcp.app.cli  # noqa: F401
    import lightly_mcp.app.pipeline  # noqa: F401
    import lightly_mcp.app.preflight  # noqa: F401
    import lightly_mcp.formats.export  # noqa: F401


def prepare(
    case: Case, root: Path, base: Path, repo: Path, runner: Runner, name: str = ""
) -> Ctx:
    """The case's fresh folders (``root/name``, short: messages quote these paths),
    with its setup run."""
    folder = root / (name or case.id)
    if folder.exists():
        _force_remove(folder)
    ctx = Ctx(w=folder / "w", s=folder / "s", base=base, repo=repo)
    ctx.w.mkdir(parents=True)
    ctx.s.mkdir()
    (ctx.s / "keep.txt").write_text("the sentinel folder must not change\n")
    if case.setup is not None:
        runner.call(case.setup, ctx)
    return ctx


def _force_remove(path: Path) -> None:
    def unlock(func: Any, name: str, _: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(name), 0o755)
            os.chmod(name, 0o755)
        with contextlib.suppress(OSError):
            func(name)

    shutil.rmtree(path, onerror=unlock)


def run_cases(
    cases: Sequence[Case],
    root: Path,
    base: Path,
    repo: Path,
    runner: Runner,
    jobs: int = 2,
    report: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Runs ``cases`` (at most ``jobs`` at a time) and judges each one."""
    pending = list(cases)
    running: list[tuple[Running, dict[str, Any], dict[str, Any], dict[str, Any]]] = []
    outcomes: dict[str, Outcome] = {}
    base_before = quick_snapshot(base)
    numbers = {case.id: str(i) for i, case in enumerate(cases, 1)}
    while pending or running:
        while pending and len(running) < max(1, jobs):
            case = pending.pop(0)
            try:
                ctx = prepare(case, root, base, repo, runner, numbers[case.id])
            except Exception as error:  # noqa: BLE001 - a broken setup is reported
                outcomes[case.id] = Outcome(
                    case.id,
                    case.cls,
                    case.description,
                    list(case.argv),
                    case.expected,
                    None,
                    0.0,
                    "",
                    [f"setup failed: {str(error).strip().splitlines()[-1][:200]}"],
                )
                if report:
                    report(outcomes[case.id])
                continue
            logs = ctx.w.parent
            argv = [ctx.fmt(a) for a in case.argv]
            run = Running(case, ctx, argv, logs)
            work_before, sentinel_before = snapshot(ctx.w), snapshot(ctx.s)
            runner.start(run)
            running.append((run, work_before, sentinel_before, {}))
        time.sleep(0.1 if runner.mode != "inprocess" else 0)
        for item in list(running):
            run, work_before, sentinel_before, _ = item
            case = run.case
            if not runner.poll(run):
                if (
                    case.during
                    and not run.acted
                    and case.during[0](run.ctx, run.elapsed())
                ):
                    run.acted = True
                    with contextlib.suppress(ProcessLookupError):
                        case.during[1](run.ctx, run.pid)
                if run.elapsed() > case.timeout:
                    runner.kill(run)
                else:
                    continue
            running.remove(item)
            seconds = run.elapsed()
            stdout, stderr = run.read()
            check = None
            if case.check is not None:
                try:
                    check = runner.call(case.check, run.ctx)
                except Exception as error:  # noqa: BLE001
                    check = f"check failed: {str(error).strip().splitlines()[-1][:200]}"
            sentinel_changes = differences(sentinel_before, snapshot(run.ctx.s))
            base_changes = differences(base_before, quick_snapshot(base))
            if base_changes:
                sentinel_changes += [f"fixtures {c}" for c in base_changes]
                base_before = quick_snapshot(base)
            outcome = judge(
                case,
                run.ctx,
                run.rc,
                stdout,
                stderr,
                seconds,
                work_before,
                snapshot(run.ctx.w),
                sentinel_changes,
                check,
            )
            outcomes[case.id] = outcome
            if report:
                report(outcome)
    return [outcomes[c.id] for c in cases if c.id in outcomes]
