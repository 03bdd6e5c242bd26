from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightly_mcp.app.recipe import TOP_LEVEL_KEYS, RecipeError, load_recipe
from lightly_mcp.pruning.schedule import BlockSchedule
from tests.helpers import MAX_MESSAGE, message_length

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path: Path) -> None:
    recipe = load_recipe(path)
    assert set(recipe.to_dict()) == set(TOP_LEVEL_KEYS)


def test_shipped_recipe_set() -> None:
    names = {p.name for p in RECIPES}
    assert {
        "quickstart.yaml",
        "fashion_mnist_mobilenetv2.yaml",
        "cifar10_mobilenetv2.yaml",
        "cifar100_resnet34.yaml",
        "imagefolder_timm.yaml",
        "fashion_mnist_dense_mobilenetv2.yaml",
        "fashion_mnist_dense_resnet18.yaml",
    } <= names


def test_top_level_keys() -> None:
    assert TOP_LEVEL_KEYS == (
        "seed",
        "data",
        "backbone",
        "pretrain",
        "mcp",
        "export",
        "eval",
        "trainer",
    )


def test_defaults_and_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, {"mcp": {"rho": 0.1}})
    recipe = load_recipe(
        path,
        [
            "mcp.pruning_ratio=0.5",
            "data.subset=100",
            "backbone.width_multiplier=null",
            "trainer.devices=2",
            "mcp.rho=1",
        ],
    )
    assert recipe.mcp.pruning_ratio == 0.5
    assert recipe.mcp.rho == 1.0 and isinstance(recipe.mcp.rho, float)
    assert recipe.data.subset == 100
    assert recipe.backbone.width_multiplier is None
    assert recipe.trainer.devices == 2
    assert recipe.pretrain.temperature == 0.1  # default kept


def test_exponent_floats_without_a_dot(tmp_path: Path) -> None:
    """PyYAML reads 5e-4 as a string (YAML 1.1); recipes take it as the float."""
    path = tmp_path / "recipe.yaml"
    path.write_text("pretrain:\n  weight_decay: 5e-4\nmcp:\n  rho: 1E-2\n")
    recipe = load_recipe(path, ["pretrain.lr=3e-2", "mcp.lr=+6E-2"])
    assert recipe.pretrain.weight_decay == 5e-4 and recipe.mcp.rho == 0.01
    assert recipe.pretrain.lr == 0.03 and recipe.mcp.lr == 0.06
    assert all(
        isinstance(v, float)
        for v in (recipe.pretrain.weight_decay, recipe.mcp.rho, recipe.pretrain.lr)
    )
    # Only numbers: other strings are still refused, and non-float keys keep theirs.
    with pytest.raises(RecipeError, match=r"'mcp.rho' must be float, got str 'e-3'"):
        load_recipe(path, ["mcp.rho=e-3"])
    with pytest.raises(RecipeError, match=r"'pretrain.epochs' must be int"):
        load_recipe(path, ["pretrain.epochs=1e2"])


