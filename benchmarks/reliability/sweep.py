"""The reliability sweep: hostile and bad-input cases against ``lightly-mcp``.

Usage (from the repository root)::

    python benchmarks/reliability/sweep.py --out benchmarks/reliability/sweep.md

runs every case of ``cases.py`` (at most ``--jobs`` 2 at a time) against the
checkout ``--repo`` (default: this one), and writes a table (``id``, ``class``,
``case``, ``expected``, ``got``, ``verdict``) to ``--out`` and the same results as
JSON beside it (``sweep.json``). What is checked for each case is described in
``harness.py``. The tiny run the cases start from is made once per sweep (about a
minute; ``--fixtures DIR`` reuses one). ``--only REGEX`` runs the matching case ids,
``--list`` prints the cases.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

SCRIPT_ROOT = Path(__file__).resolve().parents[2]
if str(SCRIPT_ROOT) not in sys.path:
    sys.path.insert(0, str(SCRIPT_ROOT))

from benchmarks.reliability import harness  # noqa: E402
from benchmarks.reliability.cases import TINY, all_cases  # noqa: E402
from benchmarks.reliability.harness import Outcome  # noqa: E402

COST = {
    "argv": 0,
    "set": 0,
    "key-type": 0,
    "key-empty": 1,
    "file-kind": 1,
    "pickle": 1,
    "pt2": 1,
    "torchscript": 1,
    "path": 1,
    "data": 2,
    "key-range": 9,
    "valid": 2,
}
"""Groups run first (cheap ones first, so an interrupted sweep has most cases)."""


def build_fixtures(base: Path, repo: Path, python: str) -> None:
    """The tiny recipe and its finished run (dense and MCP checkpoints, export)."""
    import yaml

    if (base / "done").is_file():
        return
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    (base / "recipe.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    env = {**os.environ, **harness.CHILD_ENV, "PYTHONPATH": str(repo)}
    command = [
        python,
        "-m",
        "lightly_mcp",
        "run",
        str(base / "recipe.yaml"),
        "--out",
        str(base / "run"),
        "--quiet",
        "--no-preflight",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=base)
    if done.returncode != 0:
        raise SystemExit(f"the tiny run failed:\n{done.stderr[-3000:]}")
    (base / "run" / ".lock").unlink(missing_ok=True)
    shutil.copy(base / "run" / "pretrain" / "final.ckpt", base / "dense.ckpt")
    shutil.copy(base / "run" / "prune" / "final.ckpt", base / "mcp.ckpt")
    shutil.copytree(base / "run" / "export", base / "export")
    (base / "done").write_text("ok\n")


def _git(repo: Path, *args: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


CAUSES: tuple[tuple[str, str], ...] = (
    ("changed outside", "code ran from a file or a write went outside the case folder"),
    ("user files deleted", "the user's files were deleted"),
    ("was overwritten", "the user's file was overwritten"),
    ("exit 0", "not refused (exit 0)"),
    ("exit 1", "exit 1 ('unexpected') for bad input"),
    ("still running", "still running at the time limit (hangs or trains)"),
    ("killed by signal", "killed by a signal instead of exiting"),
    ("exit ", "another exit code"),
    ("traceback", "a traceback printed"),
    ("weights_only", "suggests weights_only=False"),
    ("chars", "message over 200 characters"),
    ("error lines", "not exactly one error line"),
    ("does not name", "the message does not name the file or key"),
    ("says /", "misleading wording (e.g. 'does not exist' for a FIFO)"),
    ("refusal changed files", "a refusal changed the case's files"),
    ("left", "temporary or partial files left behind"),
    ("torn checkpoint", "a torn checkpoint left"),
    ("report.json", "a report built from outputs it should not trust"),
    ("", "other check"),
)
"""Failure reasons by cause (the first matching substring), for the summary."""


def causes(outcomes: list[Outcome]) -> dict[str, list[str]]:
    """Failing case ids by cause (a case may fail for several)."""
    found: dict[str, list[str]] = {}
    for o in outcomes:
        for reason in o.reasons:
            cause = next(c for key, c in CAUSES if key in reason)
            ids = found.setdefault(cause, [])
            if o.id not in ids:
                ids.append(o.id)
    order = [c for _, c in CAUSES]
    return dict(sorted(found.items(), key=lambda item: order.index(item[0])))


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def write_results(
    outcomes: list[Outcome], header: dict[str, str], md: Path, js: Path
) -> None:
    """The markdown table (with a summary) and the JSON of the same results."""
    handled = sum(o.verdict == "handled" for o in outcomes)
    by_class: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        by_class[o.cls].append(o)
    lines = [
        "# Reliability sweep: hostile and bad-input cases",
        "",
        "Made by `benchmarks/reliability/sweep.py` (the checks: `harness.py`; the "
        "cases: `cases.py`). A case is *handled* when every check passes: the expected "
        "exit code "
        "(2 for bad input, 130 for Ctrl-C, 143 for SIGTERM, 0 for valid input), no "
        "traceback, nothing "
        "suggesting `weights_only=False`, a refusal as exactly one `lightly-mcp` error "
        "line whose message is at most 200 characters and names the file or key, no "
        "change outside the case's folder (payload markers, symlink targets), no "
        "change "
        "to the case's files on a refusal and no temp file left behind.",
        "",
        *(f"- {key}: {value}" for key, value in header.items()),
        f"- result: **{handled} of {len(outcomes)} handled**, "
        f"{len(outcomes) - handled} fail",
        "",
        "| class | cases | handled |",
        "|---|---:|---:|",
        *(
            f"| {cls} | {len(items)} | {sum(o.verdict == 'handled' for o in items)} |"
            for cls, items in by_class.items()
        ),
        "",
        "Failing cases by cause (a case may be listed under several):",
        "",
        *(f"- {cause}: {', '.join(ids)}" for cause, ids in causes(outcomes).items()),
        "",
        "| id | class | case | expected | got | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        verdict = "handled" if not o.reasons else "**FAIL**: " + "; ".join(o.reasons)
        lines.append(
            f"| {_cell(o.id)} | {o.cls} | {_cell(o.description)} | {o.expected} | "
            f"{_cell(o.got)} | {_cell(verdict)} |"
        )
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines) + "\n")
    js.write_text(
        json.dumps(
            {"header": header, "cases": [o.to_dict() for o in outcomes]},
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repo",
        type=Path,
        default=SCRIPT_ROOT,
        help="the checkout under test (default: this one)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/reliability/sweep.md")
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="JSON results (default: --out with .json)",
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="cases at a time (default 2)"
    )
    parser.add_argument("--runner", choices=("fork", "subprocess"), default="fork")
    parser.add_argument("--only", default=None, help="regex of case ids to run")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where cases run (default: a new /tmp/lmsw-* folder)",
    )
    parser.add_argument(
        "--fixtures",
        type=Path,
        default=None,
        help="folder of the tiny run (made there if missing)",
    )
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip the cases in WORKDIR/progress.jsonl (an interrupted sweep)",
    )
    parser.add_argument(
        "--from-progress",
        type=Path,
        default=None,
        help="only write the table from a progress.jsonl of an earlier run",
    )
    parser.add_argument(
        "--header",
        type=Path,
        default=None,
        help="with --from-progress: the run's header.json",
    )
    args = parser.parse_args(argv)

    import re

    repo = args.repo.resolve()
    harness.preload(repo)  # lightly_mcp from the checkout under test
    cases = all_cases()
    if args.only:
        cases = [c for c in cases if re.search(args.only, c.id)]
    if args.from_progress:
        done = _read_progress(args.from_progress)
        outcomes = [done[c.id] for c in cases if c.id in done]
        missing = [c.id for c in cases if c.id not in done]
        header = json.loads(args.header.read_text()) if args.header else {}
        if missing:
            header["not run"] = f"{len(missing)} cases (out of time): " + ", ".join(
                missing
            )
        js = args.json or args.out.with_suffix(".json")
        write_results(outcomes, header, args.out, js)
        print(f"{len(outcomes)} outcomes, {len(missing)} not run; table: {args.out}")
        return 0
    cases.sort(key=lambda c: COST.get(c.cls, 5))
    workdir = args.workdir or Path(f"/tmp/lmsw-{os.getpid()}")
    progress = workdir / "progress.jsonl"
    earlier: dict[str, Outcome] = {}
    if args.resume and progress.is_file():
        earlier = _read_progress(progress)
        cases_all = cases
        cases = [c for c in cases if c.id not in earlier]
    if args.list:
        for c in cases:
            print(f"{c.id}\t{c.cls}\t{c.description}")
        print(f"{len(cases)} cases")
        return 0
    workdir.mkdir(parents=True, exist_ok=True)
    base = (args.fixtures or workdir / "base").resolve()
    started = time.time()
    print(f"fixtures: {base}", flush=True)
    build_fixtures(base, repo, sys.executable)
    runner = harness.Runner(args.runner, repo)
    root = workdir / "c"
    root.mkdir(exist_ok=True)

    def report(o: Outcome) -> None:
        print(
            f"{o.id:<32} {o.verdict:<8} {o.seconds:6.1f}s {o.got[:90]}"
            + (f"  [{'; '.join(o.reasons)[:160]}]" if o.reasons else ""),
            flush=True,
        )
        with progress.open("a") as f:
            f.write(json.dumps(o.to_dict()) + "\n")

    fixture_snapshot = harness.snapshot(base)
    header = run_header(repo, args, argv, started)
    (workdir / "header.json").write_text(json.dumps(header, indent=1))
    outcomes = harness.run_cases(cases, root, base, repo, runner, args.jobs, report)
    if earlier:
        fresh = {o.id: o for o in outcomes}
        outcomes = [fresh.get(c.id) or earlier[c.id] for c in cases_all]
    changed = harness.differences(fixture_snapshot, harness.snapshot(base))
    if changed:
        print(f"WARNING: the shared fixtures changed: {changed[:5]}", flush=True)
    header = run_header(repo, args, argv, started)
    js = args.json or args.out.with_suffix(".json")
    write_results(outcomes, header, args.out, js)
    failed = [o for o in outcomes if o.reasons]
    counts = Counter(o.cls for o in failed)
    print(
        f"{len(outcomes) - len(failed)} of {len(outcomes)} handled; failing by class: "
        f"{dict(counts)}; table: {args.out}"
    )
    return 0


def _read_progress(path: Path) -> dict[str, Outcome]:
    done = {}
    for line in path.read_text().splitlines():
        d = json.loads(line)
        done[d["id"]] = Outcome(
            d["id"],
            d["class"],
            d["case"],
            d["argv"],
            d["expected"],
            d["rc"],
            d["seconds"],
            d["error"],
            d["reasons"],
        )
    return done


def run_header(
    repo: Path, args: argparse.Namespace, argv: list[str] | None, started: float
) -> dict[str, str]:
    commit = _git(repo, "rev-parse", "--short", "HEAD")
    dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return {
        "command": "python "
        + " ".join([os.path.relpath(__file__, Path.cwd()), *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "commit": commit
        + (" (with uncommitted changes)" if dirty and dirty != "unknown" else ""),
        "CPU": f"{cpu_model()} ({os.cpu_count()} cores, shared with other jobs)",
        "runner": f"{args.runner}, {args.jobs} at a time, "
        f"{time.time() - started:.0f} s in all",
        "Python / torch": f"{platform.python_version()} / {_torch_version()}",
    }


def _torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
