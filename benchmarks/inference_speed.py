"""CPU inference speed of a dense backbone vs its compact (channel-pruned) copy, each
in its fastest deployed form.

No checkpoint is needed: the backbone has random weights and random BatchNorm
statistics (so that folding them is not trivial), and every channel group keeps its
first n_g = ``num_kept_channels(C_g, ratio)`` channels (``leading_masks``), which
gives exactly the architecture an MCP run at the same ratio exports. Groups are found
with ``keep_output_dim=False`` (the feature group is pruned too).

Every model is timed in every form a user could deploy it in, BatchNorm folded
(``lightly_mcp.formats.folding.fold_batchnorm``) in all of them:

- ``eager``, ``eager channels_last`` (the input's conversion inside the timed call),
- ``torch.compile`` (inductor; compiled for each input shape before timing),
- ``torch.export`` (the program's ``.module()``), ``onnxruntime`` (CPU EP, intra-op
  threads = PyTorch's, inter-op 1) from ``lightly_mcp.formats.runtimes.deployed_forms``,

and, as a reference, ``eager, BN not folded``. All forms of all models run
interleaved in one ``lightly_mcp.pruning.measure.measure_latency`` call per (batch,
size), so ratios are fair; every form's output is first checked against the unfolded
model. Per (batch, size) the result names each model's fastest form and the
best-against-best speedup (dense's fastest / compact's fastest). The compact model
widened to channel multiples (``round_to``) is timed alongside in ``eager`` and
``onnxruntime``.

A physical yardstick: the machine's float32 peak (best of several large GEMMs at the
same thread count, measured before and after the timings) and each model-form's
achieved FLOP rate ``2 · MACs · batch / latency`` as a fraction of it.

Example (the full run: about 5-6 minutes on 2 idle cores, half of it
``torch.compile`` compiling 8 shapes; see ``benchmarks/RESULTS_inference.md``):
    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python benchmarks/inference_speed.py \\
        --ratio 0.73 --backbone torchvision/mobilenet_v2 --threads 2 \\
        --sizes 32 224 --batches 1 64 --repeats 30 --repeats-bs64 15 \\
        --repeats-bs64-224 7 --round-to 4 8 16 \\
        --out benchmarks/results/inference_speed.json
Quick check (no 224 px, 2 repeats, no compile):
    PYTHONPATH=. .venv/bin/python benchmarks/inference_speed.py --sizes 32 \\
        --batches 1 4 --repeats 2 --repeats-bs64 2 --no-compile --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch._inductor.config
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/common.py
from common import cpu_model, peak_flops, randomise_batchnorm  # noqa: E402

from lightly_mcp.formats.folding import fold_batchnorm  # noqa: E402
from lightly_mcp.formats.runtimes import deployed_forms  # noqa: E402
from lightly_mcp.methods.backbones import build_backbone  # noqa: E402
from lightly_mcp.pruning.compaction import compact  # noqa: E402
from lightly_mcp.pruning.masks import leading_masks  # noqa: E402
from lightly_mcp.pruning.measure import (  # noqa: E402
    MAC_COUNTER,
    count_macs,
    count_parameters,
    measure_latency,
)
from lightly_mcp.pruning.prunable_groups import find_channel_groups  # noqa: E402

#: The unfolded eager model: a reference row, also the outputs every form is checked
#: against.
REFERENCE = "eager, BN not folded"
#: The deployed forms (BatchNorm folded), in table order.
FORMS = ("eager", "eager channels_last", "torch.compile", "torch.export", "onnxruntime")
#: The forms the ``round_to`` variants are timed in.
ROUND_FORMS = ("onnxruntime", "eager")
#: A form's output may differ from the unfolded model's by this, relative to
#: ``max(1, max |output|)``, before the run warns.
CHECK_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Setting:
    """One input shape and how often it is timed."""

    batch: int
    size: int
    repeats: int
    warmup: int

    @property
    def key(self) -> str:
        return f"bs{self.batch}@{self.size}"


# --- models -------------------------------------------------------------------------
def compact_variants(
    dense: nn.Module,
    ratio: float,
    round_tos: Sequence[int] = (),
    example: Tensor | None = None,
) -> tuple[dict[str, nn.Module], dict[str, list[int]]]:
    """``{"dense", "compact", "compact_round{r}"...}`` (eval mode) and each compact
    model's kept channels per group.

    The compact model keeps the leading ``num_kept_channels(C_g, ratio)`` channels
    of every group (``keep_output_dim=False``); ``compact_round{r}`` widens those
    masks to multiples of ``r`` as ``lightly_mcp.formats.export.export_masks`` does
    (``GroupMasks.rounded``: the extra channels are the dropped ones of largest norm).
    """
    example = torch.randn(1, 3, 32, 32) if example is None else example
    dense.eval()
    groups = find_channel_groups(dense, example, keep_output_dim=False)
    masks = leading_masks(groups, ratio)
    models = {"dense": dense, "compact": compact(dense, groups, masks, example).eval()}
    kept = {"compact": masks.kept_channels()}
    for r in round_tos:
        wide = masks.rounded(dense, r)
        models[f"compact_round{r}"] = compact(dense, groups, wide, example).eval()
        kept[f"compact_round{r}"] = wide.kept_channels()
    return models, kept


def folded_copy(model: nn.Module, example: Tensor) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``model`` with its BatchNorm folded, and how many norms
    were folded."""
    folded = copy.deepcopy(model).eval()
    return folded, fold_batchnorm(folded, example)


