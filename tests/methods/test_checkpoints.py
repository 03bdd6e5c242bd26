"""Dense MoCo starting points in every supported checkpoint format."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import update_momentum
from torch import nn

from lightly_mcp.methods.checkpoints import CheckpointError
from lightly_mcp.methods.mcp import MCP
from lightly_mcp.methods.moco_v2 import MoCoV2
from tests.helpers import loader, trainer

# The projection head of lightly's MoCo examples: MoCoProjectionHead(512, 512, 128).
EXAMPLE = dict(
    backbone="torchvision/resnet18",
    backbone_kwargs={"small_input": False},
    batch_size_per_device=8,
    projection_hidden_dim=512,
    projection_dim=128,
    memory_bank_size=64,
)


class LightlyExampleMoCo(pl.LightningModule):
    """The model of lightly's examples/pytorch_lightning/moco.py, as that file defines it."""

    def __init__(self) -> None:
        super().__init__()
        resnet = torchvision.models.resnet18()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = MoCoProjectionHead(512, 512, 128)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        self.backbone_momentum.requires_grad_(False)
        self.projection_head_momentum.requires_grad_(False)
        self.criterion = NTXentLoss(memory_bank_size=(64, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        key = self.backbone_momentum(x).flatten(start_dim=1)
        return self.projection_head_momentum(key).detach()

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        update_momentum(self.backbone, self.backbone_momentum, m=0.9)
        update_momentum(self.projection_head, self.projection_head_momentum, m=0.9)
        (x_query, x_key) = batch[0]
        return self.criterion(self.forward(x_query), self.forward_momentum(x_key))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.06)


def _assert_loaded(mcp: MCP, example: LightlyExampleMoCo) -> None:
    x = torch.randn(2, 3, 32, 32)
    mcp.eval(), example.eval()
    with torch.no_grad():
        assert torch.allclose(mcp.backbone(x), example.backbone(x).flatten(1))
        assert torch.allclose(
            mcp.backbone_momentum(x), example.backbone_momentum(x).flatten(1)
        )
        assert torch.allclose(mcp.forward_query_encoder(x), example(x))


@pytest.fixture(scope="module")
def example_model(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[LightlyExampleMoCo, Path]:
    torch.manual_seed(0)
    model = LightlyExampleMoCo()
    directory = tmp_path_factory.mktemp("example")
    fit = trainer(directory, max_steps=2)
    fit.fit(model, loader(size=32))
    path = directory / "example.ckpt"
    fit.save_checkpoint(path)
    return model, path


def test_lightly_lightning_example_checkpoint(example_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    example, path = example_model
    mcp = MCP(**EXAMPLE, pruning_ratio=0.5, dense_checkpoint=str(path), input_size=32)
    assert mcp.dense_load_report[0] == "format: lightly-example"
    _assert_loaded(mcp, example)


def test_lightly_pytorch_example_state_dict(example_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    example, _ = example_model
    path = tmp_path / "moco_state_dict.pt"
    torch.save(example.state_dict(), path)
    mcp = MCP(**EXAMPLE, pruning_ratio=0.5, dense_checkpoint=str(path), input_size=32)
    _assert_loaded(mcp, example)


def test_official_moco_release_format(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = MoCoV2(**{**EXAMPLE, "projection_hidden_dim": 512})
    state = {}
    for ours, theirs in (("", "encoder_q"), ("_momentum", "encoder_k")):
        for key, value in getattr(source, f"backbone{ours}").net.state_dict().items():
            state[f"module.{theirs}.{key}"] = value
        head = getattr(source, f"projection_head{ours}").state_dict()
        for key, value in head.items():
            index, name = key.split(".")[1:]
            state[f"module.{theirs}.fc.{index}.{name}"] = value
    queue = torch.nn.functional.normalize(torch.randn(128, 64), dim=0)
    state["module.queue"] = queue
    state["module.queue_ptr"] = torch.tensor([8])
    path = tmp_path / "moco_v2_200ep_pretrain.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, path)
    mcp = MCP(**EXAMPLE, pruning_ratio=0.5, dense_checkpoint=str(path), input_size=32)
    assert mcp.dense_load_report[0] == "format: moco-official"
    for a, b in zip(
        mcp.backbone_momentum.parameters(), source.backbone_momentum.parameters()
    ):
        assert torch.equal(a, b)
    assert torch.equal(mcp.criterion.memory_bank.bank, queue.t())
    assert int(mcp.criterion.memory_bank.bank_ptr) == 8


def test_lightly_benchmark_format(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = MoCoV2(**EXAMPLE)
    state = {}
    for key, value in source.state_dict().items():
        key = key.replace("backbone_momentum.net.", "key_backbone.")
        key = key.replace("projection_head_momentum.", "key_projection_head.")
        key = key.replace("backbone.net.", "backbone.")
        state[key] = value
    path = tmp_path / "benchmark.ckpt"
    torch.save({"state_dict": state}, path)
    mcp = MCP(**EXAMPLE, pruning_ratio=0.5, dense_checkpoint=str(path), input_size=32)
    assert mcp.dense_load_report[0] == "format: lightly-benchmark"
    for part in ("backbone", "backbone_momentum", "projection_head_momentum"):
        for a, b in zip(
            getattr(mcp, part).parameters(), getattr(source, part).parameters()
        ):
            assert torch.equal(a, b)


def test_example_checkpoint_for_other_backbone_is_refused(example_model) -> None:  # type: ignore[no-untyped-def]
    _, path = example_model
    with pytest.raises(
        CheckpointError, match="set backbone.name: torchvision/resnet18"
    ):
        MCP(
            **{**EXAMPLE, "backbone": "torchvision/resnet34"},
            dense_checkpoint=str(path),
        )


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(
        CheckpointError, match="not a MoCo checkpoint this project knows"
    ):
        MCP(**EXAMPLE, dense_checkpoint=str(path))


def test_cli_prunes_from_a_lightly_example_checkpoint(
    example_model, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """`lightly-mcp prune RECIPE --from CKPT` with lightly's example checkpoint."""
    import json

    import yaml

    from lightly_mcp.app.cli import main
    from tests.helpers import TINY_RECIPE

    _, path = example_model
    recipe = {
        k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_RECIPE.items()
    }
    recipe["backbone"] = {"name": "torchvision/resnet18", "small_input": False}
    recipe["pretrain"] = {
        **recipe["pretrain"],
        "projection_hidden_dim": 512,
        "projection_dim": 128,
        "projection_batch_norm": False,
        "memory_bank_size": 64,
    }
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert (
        main(
            [
                "prune",
                str(recipe_path),
                "--from",
                str(path),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    done = json.loads((out / "prune" / "done.json").read_text())
    assert done["dense_load_report"][0] == "format: lightly-example"
    assert any("backbone_momentum" in line for line in done["dense_load_report"])
    assert (out / "prune" / "final.ckpt").is_file()


# --- what the checkpoint says (issue 17, item 5) -------------------------------------
def test_example_checkpoint_and_recipe_defaults_name_every_key_to_set(
    example_model,
) -> None:  # type: ignore[no-untyped-def]
    """The recipe defaults of a first try (small_input, a 2048-wide head with
    BatchNorm, SplitBatchNorm): one message names every key and value to set."""
    _, path = example_model
    with pytest.raises(CheckpointError) as info:
        MCP(
            **{
                **EXAMPLE,
                "backbone_kwargs": {"small_input": True},
                "projection_hidden_dim": 2048,
                "projection_batch_norm": True,
                "split_batch_norm": 8,
            },
            pruning_ratio=0.5,
            dense_checkpoint=str(path),
            input_size=32,
        )
    message = str(info.value)
    assert "\n" not in message
    assert (
        "set backbone.small_input: false, pretrain.projection_hidden_dim: 512, "
        "pretrain.projection_batch_norm: false, pretrain.split_batch_norm: 0 "
    ) in message
    assert "a 7x7 stem" in message and "512-512-128 projection head without" in message
    assert f"lightly-mcp inspect {path}" in message


def test_inspect_prints_the_recipe_sections_a_checkpoint_needs(
    example_model, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    import yaml

    from lightly_mcp.app.cli import main

    example, path = example_model
    assert main(["inspect", str(path)]) == 0
    sections = yaml.safe_load(capsys.readouterr().out)
    assert sections == {
        "backbone": {"name": "torchvision/resnet18", "small_input": False},
        "pretrain": {
            "projection_hidden_dim": 512,
            "projection_dim": 128,
            "projection_batch_norm": False,
            "split_batch_norm": 0,
        },
    }  # lightly's NTXentLoss does not save its queue: no memory_bank_size
    # Those settings load it.
    p = sections["pretrain"]
    mcp = MCP(
        backbone=sections["backbone"]["name"],
        backbone_kwargs={"small_input": sections["backbone"]["small_input"]},
        batch_size_per_device=8,
        memory_bank_size=64,
        projection_hidden_dim=p["projection_hidden_dim"],
        projection_dim=p["projection_dim"],
        projection_batch_norm=p["projection_batch_norm"],
        split_batch_norm=p["split_batch_norm"],
        pruning_ratio=0.5,
        dense_checkpoint=str(path),
        input_size=32,
    )
    _assert_loaded(mcp, example)


def test_split_batch_norm_is_read_from_the_running_statistics(tmp_path: Path) -> None:
    from lightly_mcp.methods.checkpoints import checkpoint_settings

    torch.manual_seed(0)
    source = MoCoV2(**{**EXAMPLE, "projection_batch_norm": True}, split_batch_norm=4)
    path = tmp_path / "split.pt"
    torch.save(source.state_dict(), path)
    settings = checkpoint_settings(torch.load(path, weights_only=True))
    assert settings["pretrain.split_batch_norm"][0] == 4
    assert settings["pretrain.projection_batch_norm"][0] is True
    with pytest.raises(CheckpointError, match="set pretrain.split_batch_norm: 4 "):
        MCP(**EXAMPLE, projection_batch_norm=True, dense_checkpoint=str(path))


def test_first_prune_from_an_example_checkpoint_names_the_keys(
    example_model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """`lightly-mcp prune` with a recipe written for this project's own models."""
    import yaml

    from lightly_mcp.app.cli import main
    from tests.helpers import TINY_RECIPE

    _, path = example_model
    recipe = {**TINY_RECIPE, "backbone": {"name": "torchvision/resnet18"}}
    recipe["backbone"]["small_input"] = True
    recipe["pretrain"] = {**TINY_RECIPE["pretrain"], "projection_batch_norm": True}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    argv = ["prune", str(recipe_path), "--from", str(path), "--out", str(tmp_path)]
    assert main([*argv, "--quiet"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        "set backbone.small_input: false, pretrain.projection_hidden_dim: 512, " in line
    )
    assert "pretrain.projection_batch_norm: false" in line
    assert not (tmp_path / "prune").exists()


def test_from_checkpoint_adopts_a_lightly_example_checkpoints_settings(
    example_model, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """No model argument given: the backbone, head and queue come from the file."""
    example, path = example_model
    with caplog.at_level("INFO", logger="pytorch_lightning.utilities.rank_zero"):
        mcp = MCP.from_checkpoint(
            path, pruning_ratio=0.5, input_size=32, batch_size_per_device=8
        )
    assert mcp.dense_load_report[0] == "format: lightly-example"
    _assert_loaded(mcp, example)
    assert mcp.adopted_settings == {
        "backbone": "torchvision/resnet18",
        "backbone_kwargs": {"small_input": False},
        "projection_hidden_dim": 512,
        "projection_dim": 128,
        "projection_batch_norm": False,
        "split_batch_norm": 0,
    }  # not the queue size: lightly's memory bank is not saved in its checkpoints
    assert mcp.hparams["projection_hidden_dim"] == 512
    said = [
        r.getMessage() for r in caplog.records if "from_checkpoint" in r.getMessage()
    ]
    assert len(said) == 1
    assert f"'{path}' is a lightly-example checkpoint; adopted backbone=" in said[0]
    assert (
        "projection_hidden_dim=512, projection_dim=128, projection_batch_norm=False "
        "(a 512-512-128 projection head without BatchNorm)" in said[0]
    )


def test_from_checkpoint_reads_this_projects_hyperparameters(tiny_dense: Path) -> None:
    dense = torch.load(tiny_dense, map_location="cpu", weights_only=True)
    mcp = MCP.from_checkpoint(
        tiny_dense, pruning_ratio=0.5, input_size=16, momentum=0.5
    )
    assert mcp.dense_load_report[0] == "format: lightly-mcp"
    for key in ("backbone", "backbone_kwargs", "projection_dim", "memory_bank_size"):
        assert mcp.hparams[key] == dense["hyper_parameters"][key], key
    # A given argument wins over the checkpoint's and is not reported as adopted.
    assert mcp.hparams["momentum"] == 0.5 and "momentum" not in mcp.adopted_settings
    assert dense["hyper_parameters"]["backbone_kwargs"]["width_multiplier"] == 0.25


def test_from_checkpoint_of_an_unknown_file_names_the_formats(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="other.pt': not a MoCo checkpoint this"):
        MCP.from_checkpoint(path)


def test_mobilenet_width_is_read_from_the_stem() -> None:
    from lightly_mcp.methods.checkpoints import checkpoint_settings

    for width in (0.25, 0.5, 1.0):
        model = MoCoV2(
            backbone="torchvision/mobilenet_v2",
            backbone_kwargs={"width_multiplier": width},
            projection_hidden_dim=16,
            projection_dim=8,
            memory_bank_size=0,
        )
        found = checkpoint_settings({"state_dict": model.state_dict()})
        assert found["backbone.width_multiplier"][0] == width
