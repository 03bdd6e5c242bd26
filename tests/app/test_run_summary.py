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


def test_the_summary_shows_each_transfer_evaluation_with_its_data() -> None:
    from lightly_mcp.app.pipeline import transfer_summary

    report = _report()
    part = {
        "data": "digits train: 1438 images; digits test: 359 images",
        "models": {"compact": {"knn_top1": 0.9123, "linear_top1": 0.8456, "k": 1}},
        "baselines": {"raw_pixels": {"knn_top1": 0.9641, "linear_top1": 0.9422}},
    }
    report["transfer"] = {"digits": transfer_summary(part)}
    assert report["transfer"]["digits"]["models"] == {
        "raw_pixels": {"knn_top1": 0.9641, "linear_top1": 0.9422},
        "compact": {"knn_top1": 0.9123, "linear_top1": 0.8456},
    }
    report["transfer"]["folder"] = transfer_summary(
        {"data": "imagefolder: 3 images, no labels", "skipped": "no labels"}
    )
    buffer = io.StringIO()
    print_run_summary(report, Console(file=buffer, width=120))
    text = buffer.getvalue()
    assert "transfer evaluations" in text
    rows = [line for line in text.splitlines() if "0.9123" in line]
    assert len(rows) == 1 and "compact" in rows[0] and "0.8456" in rows[0]
    assert any("raw pixels" in line and "0.9641" in line for line in text.splitlines())
    assert "data (digits): digits train: 1438 images" in text
    assert "skipped: no labels" in text
