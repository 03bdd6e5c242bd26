"""The reliability sweep's harness (benchmarks/reliability): a few of its cases run
in-process, and its judge catches what it must catch."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.reliability import harness
from benchmarks.reliability.cases import all_cases
from benchmarks.reliability.harness import Case, Ctx, Runner, judge, run_cases

REPO = Path(__file__).resolve().parents[2]


def _cases(*ids: str) -> list[Case]:
    by_id = {case.id: case for case in all_cases()}
    return [by_id[i] for i in ids]


def test_the_sweep_has_over_a_hundred_cases_of_every_class() -> None:
    cases = all_cases()
    classes = {case.cls for case in cases}
    assert len(cases) >= 120
    assert {f"issue-{n}" for n in range(1, 13)} <= classes
    assert {"small", "pickle", "file-kind", "pt2", "torchscript", "key-type"} <= classes


def test_representative_cases_run_in_process(tmp_path: Path) -> None:
    """A wrong key type, a --set syntax error, argparse's missing --out and a folder
    given as a checkpoint: each refused with one line, exit 2, nothing changed."""
    base = tmp_path / "base"
    base.mkdir()
    cases = _cases("K-type-seed", "X01", "A04", "F-inspect-folder")
    outcomes = run_cases(
        cases, tmp_path / "cases", base, REPO, Runner("inprocess", REPO)
    )
    assert [o.rc for o in outcomes] == [2, 2, 2, 2]
    assert [o.reasons for o in outcomes] == [[], [], [], []]
    assert "'seed' must be int" in outcomes[0].error
    assert "section.key=value" in outcomes[1].error
    assert "--out" in outcomes[2].error
    assert "is a folder" in outcomes[3].error


def test_a_case_with_the_wrong_expectation_fails(tmp_path: Path) -> None:
    """A refused recipe judged against exit 0 and a name it does not print."""
    (tmp_path / "base").mkdir()
    (case,) = _cases("K-type-seed")
    case = Case(
        case.id,
        case.cls,
        case.description,
        case.argv,
        case.setup,
        exit=(0,),
        names=("no such words",),
    )
    (outcome,) = run_cases(
        [case], tmp_path / "cases", tmp_path / "base", REPO, Runner("inprocess", REPO)
    )
    assert outcome.verdict == "FAIL"
    assert outcome.reasons == ["exit 2", "does not name /no such words/"]


def _judge(tmp_path: Path, stderr: str, rc: int = 2, **changes: object) -> list[str]:
    ctx = Ctx(w=tmp_path, s=tmp_path, base=tmp_path, repo=REPO)
    case = Case("C", "test", "a case", ["run"])
    return judge(
        case,
        ctx,
        rc,
        "",
        stderr,
        0.1,
        changes.get("before", {}),
        changes.get("after", {}),  # type: ignore[arg-type]
        changes.get("sentinel", []),
        None,  # type: ignore[arg-type]
    ).reasons


def test_judge_catches_each_kind_of_bad_refusal(tmp_path: Path) -> None:
    ok = "lightly-mcp: error: recipe 'r.yaml': 'seed' must be int, got str 'x'.\n"
    assert _judge(tmp_path, ok) == []
    long = "lightly-mcp: error: " + "x" * 201 + "\n"
    assert _judge(tmp_path, long) == ["message 201 chars"]
    assert _judge(tmp_path, ok + ok) == ["2 error lines"]
    advice = ok.replace("'x'.", "'x'; retry with `weights_only` set to `False`.")
    assert _judge(tmp_path, advice) == ["suggests weights_only=False"]
    traceback = "Traceback (most recent call last):\n  File x\nValueError: bad\n"
    assert _judge(tmp_path, traceback, rc=1) == [
        "exit 1",
        "traceback printed",
        "0 error lines",
    ]
    assert _judge(tmp_path, ok, sentinel=["+pwned"]) == [
        "changed outside its folder: +pwned"
    ]
    before = {"out": ("dir", 0o755)}
    after = {
        **before,
        "out/.lock": ("file", "h", 0o644),
        "out/x.ckpt": ("file", "h", 0o644),
    }
    assert _judge(tmp_path, ok, before=before, after=after) == [
        "refusal changed files: +out/x.ckpt"
    ]
    after = {**before, "out/.export-ab12": ("dir", 0o755)}
    assert _judge(tmp_path, ok, rc=0, before=before, after=after) == [
        "exit 0",
        "left temp files: out/.export-ab12",
    ]


def test_snapshot_sees_links_and_content_without_following(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "link").symlink_to(tmp_path / "a.txt")
    before = harness.snapshot(tmp_path)
    (tmp_path / "a.txt").write_text("two")
    assert harness.differences(before, harness.snapshot(tmp_path)) == ["~a.txt"]
    assert before["link"] == ("link", str(tmp_path / "a.txt"))


@pytest.mark.parametrize(
    "text", ["weights_only=False", "`weights_only` set to `False`"]
)
def test_weights_only_advice_is_recognised(text: str) -> None:
    assert harness.WEIGHTS_ONLY_FALSE.search(f"retry with {text}")
    assert not harness.WEIGHTS_ONLY_FALSE.search(
        "`weights_only` was not set, defaulting"
    )
