"""The run summary's first line: the result in plain words, from report.json's
numbers (``lightly_mcp.formats.report.headline``, ``print_run_summary``)."""

from __future__ import annotations

import io

from rich.console import Console

from lightly_mcp.formats.report import headline, print_run_summary


def _report() -> dict:
    return {
        "backbone": "torchvision/mobilenet_v2",
        "pruning_ratio": 0.3,
        "dense": {"params": 1000, "knn_top1": 0.80, "linear_top1": 0.87},
        "compact": {
            "params": 400,
            "knn_top1": 0.789,
            "linear_top1": 0.875,
            "fastest_form": {"bs1": "eager", "bs64": "onnxruntime"},
        },
        "speedup": {"bs1": 1.31, "bs64": 2.046},
    }


def test_headline_states_size_speed_and_accuracy_against_dense() -> None:
    assert headline(_report()) == (
        "compact: 60.0 % fewer parameters, 2.05× faster (bs64, onnxruntime), "
        "kNN -1.1 / linear +0.5 points against dense"
    )


def test_headline_leaves_out_what_was_not_measured() -> None:
    report = _report()
    report["speedup"] = {"bs1": 1.31, "bs64": None}
    del report["compact"]["linear_top1"]
    assert headline(report) == (
        "compact: 60.0 % fewer parameters, 1.31× faster (bs1, eager), "
        "kNN -1.1 points against dense"
    )
    report["speedup"] = {}
    del report["compact"]["knn_top1"]
    assert headline(report) == "compact: 60.0 % fewer parameters"
    assert headline({"dense": {"params": 1}}) is None


def test_the_summary_starts_with_the_headline() -> None:
    buffer = io.StringIO()
    print_run_summary(_report(), Console(file=buffer, width=120))
    assert buffer.getvalue().splitlines()[0] == headline(_report())