def channels_last_runner(model: nn.Module) -> Callable[[Tensor], Any]:
    """A channels_last copy of ``model`` that converts its input in the call."""
    model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return lambda x: model(x.contiguous(memory_format=torch.channels_last))


def compiled_runner(model: nn.Module) -> Callable[[Tensor], Any]:
    """``torch.compile`` (inductor, static shapes: one compilation per input shape)
    of a copy of ``model``; compiled at its first call."""
    return torch.compile(copy.deepcopy(model).eval(), dynamic=False)


def runners_at(
    unfolded: nn.Module,
    folded: nn.Module,
    size: int,
    forms: Sequence[str],
    compiled: Callable[[Tensor], Any] | None,
) -> tuple[dict[str, Callable[[Tensor], Any]], dict[str, str]]:
    """Per form, a callable running the model on ``3×size×size`` images; and per form
    that could not be built, why. ``REFERENCE`` is always there."""
    runners: dict[str, Callable[[Tensor], Any]] = {REFERENCE: unfolded}
    skipped: dict[str, str] = {}
    wanted = tuple(f for f in ("onnxruntime", "torch.export", "eager") if f in forms)
    built, why = deployed_forms(folded, size, forms=wanted)
    skipped.update(why)
    for form in forms:
        if form in built:
            runners[form] = built[form]
        elif form == "eager channels_last":
            runners[form] = channels_last_runner(folded)
        elif form == "torch.compile":
            if compiled is None:
                skipped[form] = "not requested (--no-compile)"
            else:
                runners[form] = compiled
    return {f: runners[f] for f in (REFERENCE, *forms) if f in runners}, skipped


# --- timing -------------------------------------------------------------------------
def first_calls(
    runners: Mapping[str, Mapping[str, Callable[[Tensor], Any]]], setting: Setting
) -> tuple[
    dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, dict[str, str]]
]:
    """Runs every form once at ``setting``'s shape (this compiles ``torch.compile``
    for that shape) and checks its output against the model's ``REFERENCE``.

    Returns:
        Per model and form: the first call's seconds, the max abs difference to the
        reference relative to ``max(1, max |reference|)``, and the forms that failed
        (with why; they are not timed).
    """
    generator = torch.Generator().manual_seed(setting.batch * 1000 + setting.size)
    x = torch.randn(setting.batch, 3, setting.size, setting.size, generator=generator)
    seconds: dict[str, dict[str, float]] = {}
    errors: dict[str, dict[str, float]] = {}
    failed: dict[str, dict[str, str]] = {}
    with torch.inference_mode():
        for model, forms in runners.items():
            start = time.perf_counter()
            reference = forms[REFERENCE](x)
            seconds[model] = {REFERENCE: time.perf_counter() - start}
            errors[model] = {REFERENCE: 0.0}
            scale = max(1.0, float(reference.abs().max()))
            for form, run in forms.items():
                if form == REFERENCE:
                    continue
                start = time.perf_counter()
                try:
                    out = run(x)
                    error = float((torch.as_tensor(out) - reference).abs().max())
                except Exception as e:  # noqa: BLE001 - a form that fails is reported
                    failed.setdefault(model, {})[form] = f"{type(e).__name__}: {e}"[
                        :500
                    ]
                    print(f"    {model} / {form}: FAILED {failed[model][form][:200]}")
                    continue
                seconds[model][form] = time.perf_counter() - start
                errors[model][form] = error / scale
                if error / scale > CHECK_TOLERANCE:
                    print(
                        f"    WARNING {model} / {form}: output differs from the "
                        f"unfolded model by {error / scale:.1e} (relative)"
                    )
    return seconds, errors, failed


