"""Hostile and bad input: each case is refused with one line and exit 2, naming the
key or the file and the fix, before any model is built.

Recipes (duplicate keys, alias bombs, deep nesting, bytes that are not UTF-8, a value
of every key out of its range) are run as ``lightly-mcp run RECIPE --dry-run`` with
the preflight replaced by a failure: a case must stop at the recipe. Data and model
files (a gzip bomb, a corrupt deflate stream, NaN weights, masks keeping no channel)
are read with the functions that read them.
"""

from __future__ import annotations

import gzip
import os
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch

from lightly_mcp.app import cli
from lightly_mcp.errors import CheckpointError, DatasetError, InputError
from tests.helpers import MAX_MESSAGE, message_length
from tests.tiny import write_tiny

#: Longest refusal line (the "lightly-mcp: error: " prefix included).
MAX_LINE = 200


def _alias_bomb(levels: int, fanout: int = 9) -> str:
    """YAML of ``levels`` anchors, each a list of ``fanout`` aliases of the last."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * fanout)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fanout)}]")
    return "\n".join(lines) + "\n"


def _tiny_text(tmp_path: Path) -> str:
    return write_tiny(tmp_path / "base").read_text()


def _refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    recipe_text: str | bytes,
    sets: tuple[str, ...] = (),
) -> str:
    """Runs ``run r.yaml --dry-run`` in ``tmp_path``; returns its one error line."""

    def no_preflight(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the recipe was accepted: the preflight was reached")

    monkeypatch.setattr("lightly_mcp.app.preflight.for_command", no_preflight)
    monkeypatch.chdir(tmp_path)
    recipe = Path("r.yaml")
    if isinstance(recipe_text, bytes):
        recipe.write_bytes(recipe_text)
    else:
        recipe.write_text(recipe_text)
    argv = ["run", str(recipe), "--out", "out", "--dry-run"]
    for value in sets:
        argv += ["--set", value]
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err[:500]
    assert len(lines) == 1, err[:500]
    assert len(lines[0]) <= MAX_LINE, lines[0]
    assert lines[0].startswith("lightly-mcp: error: ")
    assert "weights_only=False" not in lines[0]
    assert not Path("out").exists()
    return lines[0]


# --- the YAML itself ---------------------------------------------------------------
YAML_CASES = {
    # PyYAML keeps the last of two keys: the second mcp: replaced the first whole.
    "duplicate section": (
        lambda base: base + "mcp:\n  pruning_ratio: 0.9\n",
        ["r.yaml", "key 'mcp' appears twice", "merge the two"],
    ),
    "duplicate key in a section": (
        lambda base: base.replace("  frq: 2\n", "  frq: 2\n  frq: 3\n"),
        ["key 'frq' appears twice", "line"],
    ),
    "alias bomb in data.root": (
        lambda base: _alias_bomb(6) + base.replace("data:\n", "data:\n  root: *l5\n"),
        ["r.yaml", "over 10000 values once its aliases are expanded"],
    ),
    "list nested 5,000 deep": (
        lambda base: base.replace(
            "data:\n", "data:\n  root: " + "[" * 5000 + "]" * 5000 + "\n"
        ),
        ["r.yaml", "nested more than 50 levels deep"],
    ),
    "mapping nested 5,000 deep": (
        lambda base: base + "x: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
        ["r.yaml", "nested more than 50 levels deep"],
    ),
    "a Latin-1 byte": (
        lambda base: (base + "# caf\xe9\n").encode("latin-1"),
        ["r.yaml", "not UTF-8 text (byte 0xe9 at line", "save the file as UTF-8"],
    ),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_hostile_yaml_is_refused(
    case: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make, expected = YAML_CASES[case]
    line = _refused(tmp_path, monkeypatch, capsys, make(_tiny_text(tmp_path)))
    for part in expected:
        assert part in line, line


def test_merge_keys_and_small_aliases_still_load(tmp_path: Path) -> None:
    """What YAML allows and a recipe may use: a small anchor, ``<<`` merges, and an
    explicit key overriding a merged one (not a duplicate).
    """
    from lightly_mcp.app.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(
        "data: {kind: digits, input_size: 16, subset: &n 16}\n"
        "pretrain:\n"
        "  <<: &schedule {epochs: 1, batch_size: 8}\n"
        "  memory_bank_size: *n\n"
        "mcp:\n"
        "  <<: *schedule\n"
        "  batch_size: 4\n"
    )
    recipe = load_recipe(path)
    assert (recipe.data.subset, recipe.pretrain.memory_bank_size) == (16, 16)
    assert (recipe.pretrain.batch_size, recipe.mcp.batch_size) == (8, 4)
    assert recipe.mcp.epochs == 1


# --- --set values ------------------------------------------------------------------
SET_CASES = {
    "mcp={rho: 0.1, rho: 0.2}": ["--set 'mcp'", "key 'rho' appears twice"],
    "data.root=[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
    "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]]": [
        "--set 'data.root'",
        "aliases are expanded",
    ],
}


@pytest.mark.parametrize("value", list(SET_CASES))
def test_hostile_set_value_is_refused(
    value: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = _refused(tmp_path, monkeypatch, capsys, _tiny_text(tmp_path), (value,))
    for part in SET_CASES[value]:
        assert part in line, line


# --- every key: a value out of range -----------------------------------------------
#: ``--set`` value -> what the refusal says. Each was accepted by the recipe before
#: (and failed later, with exit 1 or after minutes, or not at all).
KEY_CASES = {
    "seed=-1": "'seed' must be in [0, 4294967295], got -1",
    "seed=4294967296": "'seed' must be in [0, 4294967295]",
    "data.kind=bogus": "'data.kind' must be one of auto, fashion_mnist, digits",
    "data.input_size=100000": "'data.input_size' must be in [8, 1024], got 100000",
    "data.num_workers=-1": "'data.num_workers' must be in [0, ",
    "backbone.width_multiplier=0": "'backbone.width_multiplier' must be in (0, 8]",
    "backbone.width_multiplier=.nan": "'backbone.width_multiplier' must be a finite",
    "pretrain.max_steps=0": "'pretrain.max_steps' must be -1 (all epochs) or >= 1",
    "pretrain.lr=.inf": "'pretrain.lr' must be a finite number, got inf",
    "pretrain.weight_decay=-1": "'pretrain.weight_decay' must be >= 0, got -1.0",
    "pretrain.temperature=.inf": "'pretrain.temperature' must be a finite number",
    "pretrain.projection_hidden_dim=0": "'pretrain.projection_hidden_dim' must be in [1,",
    "pretrain.projection_dim=-3": "'pretrain.projection_dim' must be in [1, 65536], got -3",
    "pretrain.split_batch_norm=-1": "'pretrain.split_batch_norm' must be >= 0",
    "pretrain.warmup_epochs=-1": "'pretrain.warmup_epochs' must be >= 0",
    "mcp.max_steps=0": "'mcp.max_steps' must be -1 (all epochs) or >= 1, got 0",
    "mcp.weight_decay=-0.1": "'mcp.weight_decay' must be >= 0, got -0.1",
    "mcp.rho=.inf": "'mcp.rho' must be a finite number, got inf",
    "mcp.rho_growth=.inf": "'mcp.rho_growth' must be a finite number",
    "export.round_to=0": "'export.round_to' must be >= 1 or null, got 0",
    "export.latency_repeats=0": "'export.latency_repeats' must be >= 1",
    "eval.linear_epochs=0": "'eval.linear_epochs' must be >= 1, got 0",
    "eval.batch_size=0": "'eval.batch_size' must be >= 1",
    "eval.train_subset=0": "'eval.train_subset' must be >= 1 or null",
    "eval.test_subset=0": "'eval.test_subset' must be >= 1 or null",
    "eval.temperature=.inf": "'eval.temperature' must be a finite number",
    "trainer.accelerator=bogus": "'trainer.accelerator' must be one of auto, gpu,",
    "trainer.strategy=bogus": "'trainer.strategy' must be auto or a Lightning",
    "trainer.precision=bogus": "'trainer.precision' must be a Lightning precision",
    "trainer.log_every_n_steps=-1": "'trainer.log_every_n_steps' must be >= 0",
}


@pytest.mark.parametrize("value", list(KEY_CASES))
def test_out_of_range_value_is_refused_at_the_recipe(
    value: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = _refused(tmp_path, monkeypatch, capsys, _tiny_text(tmp_path), (value,))
    assert f"r.yaml: {KEY_CASES[value]}" in line, line


def test_a_long_wrong_value_is_shown_short(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A wrong-typed value is quoted cut short, so the line stays one short line."""
    value = "data.root=[" + ", ".join(str(i) for i in range(3000)) + "]"
    line = _refused(tmp_path, monkeypatch, capsys, _tiny_text(tmp_path), (value,))
    assert "'data.root' must be str or null, got list [0, 1, 2, 3, 4, 5," in line


