"""The evaluate stage of a finished run, old code against new, side by side.

Times ``lightly_mcp.app.pipeline.evaluate`` on the same run folder (its MCP checkpoint,
its export, the recipe's dense checkpoint) as ``lightly-mcp run`` calls it, in fresh
processes that alternate between two source trees (``--old``, ``--new``; each is put
first on ``PYTHONPATH``), so machine noise hits both alike. The new tree is timed
with an empty baseline cache (``new-cold``: what a first run pays) and with the cache
that run filled (``new-warm``); the old tree has no cache. Each child prints the time
of ``evaluate`` alone (as the run's ``stages.evaluate``) and the numbers it reported,
so the accuracies can be compared too.

Usage:
    git worktree add /tmp/base <old commit>
    python benchmarks/evaluation_speed.py --run runs/quickstart \\
        --old /tmp/base --new . --repeats 2 --json benchmarks/results/evaluation.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CHILD = r"""
import json, sys, time, inspect
from pathlib import Path
import torch
from lightly_mcp.app import pipeline
from lightly_mcp.app.recipe import load_recipe

run = Path(sys.argv[1])
recipe = load_recipe(run / "recipe.yaml")
pruned = run / "prune" / "final.ckpt"
report = json.loads((run / "export" / "report.json").read_text())
networks = pipeline.load_backbone_for_eval(pruned, recipe)
dense = recipe.pretrain.dense_checkpoint
if dense is not None:
    networks["dense"] = pipeline.load_backbone_for_eval(Path(dense), recipe)["dense"]
networks["compact"] = pipeline.exported_compact(recipe, pruned, run, report)
kwargs = {}
if hasattr(pipeline, "subnet_same_as_compact"):
    why = pipeline.subnet_same_as_compact(networks["subnet"], report)
    kwargs["same_as"] = {"subnet": ("compact", why)} if why else {}
out = Path(sys.argv[2])
start = time.perf_counter()
result = pipeline.evaluate(
    networks, recipe, out, "cpu", False, recipe.eval.baselines, **kwargs
)
seconds = time.perf_counter() - start
print(json.dumps({
    "seconds": seconds,
    "threads": torch.get_num_threads(),
    "models": {k: {m: v.get(m) for m in ("knn_top1", "linear_top1", "evaluated")}
               for k, v in result["models"].items()},
    "baselines": {k: {m: v.get(m) for m in ("knn_top1", "linear_top1")}
                  for k, v in result.get("baselines", {}).items()},
    "evaluated": result.get("evaluated", "every network, baselines computed"),
}))
"""


def child(tree: Path, run: Path, cache: Path | None) -> dict[str, Any]:
    """One timed ``evaluate`` with the code of ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
    env["LIGHTLY_MCP_CACHE"] = str(cache) if cache else "off"
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(run), str(Path(tmp) / "eval.json")],
            env=env,
            cwd=tree,
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        raise SystemExit(f"{tree}: child failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def git_commit(tree: Path) -> str:
    """The commit checked out in ``tree`` (``+dirty`` with local changes)."""
    head = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return head + ("+dirty" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="finished run folder")
    parser.add_argument("--old", type=Path, required=True, help="old source tree")
    parser.add_argument("--new", type=Path, default=Path("."), help="new source tree")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from common import cpu_model

    run = args.run.resolve()
    times: dict[str, list[float]] = {"old": [], "new-cold": [], "new-warm": []}
    last: dict[str, dict[str, Any]] = {}
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            for name, tree, use in (
                ("old", args.old, None),
                ("new-cold", args.new, Path(cache)),
                ("new-warm", args.new, Path(cache)),
            ):
                result = child(tree, run, use)
                times[name].append(result["seconds"])
                last[name] = result
                print(f"repeat {repeat} {name}: {result['seconds']:.1f} s", flush=True)
    old = statistics.median(times["old"])
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "cpu": cpu_model(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "old_commit": git_commit(args.old),
        "new_commit": git_commit(args.new),
        "run": str(args.run),
        "seconds": times,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "old_over_new": {
            k: old / statistics.median(v) for k, v in times.items() if k != "old"
        },
        "results": last,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