def time_setting(
    runners: Mapping[str, Mapping[str, Callable[[Tensor], Any]]], setting: Setting
) -> dict[str, dict[str, float]]:
    """Median milliseconds per model and form, all timed interleaved in one
    ``measure_latency`` call."""
    flat = {
        f"{model}|{form}": run
        for model, forms in runners.items()
        for form, run in forms.items()
    }
    ms = measure_latency(
        flat,
        (setting.batch, 3, setting.size, setting.size),
        repeats=setting.repeats,
        warmup=setting.warmup,
    )
    latency: dict[str, dict[str, float]] = {}
    for name, value in ms.items():
        model, form = name.split("|", 1)
        latency.setdefault(model, {})[form] = value
    return latency


# --- summaries ----------------------------------------------------------------------
def fastest(latency: Mapping[str, float]) -> dict[str, Any]:
    """The form of least latency: ``{"form", "ms"}``."""
    form = min(latency, key=latency.__getitem__)
    return {"form": form, "ms": latency[form]}


def achieved(
    macs: int, batch: int, ms: float, peak_flops_per_s: float
) -> dict[str, float]:
    """FLOP rate ``2 · macs · batch / latency`` and its fraction of the peak."""
    rate = 2.0 * macs * batch / (ms / 1000.0)
    return {"gflops": rate / 1e9, "fraction_of_peak": rate / peak_flops_per_s}


def summarise_setting(
    latency: Mapping[str, Mapping[str, float]],
    macs: Mapping[str, int],
    batch: int,
    peak_flops_per_s: float,
    dense: str = "dense",
    small: str = "compact",
) -> dict[str, Any]:
    """Fastest forms, speedups and fractions of peak at one (batch, size).

    ``macs`` is per model at this size (one image).
    """
    best = {model: fastest(forms) for model, forms in latency.items()}
    rates = {
        model: {
            form: achieved(macs[model], batch, ms, peak_flops_per_s)
            for form, ms in forms.items()
        }
        for model, forms in latency.items()
    }
    common_forms = [f for f in latency[dense] if f in latency[small]]
    summary: dict[str, Any] = {
        "fastest": best,
        "speedup_best_vs_best": best[dense]["ms"] / best[small]["ms"],
        "speedup_same_form": {
            f: latency[dense][f] / latency[small][f] for f in common_forms
        },
        "achieved": rates,
    }
    best_fraction = {
        m: rates[m][best[m]["form"]]["fraction_of_peak"] for m in (dense, small)
    }
    summary["fraction_of_peak_fastest"] = {
        **best_fraction,
        "dense_over_compact": best_fraction[dense] / best_fraction[small],
    }
    variants = [m for m in latency if m == small or m.startswith(f"{small}_round")]
    alignment: dict[str, Any] = {}
    for form in ROUND_FORMS:
        times = {m: latency[m][form] for m in variants if form in latency[m]}
        if times:
            alignment[form] = {
                "ms": times,
                "fastest": min(times, key=times.__getitem__),
            }
    summary["alignment"] = alignment
    return summary