# --- data files --------------------------------------------------------------------
def _idx_header(shape: tuple[int, ...]) -> bytes:
    return struct.pack(">I", 0x0800 | len(shape)) + struct.pack(
        f">{len(shape)}I", *shape
    )


def test_gzip_bomb_idx_is_refused_without_decompressing_it(tmp_path: Path) -> None:
    """A small header followed by 64 MB of zeros (64 KB compressed): only the
    declared 32 bytes and one more are ever decompressed.
    """
    from lightly_mcp.data.fashion_mnist import read_idx

    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_header((2, 4, 4)) + bytes(64 << 20), 1))
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError) as error:
            read_idx(path, 2051)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(error.value) == (
        f"corrupt idx file {path}: its header gives 32 bytes, the file holds more; "
        "replace it"
    )
    assert peak < 4 << 20, peak


def test_idx_declaring_gigabytes_is_refused_before_reading(tmp_path: Path) -> None:
    from lightly_mcp.data.fashion_mnist import read_idx

    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_header((60000, 28000, 28)) + bytes(100)))
    with pytest.raises(DatasetError, match=r"more than the 1073741824 allowed"):
        read_idx(path, 2051)


def test_corrupt_deflate_stream_names_the_file(tmp_path: Path) -> None:
    from lightly_mcp.data.fashion_mnist import read_idx

    data = bytearray(gzip.compress(_idx_header((1,)) + bytes(range(200)) * 50))
    data[40:60] = bytes(20)  # damage the compressed stream, not the gzip header
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"^corrupt idx file .*t10k-labels"):
        read_idx(path, 2049)


