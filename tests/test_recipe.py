from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightly_mcp.recipe import TOP_LEVEL_KEYS, RecipeError, load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


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


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mcp: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