def targets(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's targets, where the run measured their settings."""
    out: dict[str, Any] = {}
    for key, bound in (("bs64@224", 4.0), ("bs1@224", 3.0)):
        if key in settings and "speedup_best_vs_best" in settings[key]:
            value = settings[key]["speedup_best_vs_best"]
            out[f"{key} best-vs-best >= {bound:g}"] = {
                "value": value,
                "met": value >= bound,
            }
    for key, s in settings.items():
        if "fraction_of_peak_fastest" in s:
            value = s["fraction_of_peak_fastest"]["dense_over_compact"]
            out[f"{key} dense/compact fraction of peak <= 2"] = {
                "value": value,
                "met": value <= 2.0,
            }
    return out


# --- the run ------------------------------------------------------------------------
def run_benchmark(
    models: Mapping[str, nn.Module],
    settings: Sequence[Setting],
    *,
    forms: Sequence[str] = FORMS,
    round_forms: Sequence[str] = ROUND_FORMS,
    peak_flops_per_s: float,
    fold_example: Tensor | None = None,
) -> dict[str, Any]:
    """Times ``models`` (``"dense"``, ``"compact"`` and ``compact_round*``) at every
    setting and summarises each (see the module docstring).

    ``dense`` and ``compact`` are timed in ``forms`` and as ``REFERENCE`` (the
    unfolded eager model), the ``compact_round*`` models in ``round_forms`` (every
    form's output is checked against the model's unfolded one).
    """
    fold_example = torch.randn(2, 3, 32, 32) if fold_example is None else fold_example
    folded: dict[str, nn.Module] = {}
    folds: dict[str, Any] = {}
    for name, model in models.items():
        start = time.perf_counter()
        folded[name], count = folded_copy(model, fold_example)
        folds[name] = {"norms_folded": count, "seconds": time.perf_counter() - start}
    model_forms = {
        name: tuple(forms if name in ("dense", "compact") else round_forms)
        for name in models
    }
    compiled = {
        name: compiled_runner(folded[name])
        for name in models
        if "torch.compile" in model_forms[name]
    }
    sizes = sorted({s.size for s in settings})
    macs = {
        name: {size: count_macs(m, size) for size in sizes}
        for name, m in models.items()
    }
    results: dict[str, Any] = {"folding": folds, "settings": {}, "skipped_forms": {}}
    for size in sizes:
        runners: dict[str, dict[str, Callable[[Tensor], Any]]] = {}
        build_seconds: dict[str, float] = {}
        for name in models:
            start = time.perf_counter()
            runners[name], skipped = runners_at(
                models[name], folded[name], size, model_forms[name], compiled.get(name)
            )
            build_seconds[name] = time.perf_counter() - start
            for form, why in skipped.items():
                results["skipped_forms"].setdefault(f"{name}@{size}", {})[form] = why
                print(f"    {name} @{size}: {form} skipped: {why[:200]}")
        for setting in (s for s in settings if s.size == size):
            print(f"{setting.key}: first calls (compiling) ...", flush=True)
            seconds, errors, failed = first_calls(runners, setting)
            timed = {
                m: {
                    f: r
                    for f, r in fs.items()
                    if f not in failed.get(m, {})
                    and (f != REFERENCE or m in ("dense", "compact"))
                }
                for m, fs in runners.items()
            }
            print(
                f"{setting.key}: timing {sum(map(len, timed.values()))} model-forms, "
                f"{setting.repeats} repeats ...",
                flush=True,
            )
            start = time.perf_counter()
            latency = time_setting(timed, setting)
            entry: dict[str, Any] = {
                "batch": setting.batch,
                "size": setting.size,
                "repeats": setting.repeats,
                "warmup": setting.warmup,
                "timing_seconds": time.perf_counter() - start,
                "build_seconds": build_seconds,
                "first_call_seconds": seconds,
                "relative_error_vs_unfolded": errors,
                "failed": failed,
                "latency_ms": latency,
            }
            entry.update(
                summarise_setting(
                    latency,
                    {m: macs[m][size] for m in models},
                    setting.batch,
                    peak_flops_per_s,
                )
            )
            results["settings"][setting.key] = entry
            best = entry["fastest"]
            print(
                f"    fastest: dense {best['dense']['form']} "
                f"{best['dense']['ms']:.2f} ms, compact {best['compact']['form']} "
                f"{best['compact']['ms']:.2f} ms, best vs best "
                f"{entry['speedup_best_vs_best']:.2f}",
                flush=True,
            )
    results["macs"] = {
        name: {str(s): v for s, v in per.items()} for name, per in macs.items()
    }
    results["targets"] = targets(results["settings"])
    return results


def sizes_table(
    models: Mapping[str, nn.Module], macs: Mapping[str, Mapping[str, int]]
) -> dict[str, Any]:
    """Parameters, MACs and their ratios to the dense model, per model."""
    dense_params = count_parameters(models["dense"])
    table: dict[str, Any] = {}
    for name, model in models.items():
        params = count_parameters(model)
        row: dict[str, Any] = {"params": params}
        if name != "dense":
            row["params_removed"] = 1 - params / dense_params
        for size, value in macs[name].items():
            row[f"macs@{size}"] = value
            if name != "dense":
                row[f"macs_ratio@{size}"] = macs["dense"][size] / value
        table[name] = row
    return table


# --- printing -----------------------------------------------------------------------
def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}"