def test_data_refusals_name_the_folder_in_one_short_line(tmp_path: Path) -> None:
    from lightly_mcp.data.fashion_mnist import build_fashion_mnist
    from lightly_mcp.data.imagefolder import ImageFiles
    from lightly_mcp.data.torchvision_sources import build_torchvision

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    (folder / "broken.png").write_bytes(b"not a png")
    cifar = folder / "cifar-10-batches-py"
    cifar.mkdir()
    for build, match in (
        (lambda: build_fashion_mnist(folder, True, False), "data.root"),
        (lambda: build_torchvision("cifar10", folder, True, False), "data.root"),
        (lambda: ImageFiles(folder), "broken.png"),
    ):
        with pytest.raises(DatasetError, match=match) as refused:
            build()
        message = str(refused.value)
        assert str(folder) in message and len(message) - len(str(folder)) <= 120
    (folder / "broken.png").unlink()
    with pytest.raises(DatasetError, match="no image files") as refused:
        ImageFiles(folder)
    assert len(str(refused.value)) - len(str(folder)) <= 120
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4"):
        (cifar / name).write_bytes(b"junk")
    with pytest.raises(DatasetError, match=r"data_batch_5, test_batch, …|missing"):
        build_torchvision("cifar10", folder, True, False)


def test_a_fifo_named_like_an_image_is_skipped_unopened(tmp_path: Path) -> None:
    from PIL import Image

    from lightly_mcp.data.imagefolder import ImageFiles

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "x.png")  # opening it would wait for a writer forever
    files = ImageFiles(tmp_path)
    assert [p.name for p in files.paths] == ["a.png"]
    assert files.skipped_non_image == 1


# --- model files -------------------------------------------------------------------
def _changed_checkpoint(source: Path, target: Path, change: Any) -> Path:
    data = torch.load(source, map_location="cpu", weights_only=True)
    change(data["state_dict"])
    torch.save(data, target)
    return target


