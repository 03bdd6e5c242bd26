"""Tests of lightly_mcp.methods.resumable_data: loader position and seeded augmentations."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from lightly_mcp.app.assemble import training_data
from lightly_mcp.app.recipe import recipe_from_dict
from lightly_mcp.data import build_dataset
from lightly_mcp.methods.batched_views import BatchedViews
from lightly_mcp.methods.resumable_data import (
    ResumableLoader,
    ResumableSampler,
    SeededItems,
)
from lightly_mcp.methods.transforms import build_transform


class RandomItems(Dataset):
    """Item i is (i, a draw from each global RNG): a stand-in for augmentations."""

    def __init__(self, n: int = 20) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return i, torch.rand(2), np.random.rand(), random.random()


def _batches(loader: Any, count: int | None = None) -> list[Any]:
    out = []
    for batch in loader:
        out.append(batch)
        if count is not None and len(out) == count:
            break
    return out


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(
        all(torch.equal(torch.as_tensor(x), torch.as_tensor(y)) for x, y in zip(p, q))
        for p, q in zip(a, b)
    )


def _indices(batches: list[Any]) -> list[list[int]]:
    return [batch[0].tolist() for batch in batches]


def test_state_after_k_batches_and_resume_yields_the_rest_in_order() -> None:
    loader = ResumableLoader(RandomItems(20), batch_size=3, seed=5)
    assert len(loader) == 6  # drop_last
    assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["batches"] == 0
    iterator = iter(loader)
    first = [next(iterator) for _ in range(2)]
    state = loader.state_dict()
    assert (state["epoch"], state["batches"]) == (0, 2)
    rest = list(iterator)
    assert loader.state_dict()["batches"] == 6

    torch.manual_seed(123)  # the resumed loader must not depend on the global RNG
    resumed = ResumableLoader(RandomItems(20), batch_size=3, seed=5)
    resumed.load_state_dict(state)
    again = _batches(resumed)
    assert _same(again, rest)  # same indices and the same "augmentations"
    assert resumed.state_dict()["batches"] == 6
    seen = sum(_indices(first + again), [])
    assert len(seen) == len(set(seen)) == 18


def test_finished_epoch_resumes_with_the_next_epoch() -> None:
    loader = ResumableLoader(RandomItems(20), batch_size=3, seed=5)
    _batches(loader)
    resumed = ResumableLoader(RandomItems(20), batch_size=3, seed=5)
    resumed.load_state_dict(loader.state_dict())
    reference = ResumableLoader(RandomItems(20), batch_size=3, seed=5)
    reference.sampler.set_epoch(1)
    assert _same(_batches(resumed), _batches(reference))
    assert resumed.state_dict()["epoch"] == 1


def test_each_epoch_reshuffles_deterministically() -> None:
    def order(seed: int, epoch: int) -> list[list[int]]:
        loader = ResumableLoader(RandomItems(20), batch_size=4, seed=seed)
        loader.sampler.set_epoch(epoch)
        return _indices(_batches(loader))

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(sum(order(0, 1), [])) == sorted(set(sum(order(0, 1), [])))


def test_changed_data_restarts_the_epoch_with_a_warning() -> None:
    loader = ResumableLoader(RandomItems(20), batch_size=3, seed=5)
    _batches(loader, 2)
    other = ResumableLoader(RandomItems(20), batch_size=4, seed=5)
    with pytest.warns(UserWarning, match=r"batch_size 3 -> 4.*restarts from its first"):
        other.load_state_dict(loader.state_dict())
    assert len(_batches(other)) == 5


def test_ranks_take_disjoint_equal_shares_of_the_epoch() -> None:
    items = RandomItems(21)
    shares = []
    for rank in range(2):
        sampler = ResumableSampler(items, seed=2, num_replicas=2, rank=rank)
        sampler.set_epoch(3)
        shares.append(list(sampler))
        assert len(sampler) == 10
    assert all(epoch == 3 for epoch, _ in shares[0] + shares[1])
    indices = [i for _, i in shares[0]] + [i for _, i in shares[1]]
    assert len(indices) == len(set(indices)) == 20
    single = ResumableSampler(items, seed=2, num_replicas=1, rank=0)
    single.set_epoch(3)
    assert sorted(indices) == sorted(i for _, i in list(single)[:20])


def _digits(n: int = 8) -> Any:
    return build_dataset(
        "digits", train=True, transform=build_transform(input_size=16), subset=n
    )


def test_seeded_items_depend_on_seed_epoch_and_index_only() -> None:
    items = SeededItems(_digits(), seed=7)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    (a1, a2), label = items[(0, 3)]
    # The global RNGs are left as they were.
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]
    torch.manual_seed(99)  # another RNG history gives the same views
    (b1, b2), _ = items[(0, 3)]
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)  # two different random views of one image
    (c1, _), _ = items[(1, 3)]
    assert not torch.equal(a1, c1)  # the next epoch gives new views
    (d1, _), _ = SeededItems(_digits(), seed=8)[(0, 3)]
    assert not torch.equal(a1, d1)
    assert items[3][1] == label


@pytest.mark.parametrize("batched", [True, False])
def test_pipeline_loader_is_the_same_with_workers_and_after_resume(
    batched: bool,
) -> None:
    recipe = recipe_from_dict(
        {
            "seed": 1,
            "data": {
                "kind": "digits",
                "input_size": 16,
                "subset": 24,
                "batched_augment": batched,
            },
            "mcp": {"batch_size": 4},
        }
    )
    dataset, loader = training_data(recipe, 4)
    assert isinstance(loader, ResumableLoader)
    assert isinstance(dataset.transform, BatchedViews) is batched
    loader.sampler.set_epoch(1)
    reference = _batches(loader)

    recipe.data.num_workers = 2
    _, workers = training_data(recipe, 4)
    workers.sampler.set_epoch(1)
    iterator = iter(workers)
    head = [next(iterator) for _ in range(2)]  # workers prefetch further ahead
    state = workers.state_dict()
    assert (state["epoch"], state["batches"]) == (1, 2)
    _, resumed = training_data(recipe, 4)
    resumed.load_state_dict(state)
    tail = _batches(resumed)

    def flat(batches: list[Any]) -> list[torch.Tensor]:
        return [t for (v1, v2), label in batches for t in (v1, v2, label)]

    assert len(head) + len(tail) == len(reference) == 6
    assert _same([flat(head + tail)], [flat(reference)])


def test_loader_seed_changes_order_and_views_but_not_the_subset() -> None:
    recipe = recipe_from_dict(
        {"seed": 1, "data": {"kind": "digits", "input_size": 16, "subset": 24}}
    )
    data_a, loader_a = training_data(recipe, 4)
    data_b, loader_b = training_data(recipe, 4, loader_seed=7)
    assert list(data_a.base_labels) == list(data_b.base_labels)  # same images
    assert loader_a.sampler.seed == 1 and loader_b.sampler.seed == 7
    labels_a = torch.cat([label for _, label in _batches(loader_a)])
    labels_b = torch.cat([label for _, label in _batches(loader_b)])
    assert sorted(labels_a.tolist()) == sorted(labels_b.tolist())
    assert not torch.equal(labels_a, labels_b)  # another order