def markdown(result: Mapping[str, Any]) -> str:
    """The result as markdown tables (latency, fastest forms, fraction of peak,
    alignment, sizes)."""
    settings = result["settings"]
    keys = list(settings)
    head = "| | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    lines = ["## Latency (ms): dense / compact / **speedup**", "", head.rstrip("\n")]
    forms = [REFERENCE, *FORMS]
    for form in forms:
        cells = []
        for k in keys:
            lat = settings[k]["latency_ms"]
            d, c = lat["dense"].get(form), lat["compact"].get(form)
            cells.append(
                "-"
                if d is None or c is None
                else f"{_ms(d)} / {_ms(c)} / **{d / c:.2f}**"
            )
        if any(cell != "-" for cell in cells):
            lines.append(f"| {form} | " + " | ".join(cells) + " |")
    cells = []
    for k in keys:
        best = settings[k]["fastest"]
        cells.append(
            f"{best['dense']['form']} {_ms(best['dense']['ms'])} / "
            f"{best['compact']['form']} {_ms(best['compact']['ms'])} / "
            f"**{settings[k]['speedup_best_vs_best']:.2f}**"
        )
    lines.append("| **fastest, best vs best** | " + " | ".join(cells) + " |")

    peak = result["peak"]
    lines += [
        "",
        f"## Achieved FLOP rate, fraction of peak ({peak['flops_per_s'] / 1e9:.1f} "
        f"GFLOP/s, {peak['size']}² float32 GEMM): dense / compact / dense÷compact",
        "",
        head.rstrip("\n"),
    ]
    for form in forms:
        cells = []
        for k in keys:
            rates = settings[k]["achieved"]
            d, c = rates["dense"].get(form), rates["compact"].get(form)
            if d is None or c is None:
                cells.append("-")
            else:
                a, b = d["fraction_of_peak"], c["fraction_of_peak"]
                cells.append(f"{100 * a:.1f} % / {100 * b:.1f} % / {a / b:.2f}")
        if any(cell != "-" for cell in cells):
            lines.append(f"| {form} | " + " | ".join(cells) + " |")
    cells = []
    for k in keys:
        f = settings[k]["fraction_of_peak_fastest"]
        cells.append(
            f"{100 * f['dense']:.1f} % / {100 * f['compact']:.1f} % / "
            f"**{f['dense_over_compact']:.2f}**"
        )
    lines.append("| **fastest forms** | " + " | ".join(cells) + " |")

    sizes = result["sizes"]
    variants = [m for m in sizes if m == "compact" or m.startswith("compact_round")]
    res = sorted(
        {int(c.split("@")[1]) for c in sizes["dense"] if c.startswith("macs@")}
    )
    if len(variants) > 1:
        lines += [
            "",
            "## Alignment: compact model with masks rounded up to a channel multiple "
            "(ms, ONNX Runtime / eager folded)",
            "",
            "| round_to | params | "
            + " | ".join(f"MACs @{s}" for s in res)
            + " | "
            + " | ".join(keys)
            + " |",
            "|---|---:|" + "---:|" * len(res) + "---|" * len(keys),
        ]
        for m in variants:
            label = "None" if m == "compact" else m.removeprefix("compact_round")
            cells = []
            for k in keys:
                lat = settings[k]["latency_ms"].get(m, {})
                cells.append(
                    " / ".join(_ms(lat[f]) if f in lat else "-" for f in ROUND_FORMS)
                )
            lines.append(
                f"| {label} | {sizes[m]['params']:,} | "
                + " | ".join(f"{sizes[m][f'macs@{s}']:,}" for s in res)
                + " | "
                + " | ".join(cells)
                + " |"
            )
        cells = []
        for k in keys:
            align = settings[k]["alignment"]
            cells.append(
                " / ".join(
                    align[f]["fastest"]
                    .replace("compact_round", "")
                    .replace("compact", "None")
                    if f in align
                    else "-"
                    for f in ROUND_FORMS
                )
            )
        lines.append(
            "| " + " | ".join(["**fastest**", "", *[""] * len(res), *cells]) + " |"
        )

    res = sorted(
        {int(c.split("@")[1]) for c in sizes["dense"] if c.startswith("macs@")}
    )
    lines += [
        "",
        "## Size",
        "",
        "| model | params | removed | "
        + " | ".join(f"MACs @{s} (ratio)" for s in res)
        + " |",
    ]
    lines.append("|---|---:|---:|" + "---:|" * len(res))
    for m, row in sizes.items():
        removed = (
            f"{100 * row['params_removed']:.1f} %" if "params_removed" in row else "-"
        )
        macs_cells = [
            f"{row[f'macs@{s}']:,}"
            + (f" ({row[f'macs_ratio@{s}']:.2f})" if f"macs_ratio@{s}" in row else "")
            for s in res
        ]
        lines.append(
            f"| {m} | {row['params']:,} | {removed} | " + " | ".join(macs_cells) + " |"
        )

    if result.get("targets"):
        lines += ["", "## Targets", ""]
        for name, t in result["targets"].items():
            lines.append(
                f"- {name}: {t['value']:.2f} ({'met' if t['met'] else 'not met'})"
            )
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------
def environment(threads: int) -> dict[str, Any]:
    """Machine and library versions."""
    import torchvision

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "mac_counter": MAC_COUNTER,
        "inductor_freezing": bool(torch._inductor.config.freezing),
    }
    try:
        import onnxruntime

        env["onnxruntime_version"] = onnxruntime.__version__
    except ImportError:
        env["onnxruntime_version"] = None
    return env


