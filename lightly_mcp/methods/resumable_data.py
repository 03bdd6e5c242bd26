"""Training data that resumes exactly in the middle of an epoch.

A run interrupted mid-epoch and resumed from its checkpoint continues with the very
batch it would have trained on next, with the same augmentations, so that it ends
with the same model as the uninterrupted run. Two things make this possible:

- ``SeededItems`` draws every item's random augmentations from an RNG seeded by
  ``(seed, epoch, index)``, so the views of an image do not depend on the RNG's
  history, on the number of DataLoader workers or on how far they prefetched.
- ``ResumableLoader`` shuffles with a permutation seeded by ``(seed, epoch)`` and has
  ``state_dict()`` / ``load_state_dict()``, which Lightning saves in and restores from
  its checkpoints (``fit_loop`` → ``CombinedLoader``); the state is the epoch and the
  number of batches the loader has handed to the training loop.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Sized
from contextlib import contextmanager
from typing import Any, cast

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

#: A ``SeededItems`` key: ``(epoch, index)``.
Key = tuple[int, int]


@contextmanager
def _seeded_rng(entropy: list[int]) -> Iterator[None]:
    """Seeds torch's CPU RNG, numpy's and Python's from ``entropy`` inside the block
    and restores their previous states afterwards.
    """
    words = np.random.SeedSequence(entropy).generate_state(2)
    seed = (int(words[0]) << 32) | int(words[1])
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    # Only the CPU generator: augmentations run on the CPU, and torch.manual_seed
    # would also reseed (without restoring) the CUDA generators.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(int(words[0]))
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class SeededItems(Dataset[Any]):
    """A dataset whose items get reproducible random augmentations.

    Item ``(epoch, index)`` is ``dataset[index]`` computed with torch's (CPU), numpy's
    and Python's global RNGs seeded from ``(seed, epoch, index)``; the RNG states are
    restored afterwards, so loading data leaves the training RNG untouched. The same
    key always gives the same views, in the main process or in any worker, and the
    next epoch gives an image new views.

    Args:
        dataset: A map-style dataset whose transform draws from the global RNGs (as
            torchvision's and lightly's transforms do).
        seed: Base seed (e.g. the recipe's).
    """

    def __init__(self, dataset: Dataset[Any], seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))

    def __getitem__(self, key: Key | int) -> Any:
        """The item ``key = (epoch, index)``; a plain ``index`` means epoch 0."""
        epoch, index = (0, key) if isinstance(key, int) else key
        # Negative seeds map to distinct non-negative ones (two's complement).
        with _seeded_rng([self.seed & (2**64 - 1), epoch, index]):
            return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """Keys ``(epoch, index)`` of one epoch in a seeded random order, from a position.

    The order of epoch ``e`` is ``torch.randperm`` seeded with ``seed + e`` (as in
    ``DistributedSampler``); under DDP every rank takes its share of it. The number
    of ranks is read from ``torch.distributed`` when iterating, because the process
    group does not exist yet when the loader is built. Being a ``DistributedSampler``,
    Lightning keeps it instead of injecting its own, and calls ``set_epoch`` on it.

    Args:
        dataset: The (sized) dataset to sample.
        seed: Seed of the permutations.
        num_replicas: Number of ranks; ``None`` reads it from ``torch.distributed``
            (1 without a process group).
        rank: This rank; ``None`` reads it from ``torch.distributed``.
    """

    def __init__(
        self,
        dataset: Sized,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(
            cast(Dataset[Any], dataset),
            num_replicas=1 if num_replicas is None else num_replicas,
            rank=0 if rank is None else rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self._fixed = num_replicas is not None
        self._pass: tuple[int, int] | None = None

    def _resolve_ranks(self) -> None:
        """Reads the number of ranks and this rank from ``torch.distributed``."""
        if not self._fixed:
            if dist.is_available() and dist.is_initialized():
                self.num_replicas, self.rank = dist.get_world_size(), dist.get_rank()
            else:
                self.num_replicas, self.rank = 1, 0
        self.num_samples = len(cast(Sized, self.dataset)) // self.num_replicas
        self.total_size = self.num_samples * self.num_replicas

    def plan(self, epoch: int, start: int) -> None:
        """Makes the next pass give epoch ``epoch`` without its first ``start`` keys
        (of this rank's share); later passes follow ``set_epoch`` from key 0.
        """
        self.set_epoch(epoch)
        self._pass = (epoch, start)

    def __iter__(self) -> Iterator[Key]:
        epoch, start = self._pass if self._pass is not None else (self.epoch, 0)
        self._pass = None
        self._resolve_ranks()
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(cast(Sized, self.dataset)), generator=generator)
        share = order[self.rank : self.total_size : self.num_replicas].tolist()
        return iter([(epoch, index) for index in share[start:]])

    def __len__(self) -> int:
        self._resolve_ranks()
        return self.num_samples


class ResumableLoader(DataLoader):
    """A shuffling DataLoader (``drop_last=True``) that resumes mid-epoch exactly.

    Lightning saves ``state_dict()`` in every checkpoint and gives it back to
    ``load_state_dict()`` when it resumes; the next pass then starts with the batch
    after the last one handed to the training loop. Batches are counted in the main
    process as they are yielded, so workers prefetching ahead do not shift the
    position, and Lightning takes a batch from a loader with a length only when it
    is about to train on it, so the count is the number of batches trained on (also
    in a checkpoint written from ``on_train_batch_end``).

    A pass decides its epoch and start when its first batch is requested, not when
    ``iter()`` is called: Lightning may create the iterator before it restores the
    checkpoint or calls ``set_epoch`` (see ``restore_loader_positions``).

    Items are ``SeededItems`` keys, so a batch is the same with any number of workers
    and in a resumed run. Epochs follow Lightning's ``set_epoch`` calls; a loader
    iterated outside Lightning repeats epoch 0's order.

    Args:
        dataset: The training dataset (its transform draws from the global RNGs).
        batch_size: Images per batch (per rank under DDP).
        seed: Seed of the order and of the augmentations.
        num_workers: DataLoader worker processes (kept alive between epochs).
        num_replicas: Number of ranks; ``None`` reads it from ``torch.distributed``.
        rank: This rank; ``None`` reads it from ``torch.distributed``.
        **kwargs: Other ``DataLoader`` options (e.g. ``pin_memory``).
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int,
        seed: int = 0,
        num_workers: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        **kwargs: Any,
    ) -> None:
        items = SeededItems(dataset, seed)
        sampler = ResumableSampler(items, seed, num_replicas=num_replicas, rank=rank)
        super().__init__(
            items,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            # Worker base seeds come from this generator, not from the global RNG
            # (which the model's batch shuffle uses and checkpoints restore).
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        )
        self.seed = seed
        self._epoch = 0  # the epoch of the current (or restored) pass
        self._batches = 0  # batches of that epoch handed out
        self._resume = False  # whether the next pass continues at that position

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._pass()

    def _pass(self) -> Iterator[Any]:
        """One pass over the rest of the epoch (a generator: it starts lazily)."""
        sampler = cast(ResumableSampler, self.sampler)
        if not self._resume:
            self._epoch, self._batches = sampler.epoch, 0
        self._resume = False
        sampler.plan(self._epoch, self._batches * int(self.batch_size or 0))
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def _config(self) -> dict[str, int]:
        """What must match for a position to be restored."""
        sampler = cast(ResumableSampler, self.sampler)
        sampler._resolve_ranks()
        return {
            "seed": self.seed,
            "num_samples": len(cast(Sized, self.dataset)),
            "batch_size": int(self.batch_size or 0),
            "num_replicas": sampler.num_replicas,
        }

    def state_dict(self) -> dict[str, int]:
        """The current epoch and how many of its batches were handed out."""
        return {"epoch": self._epoch, "batches": self._batches, **self._config()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Makes the next pass continue where ``state_dict`` was taken.

        A finished epoch continues with the next one. If the data, batch size,
        number of ranks or seed changed, the position cannot be restored: the
        interrupted epoch restarts from its first batch, with a warning.
        """
        epoch, done = int(state_dict["epoch"]), int(state_dict["batches"])
        config = self._config()
        saved = {key: int(state_dict.get(key, -1)) for key in config}
        # The saved epoch's length, from the saved configuration.
        length = saved["num_samples"] // max(saved["num_replicas"], 1)
        length //= max(saved["batch_size"], 1)
        if done >= length > 0:
            epoch, done = epoch + 1, 0
        elif saved != config and done > 0:
            changed = ", ".join(
                f"{key} {saved[key]} -> {value}"
                for key, value in config.items()
                if saved[key] != value
            )
            warnings.warn(
                f"the training data changed since the checkpoint ({changed}); "
                f"epoch {epoch} restarts from its first batch instead of batch "
                f"{done + 1}.",
                stacklevel=2,
            )
            done = 0
        self._epoch, self._batches, self._resume = epoch, done, True
        cast(ResumableSampler, self.sampler).set_epoch(epoch)


def restore_loader_positions(trainer: pl.Trainer) -> None:
    """Gives the training loaders the positions saved in the resumed checkpoint.

    Works around Lightning issue #20550 (open in 2.6): when ``configure_optimizers``
    reads ``trainer.estimated_stepping_batches`` (as a cosine schedule over all
    steps does), Lightning sets up the training data before it restores the
    checkpoint and never calls the loaders' ``load_state_dict``. Call this from
    ``on_train_start``, before the first batch is fetched. It does nothing when
    Lightning has restored the loaders itself or when there is nothing to restore.
    """
    load = getattr(trainer.fit_loop, "_load_combined_loader_states", None)
    if callable(load):
        load()