def _first_float(state: dict[str, torch.Tensor], prefix: str = "backbone.") -> str:
    return next(
        k for k, v in state.items() if k.startswith(prefix) and v.is_floating_point()
    )


def test_dense_checkpoint_with_nan_names_the_file(
    tiny_dense: Path, tmp_path: Path
) -> None:
    """Before: loaded, then the first step's NaN loss was blamed on lr and rho."""
    from lightly_mcp.formats.loading import module_from_checkpoint
    from lightly_mcp.methods.checkpoints import load_dense_moco, read_checkpoint

    model = module_from_checkpoint(read_checkpoint(tiny_dense), tiny_dense)

    def poison(state: dict[str, torch.Tensor]) -> None:
        state[_first_float(state)].view(-1)[0] = float("nan")

    bad = _changed_checkpoint(tiny_dense, tmp_path / "nan.ckpt", poison)
    with pytest.raises(CheckpointError, match=r"holds NaN or infinite weights") as e:
        load_dense_moco(model, bad)
    assert (
        "/nan.ckpt' holds" in str(e.value)
        and message_length(str(e.value)) <= MAX_MESSAGE
    )
    assert "lr" not in str(e.value)


def test_mcp_checkpoint_with_inf_names_the_file(
    tiny_pruned: Path, tmp_path: Path
) -> None:
    from lightly_mcp.formats.loading import load_mcp_checkpoint

    def poison(state: dict[str, torch.Tensor]) -> None:
        state[_first_float(state)].view(-1)[-1] = float("inf")

    bad = _changed_checkpoint(tiny_pruned, tmp_path / "inf.ckpt", poison)
    with pytest.raises(CheckpointError, match=r"NaN or infinite weights \(in '"):
        load_mcp_checkpoint(bad)


def test_mcp_checkpoint_whose_mask_keeps_no_channel_is_refused(
    tiny_pruned: Path, tmp_path: Path
) -> None:
    """Before: loaded, then export failed with exit 1 (a plain ValueError)."""
    from lightly_mcp.formats.loading import load_mcp_checkpoint

    def empty_mask(state: dict[str, torch.Tensor]) -> None:
        key = next(k for k in state if k.rsplit(".", 1)[-1] == "mask_0")
        state[key].zero_()

    bad = _changed_checkpoint(tiny_pruned, tmp_path / "empty.ckpt", empty_mask)
    with pytest.raises(CheckpointError) as error:
        load_mcp_checkpoint(bad)
    message = str(error.value)
    assert message.startswith(f"Checkpoint '{bad}' holds unusable masks: Mask for")
    assert "keeps no channel" in message and "\n" not in message


def test_backbone_weights_with_nan_are_refused(tmp_path: Path) -> None:
    from lightly_mcp.methods.backbones import build_backbone

    backbone = build_backbone("torchvision/mobilenet_v2", width_multiplier=0.25)
    state = backbone.net.state_dict()
    state[_first_float(state, "")].view(-1)[0] = float("nan")
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    with pytest.raises(InputError, match=r"^weights file '.*weights.pt' holds NaN"):
        build_backbone(
            "torchvision/mobilenet_v2", width_multiplier=0.25, weights=str(path)
        )


class _Payload:
    """Unpickling it would write a file: ``pathlib.Path(target).touch()``."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.target,))


@pytest.mark.parametrize("file", ["data_batch_3", "batches.meta"])
def test_cifar_file_with_code_is_refused_and_not_run(file: str, tmp_path: Path) -> None:
    """Before: torchvision unpickled CIFAR's files with ``pickle.load``, running any
    code they held.
    """
    import pickle

    from lightly_mcp.data import build_dataset
    from tests.data.writers import write_cifar10

    write_cifar10(tmp_path)
    marker = tmp_path / "ran"
    path = tmp_path / "cifar-10-batches-py" / file
    with open(path, "rb") as f:
        content = pickle.load(f)
    content["extra"] = _Payload(marker)
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(DatasetError, match=r"names the global pathlib") as error:
        build_dataset("cifar10", root=tmp_path)
    assert not marker.exists()
    assert "\n" not in str(error.value)