def make_settings(
    batches: Iterable[int],
    sizes: Iterable[int],
    repeats: int,
    repeats_batch: int,
    repeats_batch_large: int,
) -> list[Setting]:
    """Settings in table order (size, then batch); batch 1 gets ``repeats``, larger
    batches ``repeats_batch`` at sizes up to 64 px and ``repeats_batch_large``
    above."""
    out = []
    for size in sizes:
        for batch in batches:
            if batch == 1:
                n = repeats
            elif size <= 64:
                n = repeats_batch
            else:
                n = repeats_batch_large
            out.append(Setting(batch, size, n, warmup=1 if n <= 5 else 2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.73)
    parser.add_argument("--backbone", default="torchvision/mobilenet_v2")
    parser.add_argument("--small-input", action="store_true")
    parser.add_argument("--width", type=float, default=None, help="width multiplier")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=30, help="batch 1")
    parser.add_argument(
        "--repeats-bs64", type=int, default=15, help="batch > 1, <= 64 px"
    )
    parser.add_argument(
        "--repeats-bs64-224", type=int, default=7, help="batch > 1, > 64 px"
    )
    parser.add_argument(
        "--round-to", type=int, nargs="*", default=[4, 8, 16], help="none: no variants"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument(
        "--freezing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="inductor freezing (constant weights; PyTorch's CPU inference setting)",
    )
    parser.add_argument("--gemm-size", type=int, default=2048)
    parser.add_argument("--gemm-repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/inference_speed.json")
    args = parser.parse_args()

    wall = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch._inductor.config.freezing = args.freezing
    # Dense and compact share their forward's code object; each input shape is one
    # compilation of each (static shapes), more than the default limit of 8.
    torch._dynamo.config.recompile_limit = 64
    env = environment(torch.get_num_threads())
    print(json.dumps(env, indent=2), flush=True)

    print(f"peak: {args.gemm_size}² float32 GEMM ...", flush=True)
    peak_before = peak_flops(args.gemm_size, args.gemm_repeats)
    print(f"    {peak_before['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)

    width = {} if args.width is None else {"width_multiplier": args.width}
    dense = build_backbone(args.backbone, small_input=args.small_input, **width)
    norms = randomise_batchnorm(dense, args.seed)
    models, kept = compact_variants(dense.eval(), args.ratio, args.round_to)
    print(f"models: {list(models)} ({norms} BatchNorm layers randomised)", flush=True)
    forms = [f for f in FORMS if not (args.no_compile and f == "torch.compile")]
    settings = make_settings(
        args.batches, args.sizes, args.repeats, args.repeats_bs64, args.repeats_bs64_224
    )
    result = run_benchmark(
        models, settings, forms=forms, peak_flops_per_s=peak_before["flops_per_s"]
    )
    print(f"peak again: {args.gemm_size}² float32 GEMM ...", flush=True)
    peak_after = peak_flops(args.gemm_size, args.gemm_repeats)
    print(f"    {peak_after['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    env["load_average_at_end"] = os.getloadavg()
    env["wall_seconds"] = time.perf_counter() - wall
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "command_args": vars(args),
        "environment": env,
        "backbone": args.backbone,
        "ratio": args.ratio,
        "keep_output_dim": False,
        "forms": [REFERENCE, *forms],
        "round_forms": list(ROUND_FORMS),
        "batchnorm_statistics": "random (benchmarks/common.py randomise_batchnorm)",
        "peak": {
            **peak_before,
            "after": peak_after,
            "note": "fractions of peak use the GEMM measured before the timings",
        },
        "sizes": sizes_table(models, result["macs"]),
        "kept_channels": kept,
        **result,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(markdown(result))
    print(f"\nwrote {out} ({env['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
