"""The sweep's cases: every class of issue 34 and the sweep's own groups.

Groups (the ``class`` column of the table):

- ``issue-1`` .. ``issue-12``: the twelve classes of issue 34; ``small``: its smaller
  findings;
- ``pickle``: pickles that run code, at every argument and key that names a file;
- ``file-kind``: a folder, FIFO, ``/dev/zero``, empty file, random bytes, a zip, a
  JSON file or a garbage ONNX file where a model file is expected (and at the
  recipe and ``--out`` arguments);
- ``pt2``, ``torchscript``: tampered ``torch.export`` archives, TorchScript files;
- ``symlink``: symlinks inside OUT;
- ``key-type``, ``key-range``, ``key-empty``: every recipe key with a wrong type,
  and values out of range, empty or huge;
- ``set``, ``argv``, ``path``: ``--set`` syntax, unknown subcommands and flags,
  unicode and long paths;
- ``data``: dataset folders with corrupt, short or oversized files;
- ``signal``, ``run-folder``, ``valid``: interruptions, run folders, and valid
  inputs that must succeed (controls).

Most cases fail at validation or in the preflight; those that train use the tiny
recipe (digits at 16 px, MobileNetV2 width 0.25, 2 steps per stage) or a copy of the
finished tiny run the sweep makes once (``base/run``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from benchmarks.reliability import payloads as pl
from benchmarks.reliability.harness import Case, Ctx

# The tiny recipe of tests/tiny.py: 16 images in batches of 8, 2 steps per stage.
from tests.tiny import TINY  # noqa: E402

DELETE = object()

RUN = ["run", "{w}/r.yaml", "--out", "{w}/out", "--quiet"]
DRY = [*RUN, "--dry-run"]
FINISHED = [
    "run",
    "{base}/recipe.yaml",
    "--out",
    "{w}/out",
    "--quiet",
    "--no-preflight",
]
EVALUATE = ["evaluate", "{w}/MODEL", "{base}/recipe.yaml", "--out", "{w}/ev", "--quiet"]


# --- building blocks ------------------------------------------------------------------
def recipe_dict(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    raw = copy.deepcopy(TINY)
    for dotted, value in (overrides or {}).items():
        node = raw
        *sections, key = dotted.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        if value is DELETE:
            node.pop(key, None)
        else:
            node[key] = value
    return raw


def write_recipe(
    ctx: Ctx, overrides: dict[str, Any] | None = None, name: str = "r.yaml"
) -> Path:
    path = ctx.w / name
    path.write_text(yaml.safe_dump(recipe_dict(overrides), sort_keys=False))
    return path


def recipe(
    overrides: dict[str, Any] | None = None, text: str | None = None
) -> Callable[[Ctx], None]:
    """A setup writing ``w/r.yaml``: the tiny recipe with overrides, or ``text``."""

    def setup(ctx: Ctx) -> None:
        if text is not None:
            (ctx.w / "r.yaml").write_text(text.replace("{s}", str(ctx.s)))
        else:
            write_recipe(ctx, {k: _fmt(ctx, v) for k, v in (overrides or {}).items()})

    return setup


def _fmt(ctx: Ctx, value: Any) -> Any:
    return ctx.fmt(value) if isinstance(value, str) else value


def both(*setups: Callable[[Ctx], None] | None) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        for fn in setups:
            if fn is not None:
                fn(ctx)

    return setup


def copy_run(ctx: Ctx, name: str = "out", remove: tuple[str, ...] = ()) -> Path:
    """A copy of the finished tiny run at ``w/name``, less ``remove``."""
    out = ctx.w / name
    shutil.copytree(ctx.base / "run", out, symlinks=True)
    for rel in remove:
        path = out / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
    return out


def finished(*remove: str) -> Callable[[Ctx], None]:
    return lambda ctx: copy_run(ctx, remove=remove) and None


def sigint(ctx: Ctx, pid: int) -> None:
    os.killpg(pid, signal.SIGINT)


def sigterm(ctx: Ctx, pid: int) -> None:
    os.killpg(pid, signal.SIGTERM)


def after(seconds: float) -> Callable[[Ctx, float], bool]:
    return lambda ctx, t: t >= seconds


def appears(pattern: str, delay: float = 0.0) -> Callable[[Ctx, float], bool]:
    """True once a path matching ``pattern`` (glob under ``w``) exists."""
    seen: dict[str, float] = {}

    def when(ctx: Ctx, t: float) -> bool:
        if "t" not in seen and any(ctx.w.glob(pattern)):
            seen["t"] = t
        return "t" in seen and t >= seen["t"] + delay

    return when


def readable_checkpoints(ctx: Ctx) -> str | None:
    """Every ``*.ckpt`` under ``w`` loads with ``weights_only=True`` (none torn)."""
    import torch

    for path in sorted(ctx.w.rglob("*.ckpt")):
        if path.is_symlink() or not path.is_file():
            continue
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001
            return f"torn checkpoint {path.relative_to(ctx.w)} ({type(error).__name__})"
    return None


def exists(*rels: str) -> Callable[[Ctx], str | None]:
    def check(ctx: Ctx) -> str | None:
        missing = [rel for rel in rels if not os.path.lexists(ctx.w / rel)]
        return f"user files deleted: {', '.join(missing)}" if missing else None

    return check


def absent(*patterns: str) -> Callable[[Ctx], str | None]:
    def check(ctx: Ctx) -> str | None:
        found = [str(p.relative_to(ctx.w)) for pat in patterns for p in ctx.w.glob(pat)]
        return f"left behind: {', '.join(found[:3])}" if found else None

    return check


# --- issue 34's classes ---------------------------------------------------------------
def issue_cases() -> list[Case]:
    def tampered_pt2(ctx: Ctx, dst: Path) -> None:
        pl.pt2_guards(ctx.base / "export" / "model.pt2", dst, ctx.marker)

    def export_copy(ctx: Ctx) -> Path:
        folder = ctx.w / "exp"
        shutil.copytree(ctx.base / "export", folder)
        return folder

    def run_with_ts(ctx: Ctx) -> None:
        out = copy_run(ctx, remove=("eval", "report.json", "export/model.pt2"))
        report = json.loads((out / "export" / "report.json").read_text())
        report["files"]["written"] = ["model.ts", "model.onnx", "model.pt"]
        (out / "export" / "report.json").write_text(json.dumps(report))
        pl.torchscript(out / "export" / "model.ts", ctx.marker)

    def victim(ctx: Ctx, name: str = "victim.txt") -> Path:
        path = ctx.s / name
        path.write_text("#!/bin/sh\necho the user's own file\n")
        return path

    def lock_link(ctx: Ctx) -> None:
        (ctx.w / "out").mkdir()
        (ctx.w / "out" / ".lock").symlink_to(victim(ctx))

    def recipe_link(ctx: Ctx) -> None:
        out = copy_run(ctx)
        target = ctx.s / "recipe.yaml"
        target.write_text("# the user's notes\n" + (out / "recipe.yaml").read_text())
        (out / "recipe.yaml").unlink()
        (out / "recipe.yaml").symlink_to(target)

    def metrics_link(ctx: Ctx) -> None:
        logs = ctx.w / "out" / "prune" / "logs"
        logs.mkdir(parents=True)
        (logs / "metrics.csv").symlink_to(victim(ctx, "metrics.csv"))

    def eval_link(ctx: Ctx) -> None:
        out = copy_run(ctx, remove=("eval", "report.json"))
        (ctx.s / "evaldir").mkdir()
        (ctx.s / "evaldir" / "keep.txt").write_text("mine\n")
        (out / "eval").symlink_to(ctx.s / "evaldir")

    def report_link(ctx: Ctx) -> None:
        out = copy_run(ctx, remove=("report.json",))
        (out / "report.json").symlink_to(victim(ctx, "report.json"))

    def export_link(ctx: Ctx) -> None:
        out = copy_run(ctx, remove=("export", "eval", "report.json"))
        (ctx.s / "mine").mkdir()
        (ctx.s / "mine" / "notes.txt").write_text("mine\n")
        (out / "export").symlink_to(ctx.s / "mine")

    def resume_at_end(ctx: Ctx) -> None:
        copy_run(
            ctx,
            remove=(
                "prune/final.ckpt",
                "prune/done.json",
                "export",
                "eval",
                "report.json",
                "plots",
            ),
        )

    def same_as_uninterrupted(ctx: Ctx) -> str | None:
        import torch

        a = torch.load(ctx.base / "run/prune/final.ckpt", weights_only=True)[
            "state_dict"
        ]
        path = ctx.w / "out/prune/final.ckpt"
        if not path.is_file():
            return "no prune/final.ckpt"
        b = torch.load(path, weights_only=True)["state_dict"]
        differ = [
            k
            for k in a
            if k not in b
            or a[k].shape != b[k].shape
            or not torch.allclose(a[k].double(), b[k].double(), atol=1e-5)
        ]
        return (
            f"resumed model differs ({len(differ)} tensors, e.g. {differ[0]})"
            if differ
            else None
        )

    def restart_user_files(ctx: Ctx) -> None:
        out = copy_run(ctx)
        (out / "export" / "model.onnx.backup").write_text("mine")
        (out / "export" / "model.onnx_versions").mkdir()
        (out / "export" / "model.onnx_versions" / "v1.onnx").write_text("mine")
        (out / ".export-mine").mkdir()
        (out / ".export-mine" / "notes.txt").write_text("mine")
        (out / ".report.json.mine").write_text("mine")

    def user_recipe_in_out(ctx: Ctx) -> None:
        out = copy_run(ctx)
        text = (ctx.base / "recipe.yaml").read_text()
        (out / "recipe.yaml").write_text("# my notes: do not lose them\n" + text)

    def user_recipe_kept(ctx: Ctx) -> str | None:
        text = (ctx.w / "out" / "recipe.yaml").read_text()
        return (
            None
            if text.startswith("# my notes")
            else "the user's recipe.yaml was overwritten"
        )

    def lost_recipe(key: str, value: Any) -> Callable[[Ctx], None]:
        def setup(ctx: Ctx) -> None:
            copy_run(ctx, remove=("recipe.yaml",))
            write_recipe(ctx, {key: value})

        return setup

    def eval_only_compact(ctx: Ctx) -> None:
        out = copy_run(ctx)
        data = json.loads((out / "eval" / "eval.json").read_text())
        data["models"] = {"compact": data["models"]["compact"]}
        (out / "eval" / "eval.json").write_text(json.dumps(data))

    def eval_foreign(ctx: Ctx) -> None:
        out = copy_run(ctx)
        data = json.loads((out / "eval" / "eval.json").read_text())
        for model in data["models"].values():
            model["knn_top1"] = model["linear_top1"] = 0.999
        (out / "eval" / "eval.json").write_text(json.dumps(data))

    def report_has_all(ctx: Ctx) -> str | None:
        report = json.loads((ctx.w / "out" / "report.json").read_text())
        missing = [
            m
            for m in ("dense", "subnet", "compact")
            if "knn_top1" not in report.get(m, {})
        ]
        return (
            f"report.json has no accuracy of {', '.join(missing)}" if missing else None
        )

    def report_not_foreign(ctx: Ctx) -> str | None:
        text = (ctx.w / "out" / "report.json").read_text()
        return (
            "report.json shows another evaluation's accuracy (0.999)"
            if "0.999" in text
            else None
        )

    def export_race(ctx: Ctx, pid: int) -> None:
        (ctx.w / "exp").mkdir(exist_ok=True)
        (ctx.w / "exp" / "user.txt").write_text("made while the export ran\n")

    tiny_text = yaml.safe_dump(TINY, sort_keys=False)
    deep = "[" * 5000 + "]" * 5000
    # data.root: [&a [x, ...], &b [*a, ...], ..., &i [*h, ...]]: 9^9 leaves.
    bomb = (
        "[&a [x,x,x,x,x,x,x,x,x], "
        + ", ".join(
            f"&{n} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]"
            for p, n in zip("abcdefgh", "bcdefghi")
        )
        + "]"
    )
    return [
        Case(
            "I01",
            "issue-1",
            "evaluate a model.pt2 whose guards_code runs a shell command",
            [*EVALUATE[:1], "{w}/model.pt2", *EVALUATE[2:]],
            lambda c: tampered_pt2(c, c.w / "model.pt2"),
        ),
        Case(
            "I02",
            "issue-1",
            "evaluate an export folder whose model.pt2 has a guards_code payload",
            [*EVALUATE[:1], "{w}/exp", *EVALUATE[2:]],
            lambda c: tampered_pt2(c, export_copy(c) / "model.pt2"),
        ),
        Case(
            "I03",
            "issue-1",
            "run continues a folder whose export/model.pt2 was swapped for a payload",
            FINISHED,
            lambda c: tampered_pt2(
                c, copy_run(c, remove=("eval", "report.json")) / "export" / "model.pt2"
            ),
            may_change=("recipe.yaml",),
        ),
        Case(
            "I04",
            "issue-2",
            "evaluate a TorchScript model.ts that writes a file on forward",
            [*EVALUATE[:1], "{w}/model.ts", *EVALUATE[2:]],
            lambda c: pl.torchscript(c.w / "model.ts", c.marker),
        ),
        Case(
            "I05",
            "issue-2",
            "evaluate a TorchScript model.ts that writes a file in __setstate__",
            [*EVALUATE[:1], "{w}/model.ts", *EVALUATE[2:]],
            lambda c: pl.torchscript(c.w / "model.ts", c.marker, on="load"),
        ),
        Case(
            "I06",
            "issue-2",
            "evaluate an export folder holding only a hostile model.ts",
            [*EVALUATE[:1], "{w}/exp", *EVALUATE[2:]],
            lambda c: (
                (c.w / "exp").mkdir()
                or pl.torchscript(c.w / "exp" / "model.ts", c.marker)
            ),
        ),
        Case(
            "I07",
            "issue-2",
            "run continues a folder whose export/report.json lists a hostile model.ts",
            FINISHED,
            run_with_ts,
            may_change=("recipe.yaml",),
        ),
        Case(
            "I08",
            "issue-2",
            "evaluate a harmless TorchScript file without --trust-pickle",
            [*EVALUATE[:1], "{w}/model.ts", *EVALUATE[2:]],
            lambda c: pl.torchscript(c.w / "model.ts", None),
        ),
        Case(
            "I09",
            "issue-3",
            "pretrain into OUT whose .lock is a symlink to a user's script",
            [
                "pretrain",
                "{base}/recipe.yaml",
                "--out",
                "{w}/out",
                "--quiet",
                "--no-preflight",
            ],
            lock_link,
            exit=(0, 2),
            may_change=("**",),
        ),
        Case(
            "I10",
            "issue-3",
            "run a finished OUT whose recipe.yaml is a symlink to the user's file",
            FINISHED,
            recipe_link,
            exit=(0, 2),
            may_change=("**",),
        ),
        Case(
            "I11",
            "issue-3",
            "prune into OUT whose prune/logs/metrics.csv is a symlink",
            [
                "prune",
                "{base}/recipe.yaml",
                "--from",
                "{base}/dense.ckpt",
                "--out",
                "{w}/out",
                "--quiet",
                "--no-preflight",
            ],
            metrics_link,
            exit=(0, 2),
            may_change=("**",),
        ),
        Case(
            "I12",
            "issue-3",
            "run a finished OUT whose eval/ is a symlink to a user's folder",
            FINISHED,
            eval_link,
            exit=(0, 2),
            may_change=("**",),
        ),
        Case(
            "I13",
            "issue-3",
            "run a finished OUT whose report.json is a symlink to a user's file",
            FINISHED,
            report_link,
            exit=(0, 2),
            may_change=("**",),
        ),
        Case(
            "I14",
            "issue-3",
            "run an OUT whose export/ is a symlink to a user's folder",
            FINISHED,
            export_link,
            exit=(0, 2),
            may_change=("**",),
        ),
        Case(
            "I15",
            "issue-4",
            "pretrain with the disk full (1 MB file size limit) at the checkpoint save",
            [
                "pretrain",
                "{base}/recipe.yaml",
                "--out",
                "{w}/out",
                "--quiet",
                "--no-preflight",
            ],
            None,
            names=(r"space|disk|full|large|quota|write",),
            may_change=("**",),
            check=readable_checkpoints,
            fsize=1 << 20,
        ),
        Case(
            "I16",
            "issue-5",
            "resume from a last.ckpt of the last step: the uninterrupted model",
            FINISHED,
            resume_at_end,
            exit=(0,),
            check=same_as_uninterrupted,
        ),
        Case(
            "I17",
            "issue-6",
            "prune --restart keeps the user's files that match the stage globs",
            [
                "prune",
                "{base}/recipe.yaml",
                "--from",
                "{w}/out/pretrain/final.ckpt",
                "--out",
                "{w}/out",
                "--restart",
                "--quiet",
                "--no-preflight",
            ],
            restart_user_files,
            exit=(0,),
            check=exists(
                "out/export/model.onnx.backup",
                "out/export/model.onnx_versions/v1.onnx",
                "out/.export-mine/notes.txt",
                "out/.report.json.mine",
            ),
        ),
        Case(
            "I18",
            "issue-7",
            "export without --overwrite while the user creates --out during it",
            ["export", "{base}/mcp.ckpt", "--out", "{w}/exp", "--no-latency"],
            None,
            exit=(0, 2),
            may_change=("**",),
            check=exists("exp/user.txt"),
            during=(appears(".export-*"), export_race),
        ),
        Case(
            "I19",
            "issue-8",
            "run DIR/recipe.yaml --out DIR keeps the user's recipe.yaml",
            [
                "run",
                "{w}/out/recipe.yaml",
                "--out",
                "{w}/out",
                "--quiet",
                "--no-preflight",
            ],
            user_recipe_in_out,
            exit=(0, 2),
            may_change=("**",),
            check=user_recipe_kept,
        ),
        Case(
            "I20",
            "issue-9",
            "finished OUT without recipe.yaml, run with export.round_to=8",
            RUN,
            lost_recipe("export.round_to", 8),
            names=("recipe|round_to",),
        ),
        Case(
            "I21",
            "issue-9",
            "finished OUT without recipe.yaml, run with eval.k=5",
            RUN,
            lost_recipe("eval.k", 5),
            names=("recipe|eval",),
        ),
        Case(
            "I22",
            "issue-10",
            "run reuses an eval.json that holds only the compact model",
            [*FINISHED],
            eval_only_compact,
            exit=(0, 2),
            may_change=("**",),
            check=report_has_all,
        ),
        Case(
            "I23",
            "issue-10",
            "run reuses an eval.json of another evaluation (accuracies 0.999)",
            [*FINISHED],
            eval_foreign,
            exit=(0, 2),
            may_change=("**",),
            check=report_not_foreign,
        ),
        Case(
            "I24",
            "issue-11",
            "recipe with two mcp: sections",
            RUN,
            recipe(text=tiny_text + "mcp:\n  pruning_ratio: 0.9\n"),
            names=(r"duplicate|twice|more than once",),
        ),
        Case(
            "I25",
            "issue-11",
            "recipe with data.subset given twice in one section",
            RUN,
            recipe(text=tiny_text.replace("subset: 16", "subset: 16\n  subset: 8")),
            names=(r"duplicate|twice|more than once",),
        ),
        Case(
            "I26",
            "issue-11",
            "recipe with seed given twice",
            RUN,
            recipe(text="seed: 3\n" + tiny_text),
            names=(r"duplicate|twice|more than once",),
        ),
        Case("I27", "issue-12", "seed: -1", DRY, recipe({"seed": -1}), names=("seed",)),
        Case(
            "I28",
            "issue-12",
            "seed: 2**64",
            DRY,
            recipe({"seed": 2**64}),
            names=("seed",),
        ),
        Case(
            "I29",
            "issue-12",
            "trainer.strategy: bogus",
            DRY,
            recipe({"trainer.strategy": "bogus"}),
            names=("strategy",),
        ),
        Case(
            "I30",
            "issue-12",
            "trainer.precision: bogus",
            DRY,
            recipe({"trainer.precision": "bogus"}),
            names=("precision",),
        ),
        Case(
            "I31",
            "issue-12",
            "trainer.accelerator: bogus",
            DRY,
            recipe({"trainer.accelerator": "bogus"}),
            names=("accelerator",),
        ),
        Case(
            "I32",
            "issue-12",
            "a Latin-1 byte (0xE9) in a recipe comment",
            RUN,
            lambda c: (c.w / "r.yaml").write_bytes(b"# caf\xe9\n" + tiny_text.encode()),
            names=("r.yaml",),
        ),
        Case(
            "I33",
            "issue-12",
            "data.root: a list nested 5,000 deep",
            RUN,
            recipe(
                text=tiny_text.replace("kind: digits", f"kind: digits\n  root: {deep}")
            ),
            names=("root|nest|deep",),
            timeout=120,
        ),
        Case(
            "I34",
            "issue-12",
            "YAML alias bomb (9^9 leaves) in data.root",
            RUN,
            recipe(
                text=tiny_text.replace("kind: digits", f"kind: digits\n  root: {bomb}")
            ),
            names=("alias|root",),
            timeout=120,
        ),
        Case(
            "I35",
            "issue-12",
            "a NUL byte in the recipe",
            RUN,
            lambda c: (c.w / "r.yaml").write_bytes(tiny_text.encode() + b"\x00\n"),
            names=("r.yaml",),
        ),
    ]


# --- the smaller findings -------------------------------------------------------------
def small_cases() -> list[Case]:
    def garbage(rel: str, text: str, *remove: str) -> Callable[[Ctx], None]:
        def setup(ctx: Ctx) -> None:
            out = copy_run(ctx, remove=remove)
            (out / rel).write_text(text)

        return setup

    def zero_masks(ctx: Ctx) -> None:
        import torch

        data = torch.load(ctx.base / "mcp.ckpt", weights_only=True)
        for key in data["state_dict"]:
            if key.startswith("admm.mask_"):
                data["state_dict"][key] = torch.zeros_like(data["state_dict"][key])
        torch.save(data, ctx.w / "mcp.ckpt")

    def nan_dense(ctx: Ctx) -> None:
        import torch

        data = torch.load(ctx.base / "dense.ckpt", weights_only=True)
        for key, value in data["state_dict"].items():
            if key.startswith("backbone") and value.is_floating_point():
                value.fill_(float("nan"))
        torch.save(data, ctx.w / "nan.ckpt")
        write_recipe(ctx)

    def gzip_bomb(ctx: Ctx) -> None:
        root = ctx.w / "fm"
        pl.fashion_mnist(root)
        (root / "train-images-idx3-ubyte").unlink()
        header = (2051).to_bytes(4, "big") + b"".join(
            d.to_bytes(4, "big") for d in (64, 28, 28)
        )
        pl.gzip_bomb(root / "train-images-idx3-ubyte.gz", header, 512)
        write_recipe(ctx, {"data.kind": "fashion_mnist", "data.root": str(root)})

    # What a SIGKILLed export leaves: its temporary folder with the marker file it
    # creates first (lightly_mcp.formats.export.TEMPORARY_MARKER) and a half-written
    # file. A folder without the marker may be the user's and is never deleted.
    def killed_export(folder: Path) -> None:
        from lightly_mcp.formats.export import TEMPORARY_MARKER

        folder.mkdir()
        (folder / TEMPORARY_MARKER).write_text("")
        (folder / "model.pt2").write_bytes(b"PK\x03\x04 half")

    def stale_export(ctx: Ctx) -> None:
        killed_export(ctx.w / ".export-k3j2x9")

    def stale_in_run(ctx: Ctx) -> None:
        out = copy_run(ctx, remove=("export", "eval", "report.json"))
        killed_export(out / ".export-q8w7e6")

    def dense_in_exp(ctx: Ctx) -> None:
        (ctx.w / "exp").mkdir()
        shutil.copy(ctx.base / "mcp.ckpt", ctx.w / "exp" / "mcp.ckpt")

    def user_folder(ctx: Ctx) -> None:
        (ctx.w / "exp").mkdir()
        (ctx.w / "exp" / "thesis.tex").write_text("mine")

    def shape_mismatch(ctx: Ctx) -> None:
        import torch

        data = torch.load(ctx.base / "dense.ckpt", weights_only=True)
        key = next(k for k in data["state_dict"] if k.endswith("weight"))
        data["state_dict"][key] = torch.zeros(3)
        torch.save(data, ctx.w / "dense.ckpt")

    def shipped_tampered(ctx: Ctx) -> None:
        src = ctx.repo / "pretrained" / "fashion_mnist_mobilenetv2_w0.5.ckpt"
        data = bytearray(src.read_bytes())
        data[len(data) // 2] ^= 0xFF
        (ctx.w / "ship.ckpt").write_bytes(bytes(data))
        meta = json.loads(
            src.with_name("fashion_mnist_mobilenetv2_w0.5.provenance.json").read_text()
        )
        (ctx.w / "ship.provenance.json").write_text(json.dumps(meta))

    def torn_last(ctx: Ctx) -> None:
        (ctx.w / "out" / "pretrain").mkdir(parents=True)
        data = (ctx.base / "run" / "pretrain" / "last.ckpt").read_bytes()
        (ctx.w / "out" / "pretrain" / "last.ckpt").write_bytes(data[: len(data) // 3])

    def payload_last(ctx: Ctx) -> None:
        (ctx.w / "out" / "pretrain").mkdir(parents=True)
        pl.torch_pickle(ctx.w / "out" / "pretrain" / "last.ckpt", ctx.marker)

    def other_recipe(ctx: Ctx) -> None:
        copy_run(ctx)
        write_recipe(ctx, {"mcp.pruning_ratio": 0.7})

    long_name = "o" * 300
    long_path = "/".join(["d" * 200] * 25)
    return [
        Case(
            "S01",
            "small",
            "garbage export/report.json in a run folder",
            FINISHED,
            garbage("export/report.json", "{garbage", "eval", "report.json"),
            names=("report.json",),
        ),
        Case(
            "S02",
            "small",
            "garbage eval/eval.json in a run folder",
            FINISHED,
            garbage("eval/eval.json", "garbage"),
            names=("eval.json",),
        ),
        Case(
            "S03",
            "small",
            "eval/eval.json holding a JSON list",
            FINISHED,
            garbage("eval/eval.json", "[1, 2]"),
            names=("eval.json",),
        ),
        Case(
            "S04",
            "small",
            "export/report.json holding a JSON list",
            FINISHED,
            garbage("export/report.json", "[]", "eval", "report.json"),
            names=("report.json",),
        ),
        Case(
            "S05",
            "small",
            "--out whose name is 300 characters",
            [*RUN[:3], "{w}/" + long_name, "--quiet"],
            recipe(),
            names=("out|name|long",),
        ),
        Case(
            "S06",
            "small",
            "--out 5,000 characters deep",
            [*RUN[:3], "{w}/" + long_path, "--quiet"],
            recipe(),
            names=("out|name|long",),
        ),
        Case(
            "S07",
            "small",
            "export an MCP checkpoint whose masks keep no channel",
            ["export", "{w}/mcp.ckpt", "--out", "{w}/exp", "--no-latency"],
            zero_masks,
            names=("mask|channel",),
        ),
        Case(
            "S08",
            "small",
            "eval.linear_epochs: 0",
            DRY,
            recipe({"eval.linear_epochs": 0}),
            names=("linear_epochs",),
        ),
        Case(
            "S09",
            "small",
            "export.latency_repeats: 0",
            DRY,
            recipe({"export.latency_repeats": 0, "export.latency": True}),
            names=("latency_repeats",),
        ),
        Case(
            "S10",
            "small",
            "mcp.max_steps: 0",
            DRY,
            recipe({"mcp.max_steps": 0}),
            names=("max_steps",),
        ),
        Case(
            "S11",
            "small",
            "pretrain.max_steps: 0",
            DRY,
            recipe({"pretrain.max_steps": 0}),
            names=("max_steps",),
        ),
        Case(
            "S12",
            "small",
            "the recipe argument is a folder",
            ["run", "{w}/rdir", "--out", "{w}/out"],
            lambda c: (c.w / "rdir").mkdir(),
            not_names=("does not exist",),
        ),
        Case(
            "S13",
            "small",
            "the recipe argument is a FIFO",
            ["run", "{w}/fifo", "--out", "{w}/out"],
            lambda c: os.mkfifo(c.w / "fifo"),
            not_names=("does not exist",),
            timeout=60,
        ),
        Case(
            "S14",
            "small",
            "prune --from a dense checkpoint with NaN weights (dry run)",
            [
                "prune",
                "{w}/r.yaml",
                "--from",
                "{w}/nan.ckpt",
                "--out",
                "{w}/out",
                "--quiet",
                "--dry-run",
            ],
            nan_dense,
            names=("nan.ckpt|NaN",),
            not_names=(r"\blr\b|learning rate|rho",),
        ),
        Case(
            "S15",
            "small",
            "fashion_mnist train images: a gzip bomb (512 MB of zeros)",
            DRY,
            gzip_bomb,
            names=("train-images",),
            timeout=180,
        ),
        Case(
            "S16",
            "small",
            "export next to a stale .export-XXXX/ left by a SIGKILL",
            ["export", "{base}/mcp.ckpt", "--out", "{w}/exp", "--no-latency"],
            stale_export,
            exit=(0,),
            check=absent(".export-*"),
        ),
        Case(
            "S17",
            "small",
            "run a folder holding a stale .export-XXXX/ left by a SIGKILL",
            FINISHED,
            stale_in_run,
            exit=(0,),
            check=absent("out/.export-*"),
        ),
        Case(
            "S18",
            "small",
            "evaluate a truncated model.pt2",
            [*EVALUATE[:1], "{w}/model.pt2", *EVALUATE[2:]],
            lambda c: pl.pt2_truncated(
                c.base / "export" / "model.pt2", c.w / "model.pt2"
            ),
            names=("model.pt2",),
        ),
        Case(
            "S19",
            "small",
            "evaluate a folder without model.pt2",
            [*EVALUATE[:1], "{w}/e", *EVALUATE[2:]],
            lambda c: (c.w / "e").mkdir(),
            names=("model.pt2",),
        ),
        Case(
            "S20",
            "small",
            "export a dense (not MCP) checkpoint",
            ["export", "{base}/dense.ckpt", "--out", "{w}/exp", "--no-latency"],
            None,
            names=("dense.ckpt",),
        ),
        Case(
            "S21",
            "small",
            "export into the folder holding the checkpoint",
            ["export", "{w}/exp/mcp.ckpt", "--out", "{w}/exp", "--no-latency"],
            dense_in_exp,
            names=("exp",),
        ),
        Case(
            "S22",
            "small",
            "export --overwrite onto a user's folder",
            [
                "export",
                "{base}/mcp.ckpt",
                "--out",
                "{w}/exp",
                "--no-latency",
                "--overwrite",
            ],
            user_folder,
            names=("thesis.tex|overwrite",),
        ),
        Case(
            "S23",
            "small",
            "prune --from a checkpoint with a tensor of the wrong shape",
            [
                "prune",
                "{base}/recipe.yaml",
                "--from",
                "{w}/dense.ckpt",
                "--out",
                "{w}/out",
                "--quiet",
            ],
            shape_mismatch,
            names=("dense.ckpt|shape",),
        ),
        Case(
            "S24",
            "small",
            "prune --from a shipped checkpoint that fails its sha256",
            [
                "prune",
                "{base}/recipe.yaml",
                "--from",
                "{w}/ship.ckpt",
                "--out",
                "{w}/out",
                "--quiet",
            ],
            shipped_tampered,
            names=("ship.ckpt|sha256",),
        ),
        Case(
            "S25",
            "small",
            "pretrain resumes from a truncated last.ckpt",
            [
                "pretrain",
                "{base}/recipe.yaml",
                "--out",
                "{w}/out",
                "--quiet",
                "--no-preflight",
            ],
            torn_last,
            names=("last.ckpt",),
        ),
        Case(
            "S26",
            "small",
            "pretrain resumes from a last.ckpt that is a pickle payload",
            [
                "pretrain",
                "{base}/recipe.yaml",
                "--out",
                "{w}/out",
                "--quiet",
                "--no-preflight",
            ],
            payload_last,
            names=("last.ckpt",),
        ),
        Case(
            "S27",
            "small",
            "run a finished folder with another mcp.pruning_ratio",
            RUN,
            other_recipe,
            names=("pruning_ratio",),
        ),
        Case(
            "S28",
            "small",
            "run a folder whose prune/recipe.yaml record is garbage",
            FINISHED,
            garbage(
                "prune/recipe.yaml",
                "{[ garbage",
                "prune/done.json",
                "prune/final.ckpt",
                "export",
                "eval",
                "report.json",
            ),
            names=("recipe",),
        ),
    ]


# --- pickles with payloads ------------------------------------------------------------
def pickle_cases() -> list[Case]:
    def payload(
        name: str = "evil.ckpt", kind: str = "checkpoint"
    ) -> Callable[[Ctx], None]:
        return lambda c: pl.torch_pickle(c.w / name, c.marker, kind)

    def cifar(entry: str) -> Callable[[Ctx], None]:
        def setup(ctx: Ctx) -> None:
            folder = ctx.w / "c10" / "cifar-10-batches-py"
            folder.mkdir(parents=True)
            import pickle

            import numpy as np

            rows = np.zeros((4, 3072), dtype=np.uint8)
            for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
                with open(folder / name, "wb") as f:
                    pickle.dump({"data": rows, "labels": [0, 1, 2, 3]}, f)
            with open(folder / "batches.meta", "wb") as f:
                pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
            pl.plain_pickle(folder / entry, ctx.marker)
            write_recipe(
                ctx,
                {
                    "data.kind": "cifar10",
                    "data.root": str(ctx.w / "c10"),
                    "data.input_size": 16,
                },
            )

        return setup

    return [
        Case(
            "P01",
            "pickle",
            "evaluate a .ckpt pickle payload",
            [*EVALUATE[:1], "{w}/evil.ckpt", *EVALUATE[2:]],
            payload(),
        ),
        Case(
            "P02",
            "pickle",
            "evaluate a .pt pickle payload (bare object)",
            [*EVALUATE[:1], "{w}/model.pt", *EVALUATE[2:]],
            payload("model.pt", "bare"),
        ),
        Case(
            "P03",
            "pickle",
            "evaluate a pickle payload named model.pt2",
            [*EVALUATE[:1], "{w}/model.pt2", *EVALUATE[2:]],
            payload("model.pt2", "bare"),
        ),
        Case(
            "P04",
            "pickle",
            "export a pickle payload",
            ["export", "{w}/evil.ckpt", "--out", "{w}/exp", "--no-latency"],
            payload(),
        ),
        Case(
            "P05",
            "pickle",
            "inspect a pickle payload",
            ["inspect", "{w}/evil.ckpt"],
            payload(),
        ),
        Case(
            "P06",
            "pickle",
            "prune --from a pickle payload",
            [
                "prune",
                "{base}/recipe.yaml",
                "--from",
                "{w}/evil.ckpt",
                "--out",
                "{w}/out",
                "--quiet",
            ],
            payload(),
        ),
        Case(
            "P07",
            "pickle",
            "pretrain.dense_checkpoint: a pickle payload",
            RUN,
            both(payload(), recipe({"pretrain.dense_checkpoint": "{w}/evil.ckpt"})),
        ),
        Case(
            "P08",
            "pickle",
            "backbone.weights: a state dict holding a payload",
            DRY,
            both(
                payload("w.pt", "state_dict"), recipe({"backbone.weights": "{w}/w.pt"})
            ),
        ),
        Case(
            "P09",
            "pickle",
            "evaluate --trust-pickle with a missing recipe: checked before unpickling",
            [
                "evaluate",
                "{w}/evil.ckpt",
                "{w}/none.yaml",
                "--out",
                "{w}/ev",
                "--trust-pickle",
            ],
            payload(),
            names=("none.yaml",),
        ),
        Case(
            "P10",
            "pickle",
            "cifar10 data_batch_1 is a pickle payload",
            DRY,
            cifar("data_batch_1"),
        ),
        Case(
            "P11",
            "pickle",
            "cifar10 batches.meta is a pickle payload",
            DRY,
            cifar("batches.meta"),
        ),
        Case(
            "P12",
            "pickle",
            "evaluate a payload in the sample-inputs entry of a model.pt2",
            [*EVALUATE[:1], "{w}/model.pt2", *EVALUATE[2:]],
            lambda c: pl.pt2_pickled_sample(
                c.base / "export" / "model.pt2", c.w / "model.pt2", c.marker
            ),
        ),
    ]


# --- wrong kinds of file --------------------------------------------------------------
KINDS: dict[str, str] = {
    "folder": "an empty folder",
    "fifo": "a FIFO",
    "devzero": "/dev/zero",
    "empty": "an empty file",
    "random": "4 KB of random bytes",
    "zip": "a zip of a text file",
    "json": "a JSON file",
    "onnx": "an ONNX file of garbage",
}


def make_kind(ctx: Ctx, kind: str, name: str) -> str:
    """Creates a file of ``kind`` at ``w/name``; the path to pass."""
    path = ctx.w / name
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "devzero":
        return "/dev/zero"
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "zip":
        pl.zip_of(path, {"readme.txt": b"hello"})
    elif kind == "json":
        path.write_text(json.dumps({"state_dict": {"a": 1}}))
    elif kind == "onnx":
        path = path.with_suffix(".onnx")
        path.write_bytes(b"\x08\x07\x12\x07pytorch" + os.urandom(512))
    return str(path)


def file_kind_cases() -> list[Case]:
    cases = []
    targets = {
        "evaluate": lambda p: [
            "evaluate",
            p,
            "{base}/recipe.yaml",
            "--out",
            "{w}/ev",
            "--quiet",
        ],
        "export": lambda p: ["export", p, "--out", "{w}/exp", "--no-latency"],
        "inspect": lambda p: ["inspect", p],
        "from": lambda p: [
            "prune",
            "{base}/recipe.yaml",
            "--from",
            p,
            "--out",
            "{w}/out",
            "--quiet",
        ],
        "dense_checkpoint": lambda p: RUN,
        "weights": lambda p: DRY,
    }
    for target, argv_of in targets.items():
        for kind, what in KINDS.items():

            def setup(ctx: Ctx, kind: str = kind, target: str = target) -> None:
                path = make_kind(ctx, kind, "x.ckpt")
                if target == "dense_checkpoint":
                    write_recipe(ctx, {"pretrain.dense_checkpoint": path})
                elif target == "weights":
                    write_recipe(ctx, {"backbone.weights": path})

            placeholder = (
                "/dev/zero"
                if kind == "devzero"
                else ("{w}/x.onnx" if kind == "onnx" else "{w}/x.ckpt")
            )
            cases.append(
                Case(
                    f"F-{target}-{kind}",
                    "file-kind",
                    f"{'--' if target == 'from' else ''}{target}: {what}",
                    argv_of(placeholder),
                    setup,
                    timeout=90,
                    names=() if kind == "devzero" else (r"x\.(ckpt|onnx)",),
                    not_names=("does not exist",),
                )
            )
    # the recipe argument and --out
    for kind in ("devzero", "empty", "random", "zip"):
        cases.append(
            Case(
                f"F-recipe-{kind}",
                "file-kind",
                f"the recipe is {KINDS[kind]}",
                [
                    "run",
                    "/dev/zero" if kind == "devzero" else "{w}/x.yaml",
                    "--out",
                    "{w}/out",
                ],
                lambda c, k=kind: make_kind(c, k, "x.yaml") and None,
                timeout=60,
                not_names=("does not exist",),
            )
        )
    cases += [
        Case(
            "F-recipe-jsonlist",
            "file-kind",
            "the recipe is a JSON list",
            RUN,
            recipe(text="[1, 2, 3]"),
            names=("mapping|r.yaml",),
        ),
        Case(
            "F-out-file",
            "file-kind",
            "--out is an existing file",
            [*RUN[:3], "{w}/f", "--quiet"],
            both(recipe(), lambda c: (c.w / "f").write_text("x")),
            names=("file",),
        ),
        Case(
            "F-out-under-file",
            "file-kind",
            "--out lies under a file",
            [*RUN[:3], "{w}/f/out", "--quiet"],
            both(recipe(), lambda c: (c.w / "f").write_text("x")),
            names=("file",),
        ),
        Case(
            "F-out-fifo",
            "file-kind",
            "--out is a FIFO",
            [*RUN[:3], "{w}/p", "--quiet"],
            both(recipe(), lambda c: os.mkfifo(c.w / "p")),
            timeout=60,
        ),
        Case(
            "F-out-devnull",
            "file-kind",
            "--out is /dev/null",
            [*RUN[:3], "/dev/null", "--quiet"],
            recipe(),
            timeout=60,
        ),
        Case(
            "F-out-proc",
            "file-kind",
            "--out under /proc (not writable)",
            [*RUN[:3], "/proc/lmsweep", "--quiet"],
            recipe(),
            timeout=60,
        ),
        Case(
            "F-export-out-file",
            "file-kind",
            "export --out is an existing file",
            ["export", "{base}/mcp.ckpt", "--out", "{w}/f", "--no-latency"],
            lambda c: (c.w / "f").write_text("x"),
            names=("file|folder",),
        ),
    ]
    return cases


# --- torch.export archives and TorchScript --------------------------------------------
def pt2_cases() -> list[Case]:
    src = "export/model.pt2"

    def tamper(fn: Callable[..., None], *extra: Any) -> Callable[[Ctx], None]:
        return lambda c: fn(
            c.base / src,
            c.w / "model.pt2",
            *[c.marker if e == "marker" else e for e in extra],
        )

    ev = [*EVALUATE[:1], "{w}/model.pt2", *EVALUATE[2:]]
    return [
        Case(
            "T01",
            "pt2",
            "model.pt2 with an unknown field in its program JSON",
            ev,
            tamper(pl.pt2_unknown_field),
            exit=(0, 2),
        ),
        Case(
            "T02",
            "pt2",
            "model.pt2 whose program JSON is not JSON",
            ev,
            tamper(pl.pt2_garbage_json),
            names=("model.pt2",),
        ),
        Case(
            "T03",
            "pt2",
            "model.pt2 without its weight files",
            ev,
            tamper(pl.pt2_drop_weights),
            names=("model.pt2",),
        ),
        Case(
            "T04",
            "pt2",
            "model.pt2 with a weight file cut to 4 bytes",
            ev,
            tamper(pl.pt2_wrong_weight),
            names=("model.pt2",),
        ),
        Case(
            "T05",
            "pt2",
            "model.pt2 cut to its first 10%",
            ev,
            tamper(pl.pt2_truncated, 0.1),
            names=("model.pt2",),
        ),
        Case(
            "T06",
            "pt2",
            "model.pt2 cut just before its end (central directory gone)",
            ev,
            tamper(pl.pt2_truncated, 0.999),
            names=("model.pt2",),
        ),
        Case(
            "T07",
            "pt2",
            "model.pt2 that is an empty zip",
            ev,
            lambda c: pl.zip_of(c.w / "model.pt2", {}),
            names=("model.pt2",),
        ),
        Case(
            "T08",
            "pt2",
            "model.pt2 guards_code payload via inspect",
            ["inspect", "{w}/model.pt2"],
            tamper(pl.pt2_guards, "marker"),
            names=("model.pt2",),
        ),
        Case(
            "T09",
            "pt2",
            "model.pt2 guards_code payload via export",
            ["export", "{w}/model.pt2", "--out", "{w}/exp", "--no-latency"],
            tamper(pl.pt2_guards, "marker"),
            names=("model.pt2",),
        ),
        Case(
            "T10",
            "pt2",
            "model.pt2 guards_code payload via prune --from",
            [
                "prune",
                "{base}/recipe.yaml",
                "--from",
                "{w}/model.pt2",
                "--out",
                "{w}/out",
                "--quiet",
            ],
            tamper(pl.pt2_guards, "marker"),
            names=("model.pt2",),
        ),
        Case(
            "TS1",
            "torchscript",
            "inspect a hostile TorchScript file",
            ["inspect", "{w}/m.ts"],
            lambda c: pl.torchscript(c.w / "m.ts", c.marker),
            names=("m.ts",),
        ),
        Case(
            "TS2",
            "torchscript",
            "export a hostile TorchScript file",
            ["export", "{w}/m.ts", "--out", "{w}/exp", "--no-latency"],
            lambda c: pl.torchscript(c.w / "m.ts", c.marker),
            names=("m.ts",),
        ),
        Case(
            "TS3",
            "torchscript",
            "prune --from a hostile TorchScript file",
            [
                "prune",
                "{base}/recipe.yaml",
                "--from",
                "{w}/m.ts",
                "--out",
                "{w}/out",
                "--quiet",
            ],
            lambda c: pl.torchscript(c.w / "m.ts", c.marker),
            names=("m.ts",),
        ),
        Case(
            "TS4",
            "torchscript",
            "backbone.weights: a hostile TorchScript file",
            DRY,
            both(
                lambda c: pl.torchscript(c.w / "m.ts", c.marker),
                recipe({"backbone.weights": "{w}/m.ts"}),
            ),
            names=("m.ts",),
        ),
        Case(
            "TS5",
            "torchscript",
            "evaluate a hostile TorchScript file named .ckpt",
            [*EVALUATE[:1], "{w}/m.ckpt", *EVALUATE[2:]],
            lambda c: pl.torchscript(c.w / "m.ckpt", c.marker),
            names=("m.ckpt",),
        ),
    ]


# --- recipe keys ----------------------------------------------------------------------
def all_keys() -> list[str]:
    from lightly_mcp.app.recipe import Recipe

    keys = []
    for section, value in Recipe().to_dict().items():
        if isinstance(value, dict):
            keys += [f"{section}.{key}" for key in value]
        else:
            keys.append(section)
    return keys


RANGE: list[tuple[str, Any, str]] = [
    ("data.input_size", 0, "zero"),
    ("data.input_size", 100000, "huge (10^5 px)"),
    ("data.subset", 0, "zero"),
    ("data.num_workers", -1, "negative"),
    ("data.num_workers", 100000, "huge"),
    ("data.min_scale", 0.0, "zero"),
    ("data.min_scale", 1.5, "above 1"),
    ("data.kind", "bogus", "unknown"),
    ("data.kind", "imagefolder", "imagefolder without root"),
    ("data.root", "/nonexistent/data", "missing folder (fashion_mnist)"),
    ("backbone.name", "bogus/net", "unknown"),
    ("backbone.name", "timm/nonexistent_model_xyz", "unknown timm model"),
    ("backbone.width_multiplier", 0.0, "zero"),
    ("backbone.width_multiplier", 1000.0, "huge"),
    ("backbone.weights", "/nonexistent/w.pt", "missing file"),
    ("pretrain.epochs", 0, "zero"),
    ("pretrain.batch_size", 0, "zero"),
    ("pretrain.batch_size", 10**9, "huge"),
    ("pretrain.lr", 0.0, "zero"),
    ("pretrain.lr", float("nan"), "NaN"),
    ("pretrain.lr", float("inf"), "infinite"),
    ("pretrain.weight_decay", -1.0, "negative"),
    ("pretrain.weight_decay", float("nan"), "NaN"),
    ("pretrain.temperature", 0.0, "zero"),
    ("pretrain.temperature", float("nan"), "NaN"),
    ("pretrain.momentum", 1.5, "above 1"),
    ("pretrain.momentum", float("nan"), "NaN"),
    ("pretrain.memory_bank_size", -1, "negative"),
    ("pretrain.memory_bank_size", 10**12, "huge"),
    ("pretrain.projection_hidden_dim", 0, "zero"),
    ("pretrain.projection_dim", 0, "zero"),
    ("pretrain.projection_dim", 10**9, "huge"),
    ("pretrain.split_batch_norm", -1, "negative"),
    ("pretrain.split_batch_norm", 3, "not a divisor of the batch"),
    ("pretrain.warmup_epochs", -1, "negative"),
    ("pretrain.keep_every_n_epochs", -1, "negative"),
    ("pretrain.dense_checkpoint", "/nonexistent/d.ckpt", "missing file"),
    ("mcp.pruning_ratio", 1.0, "1.0"),
    ("mcp.pruning_ratio", -0.1, "negative"),
    ("mcp.pruning_ratio", float("nan"), "NaN"),
    ("mcp.target_params", 0.0, "zero (with pruning_ratio null)"),
    ("mcp.rho", -1.0, "negative"),
    ("mcp.rho", float("nan"), "NaN"),
    ("mcp.rho", 1e38, "huge"),
    ("mcp.rho_growth", 0.5, "below 1"),
    ("mcp.rho_response", -1.0, "negative"),
    ("mcp.admm_interval", 0, "zero"),
    ("mcp.admm_interval_unit", "hours", "unknown"),
    ("mcp.lr_schedule", "bogus", "unknown"),
    ("mcp.frozen_blocks", -1, "negative"),
    ("mcp.frozen_mask", "bogus", "unknown"),
    ("mcp.transition", "bogus", "unknown"),
    ("mcp.frq", -1, "negative"),
    ("mcp.dr", -1, "negative"),
    ("mcp.recalibration_batches", -1, "negative"),
    ("mcp.lr", -0.1, "negative"),
    ("mcp.weight_decay", -1.0, "negative"),
    ("mcp.epochs", 0, "zero"),
    ("mcp.batch_size", 0, "zero"),
    ("export.round_to", 0, "zero"),
    ("export.round_to", -8, "negative"),
    ("eval.k", 0, "zero"),
    ("eval.temperature", 0.0, "zero"),
    ("eval.linear_epochs", -1, "negative"),
    ("eval.batch_size", 0, "zero"),
    ("eval.train_subset", 0, "zero"),
    ("eval.test_subset", 0, "zero"),
    ("eval.test_subset", -5, "negative"),
    ("trainer.devices", 0, "zero"),
    ("trainer.devices", "abc", "not a number"),
    ("trainer.log_every_n_steps", 0, "zero"),
    ("trainer.log_every_n_steps", -1, "negative"),
    ("trainer.accelerator", "cuda", "CUDA on a machine without a GPU"),
]

EMPTY: list[tuple[str, Any]] = [
    ("data.kind", ""),
    ("backbone.name", ""),
    ("trainer.accelerator", ""),
    ("trainer.precision", ""),
    ("mcp.lr_schedule", ""),
    ("data.root", ""),
    ("pretrain.dense_checkpoint", ""),
    ("backbone.weights", ""),
]


def key_cases() -> list[Case]:
    cases = []
    for key in all_keys():
        cases.append(
            Case(
                f"K-type-{key}",
                "key-type",
                f"{key}: a list [1, 2]",
                RUN,
                recipe({key: [1, 2]}),
                names=(key.split(".")[-1],),
            )
        )
    for i, (key, value, what) in enumerate(RANGE, 1):
        overrides = {key: value}
        name = key.split(".")[-1].replace("_", "[_ ]")
        if key == "mcp.target_params":
            overrides["mcp.pruning_ratio"] = None
        if key == "data.root":
            overrides["data.kind"] = "fashion_mnist"
        if (key, value) == ("data.kind", "imagefolder"):
            name = "root"
        # 0 is a documented value (no step metrics; Lightning's own meaning of it).
        valid = (key, value) == ("trainer.log_every_n_steps", 0)
        cases.append(
            Case(
                f"K-range-{i:02d}",
                "key-range",
                f"{key}: {what} ({value!r})",
                DRY,
                recipe(overrides),
                names=(name,),
                timeout=240,
                **({"exit": (0,)} if valid else {}),
            )
        )
    for i, (key, value) in enumerate(EMPTY, 1):
        cases.append(
            Case(
                f"K-empty-{i}",
                "key-empty",
                f"{key}: '' (empty string)",
                DRY,
                recipe({key: value}),
                names=(key.split(".")[-1],),
            )
        )
    tiny_text = yaml.safe_dump(TINY, sort_keys=False)
    cases += [
        Case(
            "K-empty-section",
            "key-empty",
            "mcp: (an empty section)",
            RUN,
            recipe(text=tiny_text.replace("mcp:\n", "mcp:\nold_mcp:\n")),
            names=("old_mcp|mcp",),
        ),
        Case(
            "K-empty-file",
            "key-empty",
            "an empty recipe file",
            RUN,
            recipe(text=""),
            names=("empty",),
        ),
        Case(
            "K-empty-comment",
            "key-empty",
            "a recipe of only a comment",
            RUN,
            recipe(text="# nothing here\n"),
            names=("empty",),
        ),
        Case(
            "K-unknown-section",
            "key-type",
            "an unknown top-level section",
            RUN,
            recipe(text=tiny_text + "optimizer:\n  lr: 1\n"),
            names=("optimizer",),
        ),
        Case(
            "K-unknown-key",
            "key-type",
            "an unknown key in mcp",
            RUN,
            recipe(
                text=tiny_text.replace("  frq: 2", "  frq: 2\n  pruning_ration: 0.3")
            ),
            names=("pruning_ration",),
        ),
        Case(
            "K-python-tag",
            "key-type",
            "a !!python/object/apply tag in the recipe",
            RUN,
            recipe(
                text="seed: !!python/object/apply:os.system ['touch {s}/pwned']\n"
                + tiny_text.replace("seed: 0\n", "")
            ),
            names=("r.yaml",),
        ),
        Case(
            "K-bool-int",
            "key-type",
            "data.subset: true (a bool for an int)",
            RUN,
            recipe({"data.subset": True}),
            names=("subset",),
        ),
        Case(
            "K-str-float",
            "key-type",
            "mcp.pruning_ratio: 'half'",
            RUN,
            recipe({"mcp.pruning_ratio": "half"}),
            names=("pruning_ratio",),
        ),
        Case(
            "K-both-ratio",
            "key-range",
            "both mcp.pruning_ratio and mcp.target_params",
            RUN,
            recipe({"mcp.target_params": 0.5}),
            names=("target_params",),
        ),
    ]
    return cases


# --- --set, argv, paths ---------------------------------------------------------------
def argv_cases() -> list[Case]:
    r = recipe()
    sets = [
        ("foo", "no '='"),
        ("=1", "empty key"),
        (".=1", "key '.'"),
        ("mcp.=1", "empty key in a section"),
        ("mcp..lr=1", "empty middle key"),
        ("mcp.pruning_ratio=[", "unparsable YAML value"),
        ("nosuch.key=1", "unknown section"),
        ("mcp=5", "a section replaced by a scalar"),
        ("seed.x=1", "a value used as a section"),
        (
            "mcp.pruning_ratio=!!python/object/apply:os.system ['touch {s}/pwned']",
            "a python tag",
        ),
        ("data.root=&a [*a]", "a self-referencing alias"),
        ("mcp.lr=1e400", "a float overflowing to inf"),
        ("mcp.pruning_ratio=0.5=0.6", "two '='"),
        ("\u00fcber.key=1", "a non-ASCII section"),
    ]
    cases = [
        Case(
            f"X{i:02d}",
            "set",
            f"--set {text!r}: {what}",
            [*RUN, "--set", text],
            r,
            timeout=120,
        )
        for i, (text, what) in enumerate(sets, 1)
    ]
    cases += [
        Case("A01", "argv", "an unknown subcommand", ["bogus"], None),
        Case("A02", "argv", "an unknown flag", [*RUN, "--bogus"], r),
        Case("A03", "argv", "run without a recipe", ["run", "--out", "{w}/out"], None),
        Case("A04", "argv", "run without --out", ["run", "{w}/r.yaml"], r),
        Case(
            "A05",
            "argv",
            "--devices abc",
            [*RUN, "--devices", "abc"],
            r,
            names=("devices",),
        ),
        Case(
            "A06",
            "argv",
            "--devices 0",
            [*RUN, "--devices", "0"],
            r,
            names=("devices",),
        ),
        Case(
            "A07",
            "argv",
            "--device tpu",
            [*RUN, "--device", "tpu", "--dry-run"],
            r,
            names=("device|tpu",),
        ),
        Case(
            "A08",
            "argv",
            "--device cuda without a GPU",
            [*RUN, "--device", "cuda"],
            r,
            names=("cuda",),
        ),
        Case(
            "A09",
            "argv",
            "export --round-to 0",
            [
                "export",
                "{base}/mcp.ckpt",
                "--out",
                "{w}/exp",
                "--no-latency",
                "--round-to",
                "0",
            ],
            None,
            names=("round",),
        ),
        Case(
            "A10",
            "argv",
            "export --round-to -8",
            [
                "export",
                "{base}/mcp.ckpt",
                "--out",
                "{w}/exp",
                "--no-latency",
                "--round-to",
                "-8",
            ],
            None,
            names=("round",),
        ),
        Case(
            "A11",
            "argv",
            "export --round-to abc",
            ["export", "{base}/mcp.ckpt", "--out", "{w}/exp", "--round-to", "abc"],
            None,
            names=("round",),
        ),
        Case(
            "A12",
            "argv",
            "no arguments at all (help, exit 2)",
            [],
            None,
            error_line=False,
        ),
        Case("A13", "argv", "smoke with an extra argument", ["smoke", "extra"], None),
        Case(
            "A14",
            "argv",
            "inspect a missing file",
            ["inspect", "{w}/none.ckpt"],
            None,
            names=("none.ckpt",),
        ),
        Case(
            "A15",
            "argv",
            "evaluate with a missing recipe",
            ["evaluate", "{base}/mcp.ckpt", "{w}/none.yaml", "--out", "{w}/ev"],
            None,
            names=("none.yaml",),
        ),
        Case(
            "A16",
            "argv",
            "--devices '0,,1'",
            [*RUN, "--devices", "0,,1"],
            r,
            names=("devices",),
        ),
    ]
    bad_bytes = os.fsdecode(b"r\xff\xfe.yaml")
    cases += [
        Case(
            "U01",
            "path",
            "a recipe path with non-ASCII characters and a bad key",
            ["run", "{w}/réçïpé-日本.yaml", "--out", "{w}/out"],
            lambda c: (c.w / "réçïpé-日本.yaml").write_text("seed: x\n"),
            names=("seed",),
        ),
        Case(
            "U02",
            "path",
            "a recipe path that is not valid UTF-8, with a bad key",
            ["run", "{w}/" + bad_bytes, "--out", "{w}/out"],
            lambda c: (c.w / bad_bytes).write_text("seed: x\n"),
            names=("seed",),
        ),
        Case(
            "U03",
            "path",
            "a recipe path 300 characters long (one component)",
            ["run", "{w}/" + "r" * 300 + ".yaml", "--out", "{w}/out"],
            None,
            names=("rrrr",),
        ),
        Case(
            "U04",
            "path",
            "--out with non-ASCII characters under a file",
            ["run", "{w}/r.yaml", "--out", "{w}/f/ünïcödé", "--quiet"],
            both(r, lambda c: (c.w / "f").write_text("x")),
            names=("file",),
        ),
        Case(
            "U05",
            "path",
            "a checkpoint path with a newline in its name",
            ["inspect", "{w}/bad\nname.ckpt"],
            lambda c: (c.w / "bad\nname.ckpt").write_bytes(b"junk"),
        ),
        Case(
            "U06",
            "path",
            "data.root with ~ of a missing user",
            DRY,
            recipe({"data.kind": "imagefolder", "data.root": "~nosuchuser/x"}),
            names=("root|nosuchuser",),
        ),
    ]
    return cases


# --- datasets -------------------------------------------------------------------------
def data_cases() -> list[Case]:
    def fm(
        override: dict[str, bytes] | None = None, **kwargs: Any
    ) -> Callable[[Ctx], None]:
        def setup(ctx: Ctx) -> None:
            pl.fashion_mnist(ctx.w / "fm", override=override, **kwargs)
            write_recipe(
                ctx, {"data.kind": "fashion_mnist", "data.root": str(ctx.w / "fm")}
            )

        return setup

    img = "train-images-idx3-ubyte"
    lab = "train-labels-idx1-ubyte"

    def imagefolder(build: Callable[[Path], None]) -> Callable[[Ctx], None]:
        def setup(ctx: Ctx) -> None:
            root = ctx.w / "imgs"
            root.mkdir()
            build(root)
            write_recipe(ctx, {"data.kind": "imagefolder", "data.root": str(root)})

        return setup

    def classes(
        root: Path, n: int = 10, bad: Callable[[Path], None] | None = None
    ) -> None:
        for c in ("cat", "dog"):
            (root / c).mkdir()
            for i in range(n):
                pl.png(root / c / f"{i}.png", seed=i)
        if bad is not None:
            bad(root)

    def corrupt_all(root: Path) -> None:
        for c in ("cat", "dog"):
            (root / c).mkdir()
            for i in range(10):
                (root / c / f"{i}.png").write_bytes(b"\x89PNG garbage" + os.urandom(64))

    def loop(root: Path) -> None:
        classes(root)
        (root / "cat" / "loop").symlink_to(root)

    def stl(ctx: Ctx) -> None:
        folder = ctx.w / "stl" / "stl10_binary"
        folder.mkdir(parents=True)
        for name in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"):
            (folder / name).write_bytes(os.urandom(1000))
        write_recipe(ctx, {"data.kind": "stl10", "data.root": str(ctx.w / "stl")})

    def cifar_random(ctx: Ctx) -> None:
        folder = ctx.w / "c10" / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + [
            "test_batch",
            "batches.meta",
        ]:
            (folder / name).write_bytes(os.urandom(512))
        write_recipe(ctx, {"data.kind": "cifar10", "data.root": str(ctx.w / "c10")})

    return [
        Case(
            "D01",
            "data",
            "fashion_mnist: images idx with a wrong magic number",
            DRY,
            fm({img: pl.idx_bytes((64, 28, 28), 2049)}),
            names=(img,),
        ),
        Case(
            "D02",
            "data",
            "fashion_mnist: images idx of 3 bytes",
            DRY,
            fm({img: b"\x00\x00\x08"}),
            names=(img,),
        ),
        Case(
            "D03",
            "data",
            "fashion_mnist: images idx with a truncated header",
            DRY,
            fm({img: (2051).to_bytes(4, "big") + b"\x00\x00"}),
            names=(img,),
        ),
        Case(
            "D04",
            "data",
            "fashion_mnist: images idx with more data than its header says",
            DRY,
            fm({img: pl.idx_bytes((64, 28, 28), 2051) + bytes(10000)}),
            names=(img,),
        ),
        Case(
            "D05",
            "data",
            "fashion_mnist: images idx with less data than its header says",
            DRY,
            fm({img: pl.idx_bytes((64, 28, 28), 2051)[:-100]}),
            names=(img,),
        ),
        Case(
            "D06",
            "data",
            "fashion_mnist: images idx whose header claims 2^32-1 images",
            DRY,
            fm({img: pl.idx_bytes((2**32 - 1, 28, 28), 2051, b"")}),
            names=(img,),
        ),
        Case(
            "D07",
            "data",
            "fashion_mnist: a .gz that is not gzip",
            DRY,
            fm({img + ".gz": b"not gzip at all"}),
            names=(img,),
        ),
        Case(
            "D08",
            "data",
            "fashion_mnist: 64 images, 10 labels",
            DRY,
            fm({lab: pl.idx_bytes((10,), 2049)}),
            names=("labels|images",),
        ),
        Case(
            "D09",
            "data",
            "fashion_mnist: a label out of range (200)",
            DRY,
            fm(labels=bytes([200] * 64)),
            names=("label",),
        ),
        Case(
            "D10",
            "data",
            "fashion_mnist: zero images",
            DRY,
            fm(n=0),
            names=("fashion|image|subset",),
        ),
        Case(
            "D11",
            "data",
            "fashion_mnist: 1x1-pixel images",
            DRY,
            fm(size=1),
            exit=(0, 2),
        ),
        Case(
            "D12",
            "data",
            "fashion_mnist: images idx is a FIFO",
            DRY,
            both(
                fm(),
                lambda c: (
                    ((c.w / "fm" / img).unlink(), os.mkfifo(c.w / "fm" / img)) and None
                ),
            ),
            timeout=90,
            names=(img,),
        ),
        Case(
            "D13",
            "data",
            "imagefolder: an empty folder",
            DRY,
            imagefolder(lambda r: None),
            names=("imgs",),
        ),
        Case(
            "D14",
            "data",
            "imagefolder: only text files",
            DRY,
            imagefolder(
                lambda r: [(r / f"{i}.txt").write_text("x") for i in range(5)] and None
            ),
            names=("imgs",),
        ),
        Case(
            "D15",
            "data",
            "imagefolder: every image corrupt",
            DRY,
            imagefolder(corrupt_all),
            names=("imgs",),
        ),
        Case(
            "D16",
            "data",
            "imagefolder: root is a file",
            DRY,
            both(
                lambda c: (c.w / "imgs").write_text("x"),
                recipe({"data.kind": "imagefolder", "data.root": "{w}/imgs"}),
            ),
            names=("imgs",),
        ),
        Case(
            "D17",
            "data",
            "imagefolder: a FIFO named x.png among the images",
            DRY,
            imagefolder(
                lambda r: classes(r, bad=lambda q: os.mkfifo(q / "cat" / "x.png"))
            ),
            timeout=90,
            exit=(0, 2),
        ),
        Case(
            "D18",
            "data",
            "imagefolder: a PNG declaring 60000x60000 pixels",
            DRY,
            imagefolder(
                lambda r: classes(r, bad=lambda q: pl.png_bomb(q / "cat" / "bomb.png"))
            ),
            exit=(0, 2),
            timeout=180,
        ),
        Case(
            "D19",
            "data",
            "imagefolder: a symlink loop",
            DRY,
            imagefolder(loop),
            exit=(0, 2),
            timeout=120,
        ),
        Case(
            "D20",
            "data",
            "imagefolder: zero-byte images",
            DRY,
            imagefolder(
                lambda r: classes(
                    r,
                    n=0,
                    bad=lambda q: (
                        [
                            (q / c / f"{i}.png").write_bytes(b"")
                            for c in ("cat", "dog")
                            for i in range(5)
                        ]
                        and None
                    ),
                )
            ),
            names=("imgs",),
        ),
        Case(
            "D21",
            "data",
            "cifar10: batches of random bytes",
            DRY,
            cifar_random,
            names=("cifar",),
        ),
        Case(
            "D22",
            "data",
            "cifar10: folder missing",
            DRY,
            recipe({"data.kind": "cifar10", "data.root": "{w}/none"}),
            names=("cifar",),
        ),
        Case(
            "D23", "data", "stl10: binaries of random bytes", DRY, stl, names=("stl",)
        ),
    ]


# --- signals, run folders and controls ------------------------------------------------
def other_cases() -> list[Case]:
    long_pretrain = [
        "pretrain",
        "{w}/r.yaml",
        "--out",
        "{w}/out",
        "--quiet",
        "--no-preflight",
    ]
    return [
        Case(
            "G01",
            "signal",
            "Ctrl-C during the preflight (dry run, after 3 s)",
            DRY,
            recipe(),
            exit=(130,),
            during=(after(3.0), sigint),
            may_change=("**",),
        ),
        Case(
            "G02",
            "signal",
            "Ctrl-C during training (after the first epoch's last.ckpt)",
            long_pretrain,
            recipe({"pretrain.epochs": 200}),
            exit=(130,),
            may_change=("**",),
            during=(appears("out/pretrain/last.ckpt", 1.0), sigint),
            check=readable_checkpoints,
        ),
        Case(
            "G03",
            "signal",
            "Ctrl-C during export (once .export-* exists)",
            ["export", "{base}/mcp.ckpt", "--out", "{w}/exp", "--no-latency"],
            None,
            exit=(130,),
            during=(appears(".export-*", 0.5), sigint),
        ),
        Case(
            "G04",
            "signal",
            "SIGTERM during training (after the first epoch's last.ckpt)",
            long_pretrain,
            recipe({"pretrain.epochs": 200}),
            exit=(143,),
            may_change=("**",),
            during=(appears("out/pretrain/last.ckpt", 1.0), sigterm),
            check=readable_checkpoints,
        ),
        Case(
            "G05",
            "signal",
            "SIGTERM during a run's export stage",
            FINISHED,
            finished("export", "eval", "report.json"),
            exit=(143,),
            may_change=("**",),
            during=(appears("out/.export-*", 0.5), sigterm),
            check=absent("out/.export-*"),
        ),
        Case(
            "G06",
            "signal",
            "Ctrl-C 1 s into a dry run",
            DRY,
            recipe(),
            exit=(130,),
            during=(after(1.0), sigint),
            may_change=("**",),
        ),
        Case(
            "V01",
            "valid",
            "inspect the tiny dense checkpoint",
            ["inspect", "{base}/dense.ckpt"],
            None,
            exit=(0,),
        ),
        Case(
            "V02",
            "valid",
            "run a finished folder again (every stage skipped)",
            FINISHED,
            finished(),
            exit=(0,),
        ),
        Case(
            "V03",
            "valid",
            "evaluate the tiny export folder",
            [
                "evaluate",
                "{base}/export",
                "{base}/recipe.yaml",
                "--out",
                "{w}/ev",
                "--quiet",
            ],
            None,
            exit=(0,),
            check=exists("ev/eval.json"),
        ),
        Case(
            "V04",
            "valid",
            "inspect the shipped dense checkpoint",
            ["inspect", "{repo}/pretrained/fashion_mnist_mobilenetv2_w0.5.ckpt"],
            None,
            exit=(0,),
        ),
    ]


def all_cases() -> list[Case]:
    cases = (
        issue_cases()
        + small_cases()
        + pickle_cases()
        + pt2_cases()
        + file_kind_cases()
        + key_cases()
        + argv_cases()
        + data_cases()
        + other_cases()
    )
    ids = [c.id for c in cases]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise ValueError(f"duplicate case ids: {sorted(duplicates)}")
    return cases
