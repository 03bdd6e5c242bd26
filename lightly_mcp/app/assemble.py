"""Recipe → objects: the data, models and trainer that a recipe describes.

Every stage of ``lightly_mcp.app.pipeline``, the preflight check and the benchmarks
build what they train and evaluate through these functions, so that a recipe means the
same model, data and schedule wherever it is used:

- data: :func:`dataset_kind`, :func:`recipe_dataset`, :func:`training_data`,
  :func:`training_transform`,
  :func:`evaluation_data`, :func:`export_recalibration_data`;
- models: :func:`backbone_kwargs`, :func:`moco_kwargs` (``MoCoV2``), :func:`mcp_model`
  (``MCP``);
- training: :func:`trainer_for` (a Lightning ``Trainer`` writing into a stage folder).

Examples:
    >>> recipe = load_recipe("recipes/quickstart.yaml")
    >>> dataset, loader = training_data(recipe, recipe.mcp.batch_size)
    >>> model = mcp_model(recipe, dense=Path("run/pretrain/final.ckpt"))
    >>> trainer = trainer_for(recipe, Path("run/prune"), epochs=1, max_steps=-1,
    ...                       progress=False)
    >>> trainer.fit(model, loader)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightly_mcp.app.recipe import HELD_OUT_CLASSES, Recipe, transfer_entry
from lightly_mcp.data import (
    LabeledImages,
    build_dataset,
    default_dataset_kind,
    fallback_note,
)
from lightly_mcp.errors import RecipeError
from lightly_mcp.methods.backbones import Backbone, build_backbone
from lightly_mcp.methods.batched_views import BatchedViews, collate_for
from lightly_mcp.methods.callbacks import (
    AtomicCheckpointIO,
    KeepEpochCheckpoints,
    TrainingClock,
)
from lightly_mcp.methods.loggers import ResumableCSVLogger
from lightly_mcp.methods.mcp import MCP
from lightly_mcp.methods.resumable_data import ResumableLoader
from lightly_mcp.methods.transforms import (
    MCPTransform,
    NormalizeBatch,
    build_transform,
    eval_pixels,
)


# --- data ---------------------------------------------------------------------------
def dataset_kind(recipe: Recipe) -> str:
    """The dataset kind, resolving ``auto`` (Fashion-MNIST in ``data.root`` or the
    Debian package's folder, else digits).
    """
    d = recipe.data
    return default_dataset_kind(d.root) if d.kind == "auto" else d.kind


def recipe_dataset(recipe: Recipe, **options: Any) -> LabeledImages:
    """``build_dataset`` with the recipe's data: a subset larger than the dataset
    means all of it, and the digits fallback of ``auto`` says so in ``describe()``
    (on the training split).
    """
    d = recipe.data
    kind = dataset_kind(recipe)
    dataset = build_dataset(
        kind,
        root=d.root,
        seed=recipe.seed,
        download=d.download,
        clamp_subset=True,
        **options,
    )
    if d.kind == "auto" and kind == "digits" and options.get("train", True):
        dataset.fallback_note = fallback_note(d.root)
    return dataset


def training_data(
    recipe: Recipe,
    batch_size: int,
    transform: Any = None,
    loader_seed: int | None = None,
) -> tuple[LabeledImages, DataLoader]:
    """Two-view training data and loader; refuses a batch larger than the data.

    The loader shuffles with a permutation seeded by ``(loader_seed, epoch)``, seeds
    every image's augmentations by ``(loader_seed, epoch, index)`` and keeps its
    position in Lightning checkpoints, so a stage interrupted mid-epoch resumes with
    the very next batch (see ``lightly_mcp.methods.resumable_data``).

    Args:
        recipe: The recipe (``data`` section and ``seed``).
        batch_size: Images per batch.
        transform: Defaults to the recipe's MoCo v2 views
            (:func:`training_transform`).
        loader_seed: Seeds the order and augmentations, not the subset (default
            ``recipe.seed``).

    Returns:
        ``(dataset, loader)``.

    Raises:
        RecipeError: When ``batch_size`` is larger than the training set.

    Examples:
        >>> dataset, loader = training_data(recipe, recipe.pretrain.batch_size)
        >>> (query_view, key_view), labels, *_ = next(iter(loader))
    """
    d = recipe.data
    if transform is None:
        transform = training_transform(recipe)
    dataset = recipe_dataset(
        recipe, train=True, transform=transform, subset=d.subset, classes=d.classes
    )
    if batch_size > len(dataset):
        raise RecipeError(
            f"batch size {batch_size} is larger than the training set "
            f"({len(dataset)} images); lower the batch size or use more data."
        )
    loader = ResumableLoader(
        dataset,
        batch_size=batch_size,
        seed=recipe.seed if loader_seed is None else loader_seed,
        num_workers=d.num_workers,
        collate_fn=collate_for(dataset),
    )
    return dataset, loader


def training_transform(recipe: Recipe) -> MCPTransform | BatchedViews:
    """The MoCo v2 views of the recipe: :class:`BatchedViews` with
    ``data.batched_augment`` where the views have no blur (``input_size`` ≤ 64),
    else lightly's per-image transform.
    """
    d = recipe.data
    if d.batched_augment and d.input_size <= 64:
        return BatchedViews(input_size=d.input_size, min_scale=d.min_scale)
    return build_transform(input_size=d.input_size, min_scale=d.min_scale)


#: The name of the evaluation on the training data's own test split.
IN_DOMAIN = "in_domain"


def evaluation_names(recipe: Recipe) -> list[str]:
    """The evaluations a run makes: :data:`IN_DOMAIN`, then ``eval.transfer``'s."""
    return [IN_DOMAIN] + [transfer_entry(entry)[0] for entry in recipe.eval.transfer]


def held_out_classes(recipe: Recipe) -> list[int]:
    """The class ids of the training kind that ``data.classes`` leaves out.

    Raises:
        RecipeError: Without ``data.classes``, or when it keeps every class.
    """
    if recipe.data.classes is None:
        raise RecipeError(f"'eval.transfer: [{HELD_OUT_CLASSES}]' needs 'data.classes'")
    seen = recipe_dataset(recipe, train=True, classes=recipe.data.classes)
    assert seen.kept_classes is not None and seen.base_num_classes is not None
    held = [i for i in range(seen.base_num_classes) if i not in seen.kept_classes]
    if not held:
        raise RecipeError(
            "'data.classes' keeps every class, so none is held out for "
            f"'{HELD_OUT_CLASSES}'; drop a class or the evaluation"
        )
    return held


def evaluation_data(
    recipe: Recipe, on: str = IN_DOMAIN
) -> tuple[DataLoader, DataLoader, str, bool]:
    """Loaders of the train (bank) and test images of one evaluation, a
    description, and whether the images carry labels (image folders without class
    sub-folders do not).

    Args:
        recipe: The recipe (``data``, ``eval`` and ``seed``).
        on: :data:`IN_DOMAIN` (the training data's splits, of ``data.classes``
            when set) or a name from ``eval.transfer`` (see
            :func:`evaluation_names`).

    Examples:
        >>> bank, test, description, has_labels = evaluation_data(recipe)
        >>> result = evaluate_backbone(backbone, bank, test, k=recipe.eval.k)
    """
    d, e = recipe.data, recipe.eval
    # eval_transform's values, its conversion and normalisation done per batch.
    transform = eval_pixels(d.input_size)
    if on == IN_DOMAIN:

        def split(train: bool, subset: int | None) -> LabeledImages:
            return recipe_dataset(
                recipe,
                train=train,
                subset=subset,
                transform=transform,
                classes=d.classes,
            )
    else:
        entries = {entry[0]: entry for entry in map(transfer_entry, e.transfer)}
        if on not in entries:
            raise RecipeError(
                f"no evaluation {on!r}; the recipe's: "
                f"{', '.join(evaluation_names(recipe))}"
            )
        name, kind, root = entries[on]
        held = held_out_classes(recipe) if name == HELD_OUT_CLASSES else None

        def split(train: bool, subset: int | None) -> LabeledImages:
            if held is not None:
                return recipe_dataset(
                    recipe,
                    train=train,
                    subset=subset,
                    transform=transform,
                    classes=held,
                )
            return build_dataset(
                kind,
                root=root,
                train=train,
                subset=subset,
                transform=transform,
                seed=recipe.seed,
                clamp_subset=True,
            )

    train = split(True, e.train_subset)
    test = split(False, e.test_subset)
    loaders = [
        DataLoader(
            ds,
            batch_size=e.batch_size,
            shuffle=False,
            num_workers=d.num_workers,
            collate_fn=NormalizeBatch(),
        )
        for ds in (train, test)
    ]
    description = f"{train.describe()}; {test.describe()}"
    return loaders[0], loaders[1], description, train.has_labels and test.has_labels


def export_recalibration_data(recipe: Recipe) -> DataLoader | None:
    """Training images for ``export.recalibrate_bn`` (None when it is off)."""
    if not recipe.export.recalibrate_bn:
        return None
    return training_data(recipe, recipe.mcp.batch_size)[1]


# --- models -------------------------------------------------------------------------
def backbone_kwargs(recipe: Recipe) -> dict[str, Any]:
    """Options for ``build_backbone`` from the recipe (see :func:`recipe_backbone`)."""
    b = recipe.backbone
    kwargs: dict[str, Any] = {"small_input": b.small_input}
    if b.width_multiplier is not None:
        kwargs["width_multiplier"] = b.width_multiplier
    if b.weights is not None:
        kwargs["weights"] = b.weights
    return kwargs


def recipe_backbone(recipe: Recipe, weights: bool = True) -> Backbone:
    """The recipe's backbone, built with ``build_backbone``.

    Args:
        recipe: The recipe (its ``backbone`` section).
        weights: Load ``backbone.weights`` when the recipe names a file (False: the
            architecture at its random initialisation, e.g. the random-init baseline).

    Examples:
        >>> backbone = recipe_backbone(load_recipe("recipes/quickstart.yaml"))
        >>> backbone.feature_dim
        1280
    """
    kwargs = backbone_kwargs(recipe)
    if not weights:
        kwargs.pop("weights", None)
    return build_backbone(recipe.backbone.name, **kwargs)


def moco_kwargs(recipe: Recipe, stage: str) -> dict[str, Any]:
    """``MoCoV2`` arguments; the training schedule comes from ``stage``'s section.

    Args:
        recipe: The recipe (``backbone`` and ``pretrain`` sections).
        stage: ``"pretrain"`` (the ``pretrain`` schedule, with its warm-up) or any
            other stage (the ``mcp`` schedule, no warm-up).

    Examples:
        >>> model = MoCoV2(**moco_kwargs(recipe, "pretrain"))
    """
    p = recipe.pretrain
    schedule = recipe.pretrain if stage == "pretrain" else recipe.mcp
    return {
        "backbone": recipe.backbone.name,
        "backbone_kwargs": backbone_kwargs(recipe),
        "batch_size_per_device": schedule.batch_size,
        "temperature": p.temperature,
        "momentum": p.momentum,
        "memory_bank_size": p.memory_bank_size,
        "projection_hidden_dim": p.projection_hidden_dim,
        "projection_dim": p.projection_dim,
        "projection_batch_norm": p.projection_batch_norm,
        "split_batch_norm": p.split_batch_norm,
        "lr": schedule.lr,
        "weight_decay": schedule.weight_decay,
        "symmetric_loss": p.symmetric_loss,
        "warmup_epochs": p.warmup_epochs if stage == "pretrain" else 0,
        "channels_last": recipe.trainer.channels_last,
    }


def mcp_model(recipe: Recipe, dense: Path | None = None) -> MCP:
    """The ``MCP`` module of the recipe, starting from ``dense`` when given.

    With ``mcp.target_params`` the uniform pruning ratio is solved by ``MCP`` on its
    own backbone and channel groups (one build, one trace) and recorded as its
    ``pruning_ratio`` hyper-parameter.

    Args:
        recipe: The recipe (``mcp``, ``pretrain``, ``backbone`` and ``data``).
        dense: A dense MoCo checkpoint to start from (random init if None).

    Examples:
        >>> model = mcp_model(recipe, dense=Path("run/pretrain/final.ckpt"))
        >>> ratio = model.hparams["pruning_ratio"]  # given, or solved for the target
    """
    m = recipe.mcp
    options: dict[str, Any] = {
        "rho": m.rho,
        "rho_growth": m.rho_growth,
        "rho_response": m.rho_response,
        "admm_interval": m.admm_interval,
        "admm_interval_unit": m.admm_interval_unit,
        "lr_schedule": m.lr_schedule,
        "frozen_blocks": m.frozen_blocks,
        "frozen_mask": m.frozen_mask,
        "transition": m.transition,
        "frq": m.frq,
        "dr": m.dr,
        "mask_updates": m.mask_updates,
        "schedule": m.schedule,
        "recalibration_batches": m.recalibration_batches,
        "keep_output_dim": m.keep_output_dim,
        "compact_keys": m.compact_keys,
        "round_to": m.round_to,
        "input_size": recipe.data.input_size,
        "dense_checkpoint": str(dense) if dense is not None else None,
    }
    if m.pruning_ratio is not None:
        options["pruning_ratio"] = m.pruning_ratio
    else:  # the recipe sets exactly one of them
        options["target_params"] = m.target_params
    return MCP(**options, **moco_kwargs(recipe, "mcp"))


# --- training -----------------------------------------------------------------------
def trainer_for(
    recipe: Recipe,
    stage_dir: Path,
    epochs: int,
    max_steps: int,
    progress: bool,
    keep_every_n_epochs: int = 0,
) -> pl.Trainer:
    """A Lightning Trainer writing checkpoints and logs into ``stage_dir``.

    It writes ``stage_dir/last.ckpt`` after every epoch, CSV and TensorBoard logs,
    and uses the recipe's ``trainer`` section (accelerator, devices, strategy,
    precision, logging interval).

    Args:
        recipe: The recipe (``trainer`` section).
        stage_dir: The stage's folder.
        epochs: ``max_epochs`` (-1: no limit).
        max_steps: ``max_steps`` (-1: no limit).
        progress: Show a rich progress bar and the model summary.
        keep_every_n_epochs: With n > 0, a checkpoint of every n-th epoch is also
            kept as ``stage_dir/epochs/epoch=NNN.ckpt`` (epochs counted from 1), for
            learning curves.

    Examples:
        >>> trainer = trainer_for(recipe, Path("run/pretrain"), epochs=10,
        ...                       max_steps=-1, progress=True)
        >>> trainer.fit(MoCoV2(**moco_kwargs(recipe, "pretrain")), loader)
    """
    t = recipe.trainer
    loggers: list[Any] = [ResumableCSVLogger(str(stage_dir), name="logs", version="")]
    loggers.append(TensorBoardLogger(str(stage_dir), name="tensorboard", version=""))
    callbacks: list[Any] = [
        # last.ckpt after every epoch (written atomically, AtomicCheckpointIO).
        ModelCheckpoint(
            dirpath=str(stage_dir),
            filename="last",
            save_top_k=1,
            every_n_epochs=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        ),
        TrainingClock(),
    ]
    if keep_every_n_epochs > 0:
        callbacks.append(
            KeepEpochCheckpoints(stage_dir / "epochs", keep_every_n_epochs)
        )
    if progress:
        callbacks.append(RichProgressBar())
    return pl.Trainer(
        max_epochs=epochs,
        max_steps=max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        precision=t.precision,  # type: ignore[arg-type]
        log_every_n_steps=t.log_every_n_steps,
        default_root_dir=str(stage_dir),
        logger=loggers,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=progress,
        enable_model_summary=progress,
    )