@pytest.mark.parametrize(
    "data, overrides, match",
    [
        ({"mcp": {"prning_ratio": 0.5}}, [], r"unknown key 'mcp.prning_ratio'"),
        ({"foo": 1}, [], r"unknown key 'foo'"),
        ({"mcp": {"rho": "high"}}, [], r"'mcp.rho' must be float"),
        ({"pretrain": {"epochs": 1.5}}, [], r"'pretrain.epochs' must be int"),
        ({"data": {"download": "yes"}}, [], r"'data.download' must be bool"),
        ({}, ["mcp.pruning_ratio=1.0"], r"'mcp.pruning_ratio' must be in \[0, 1\)"),
        ({}, ["mcp.pruning_ratio=-0.1"], r"'mcp.pruning_ratio' must be in \[0, 1\)"),
        ({}, ["mcp.rho=-1"], r"'mcp.rho' must be >= 0"),
        ({}, ["mcp.frq=-1"], r"'mcp.frq' must be an integer >= 0"),
        ({}, ["mcp.dr=-3"], r"'mcp.dr' must be an integer >= 0"),
        ({}, ["mcp.admm_interval=0"], r"'mcp.admm_interval' must be an integer >= 1"),
        ({}, ["mcp.target_params=0.9"], r"exactly one of"),
        ({}, ["mcp.rho_response=0"], r"'mcp.rho_response' must be > 0"),
        (
            {},
            ["mcp.rho_response=1", "mcp.rho_growth=1.1"],
            r"'mcp.rho_growth' must be 1 with 'mcp.rho_response'",
        ),
        ({}, ["mcp.lr_schedule=step"], r"'mcp.lr_schedule' must be one of cosine"),
        ({}, ["mcp.transition=soft"], r"'mcp.transition' must be one of paper"),
        ({}, ["mcp.frozen_blocks=-1"], r"'mcp.frozen_blocks' must be an integer"),
        ({}, ["mcp.recalibration_batches=-1"], r"'mcp.recalibration_batches'"),
        ({}, ["pretrain.split_batch_norm=3"], r"divisible"),
        ({}, ["mcp.pruning_ratio"], r"section.key=value"),
        ({"mcp": 3}, [], r"'mcp' must be a mapping"),
    ],
)
def test_bad_recipes_name_the_key(
    tmp_path: Path, data: dict, overrides: list[str], match: str
) -> None:
    with pytest.raises(RecipeError, match=match):
        load_recipe(_write(tmp_path, data), overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["mcp.pruning_ration=0.5"],
            r"unknown key 'mcp.pruning_ration'; did you mean "
            r"'mcp.pruning_ratio'\? all keys: lightly_mcp/app/recipe.py",
        ),
        (["mcp.=1"], r"unknown key 'mcp.'; all keys: lightly_mcp/app/recipe.py"),
        (["data.root=''"], r"'data.root' is an empty string"),
        (["pretrain.dense_checkpoint=''"], r"'pretrain.dense_checkpoint' is an empty"),
        (["backbone.weights=' '"], r"'backbone.weights' is an empty string"),
        (["data.root=~nosuchuser/x"], r"'data.root' is '~nosuchuser/x', but that user"),
        (["backbone.width_multiplier=1000"], r"'backbone.width_multiplier' must be in"),
        (["pretrain.memory_bank_size=1e12"], r"'pretrain.memory_bank_size' must be"),
        (["pretrain.memory_bank_size=1000000000000"], r"'pretrain.memory_bank_size'"),
        (["pretrain.projection_dim=1000000000"], r"'pretrain.projection_dim' must be"),
        (
            ["pretrain.memory_bank_size=1048576", "pretrain.projection_dim=65536"],
            r"'pretrain.memory_bank_size' x 'pretrain.projection_dim' must be at most",
        ),
        (["data.num_workers=100000"], r"'data.num_workers' must be in \[0, \d+\]"),
        (["eval.baselines=[pixels]"], r"'eval.baselines' must be true, false or a"),
        (["eval.baselines=[raw_pixels, raw_pixels]"], r"'eval.baselines' must be"),
        (["eval.baselines=[{}]"], r"'eval.baselines' must be true, false or a list"),
        (["eval.baselines=raw_pixels"], r"'eval.baselines' must be bool or list"),
        (
            ["eval.runtime=onnx"],
            r"'eval.runtime' must be one of auto, onnxruntime, torch; got 'onnx'",
        ),
        (["eval.runtime=3"], r"'eval.runtime' must be str"),
        (["data.classes=[]"], r"'data.classes' must be null \(all images\) or a"),
        (["data.classes=[1, 1]"], r"'data.classes' must be null"),
        (["data.classes=[-1]"], r"'data.classes' must be null"),
        (["data.classes=[true]"], r"'data.classes' must be null"),
        (["data.classes=3"], r"'data.classes' must be list or null"),
        (["eval.transfer=[mnist]"], r"entry 'mnist' is not held_out_classes or a"),
        (["eval.transfer=[{root: x}]"], r"entry \{'root': 'x'\} must be held_out"),
        (["eval.transfer=[digits, digits]"], r"'eval.transfer' names an evaluation"),
        (["eval.transfer=[in_domain]"], r"entry 'in_domain' is not held_out_classes"),
        (
            ["eval.transfer=[{kind: digits, name: in_domain}]"],
            r"'eval.transfer' names an evaluation twice \(or 'in_domain'\)",
        ),
        (["eval.transfer=[held_out_classes]"], r"needs 'data.classes'"),
        (["eval.transfer=[{kind: imagefolder, root: ''}]"], r"'root' must be a path"),
    ],
)
def test_bad_values_are_refused_in_one_short_line_naming_the_key(
    tmp_path: Path, overrides: list[str], match: str
) -> None:
    with pytest.raises(RecipeError, match=match) as refused:
        load_recipe(_write(tmp_path, {}), overrides)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and message_length(message) <= MAX_MESSAGE


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mcp: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


@pytest.mark.parametrize("name", ["cifar10_mobilenetv2.yaml", "cifar100_resnet34.yaml"])
def test_paper_recipes_express_the_papers_admm_schedule(name: str) -> None:
    """Sec. 4.1: 450 epochs, an ADMM update every 15, the rate restarting at 0.03 in
    every block and multiplied by 0.1 every 5 epochs."""
    m = load_recipe(RECIPES[0].parent / name).mcp
    assert (m.epochs, m.admm_interval, m.admm_interval_unit) == (450, 15, "epochs")
    assert (m.lr, m.batch_size, m.rho, m.transition) == (0.03, 256, 0.01, "paper")
    steps = 50_000 // 256  # CIFAR's epoch
    schedule = BlockSchedule(15 * steps, 450 * steps, lr_schedule=m.lr_schedule)
    first_epochs = [schedule.lr_factor(epoch * steps) for epoch in range(16)]
    assert first_epochs == pytest.approx([1.0] * 5 + [0.1] * 5 + [0.01] * 5 + [1.0])
    assert [d for d in range(450 * steps + 1) if schedule.is_update(d)] == [
        b * 15 * steps for b in range(1, 30)
    ]


@pytest.mark.parametrize(
    "value, names",
    [
        ("true", ("raw_pixels", "random_init")),
        ("false", ()),
        ("[]", ()),
        ("[random_init]", ("random_init",)),
        ("[random_init, raw_pixels]", ("raw_pixels", "random_init")),
    ],
)
def test_baselines_can_be_chosen_by_name(
    tmp_path: Path, value: str, names: tuple[str, ...]
) -> None:
    recipe = load_recipe(_write(tmp_path, {}), [f"eval.baselines={value}"])
    assert recipe.eval.baseline_names == names


def test_classes_and_transfer_entries(tmp_path: Path) -> None:
    from lightly_mcp.app.assemble import evaluation_names
    from lightly_mcp.app.recipe import transfer_entry

    recipe = load_recipe(
        _write(tmp_path, {}),
        [
            "data.classes=[0, Trouser, 2]",
            "eval.transfer=[held_out_classes, digits, "
            "{kind: imagefolder, root: /data/x}, {kind: digits, name: d2}]",
        ],
    )
    assert recipe.data.classes == [0, "Trouser", 2]
    assert evaluation_names(recipe) == [
        "in_domain",
        "held_out_classes",
        "digits",
        "imagefolder:/data/x",
        "d2",
    ]
    assert transfer_entry({"kind": "ImageFolder", "root": "/x"}) == (
        "imagefolder:/x",
        "imagefolder",
        "/x",
    )
