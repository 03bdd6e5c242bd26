"""Frozen-feature evaluation of a backbone: kNN and linear probe top-1 accuracy.

A *backbone* here is any module that maps images ``[B, 3, H, W]`` to features
``[B, D]`` (outputs with trailing singleton dimensions such as ``[B, D, 1, 1]`` are
flattened). The same functions evaluate the dense encoder, the masked momentum
subnet and the exported compact model, so their numbers are directly comparable.

* :func:`in_runtime` puts networks in the runtime that embeds the images (ONNX
  Runtime on the CPU where it is installed, else PyTorch);
* :func:`embed_models` runs several frozen models over a loader in one pass (each
  batch is loaded once and fed to every model) and caches their features;
  :func:`embed` is the one-model case.
* :func:`knn_top1` is weighted kNN with lightly's
  :func:`lightly.utils.benchmarking.knn_predict` (cosine similarity on
  L2-normalised features, votes weighted with ``exp(sim / t)``).
* :func:`linear_probe_top1` trains a linear layer on the cached, standardised
  features. It is *not* lightly's ``LinearClassifier``, which re-embeds the images
  every epoch (with augmentations); the probe here is cheaper and deterministic.
* :func:`evaluate_features` does both on cached features and returns a JSON-friendly
  dict; :func:`evaluate_backbones` embeds several models in one pass and evaluates
  each, :func:`evaluate_backbone` one model.
* :func:`raw_pixel_baseline` is kNN on flattened pixels, shown beside the models
  (:func:`raw_pixel_scores` on pixels already flattened).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightly_mcp.errors import InputError
from lightly_mcp.formats.runtimes import OnnxRuntimeNetwork, onnx_network
from lightly_mcp.pruning.measure import eval_mode
from lightly_mcp.pruning.momentum_subnet import MomentumSubnet

LINEAR_PROBE = (
    "linear layer on cached frozen features standardised with the training "
    "mean/std, cross-entropy, SGD (momentum 0.9, cosine LR), seeded "
    "torch.Generator for init and shuffling"
)
KNN = "lightly.utils.benchmarking.knn_predict, cosine, L2-normalised"


def _check_device(model: nn.Module, device: torch.device) -> None:
    param = next(model.parameters(), None)
    if param is None:
        return
    if param.device.type != device.type or (
        device.index is not None and param.device.index != device.index
    ):
        raise InputError(
            f"The model lives on {param.device} but embedding was asked on {device}; "
            f"move the model with model.to({str(device)!r}) first."
        )


def _num_batches(loader: DataLoader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def resolved_runtime(runtime: str, device: str | torch.device) -> str:
    """The runtime ``eval.runtime`` (``auto``, ``onnxruntime``, ``torch``) means on
    ``device``: ``auto`` is ONNX Runtime on the CPU where it is installed, else
    PyTorch.

    Raises:
        InputError: For ``onnxruntime`` off the CPU or without onnxruntime.
    """
    on_cpu = torch.device(device).type == "cpu"
    if runtime == "torch" or (runtime == "auto" and not on_cpu):
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        if runtime == "auto":
            return "torch"
        raise InputError(
            "'eval.runtime' is onnxruntime, but onnxruntime is not installed: "
            "pip install 'lightly-mcp[onnx]', or set eval.runtime: auto."
        ) from None
    if not on_cpu:
        raise InputError(
            f"'eval.runtime' is onnxruntime, which runs on the CPU, but the "
            f"evaluation runs on {torch.device(device).type}; set eval.runtime: auto "
            "or torch."
        )
    return "onnxruntime"


def in_runtime(
    models: Mapping[str, nn.Module],
    runtime: str,
    size: int,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``models`` in the runtime that embeds the evaluation images.

    With ``runtime`` resolving to ONNX Runtime (:func:`resolved_runtime`), each
    network with parameters is exported to ONNX in memory and run by ONNX Runtime
    (:func:`lightly_mcp.formats.runtimes.onnx_network`; a masked momentum subnet through
    its materialised copy, the same forward); a network that does not export
    stays in PyTorch under ``auto`` (the reason is returned) and is an error under
    ``onnxruntime``. Modules without parameters or buffers (raw pixels) stay as
    they are.

    Args:
        models: Networks by name (eval mode is set while exporting).
        runtime: ``auto``, ``onnxruntime`` or ``torch``.
        size: Image size the ONNX graphs are exported for (any batch size).
        device: Where the evaluation runs.

    Returns:
        The networks (ONNX Runtime modules or the originals), and per network with
        parameters or buffers the runtime it got: ``"onnxruntime"``, ``"torch"``, or
        ``"torch (why ONNX failed)"``.

    Raises:
        InputError: Under ``onnxruntime`` when it cannot run or a network does not
            export.
    """
    chosen = resolved_runtime(runtime, device)
    placed: dict[str, nn.Module] = {}
    used: dict[str, str] = {}
    for name, model in models.items():
        if isinstance(model, OnnxRuntimeNetwork):
            placed[name], used[name] = model, "onnxruntime"
            continue
        if (
            next(model.parameters(), None) is None
            and next(model.buffers(), None) is None
        ):
            placed[name] = model  # e.g. raw pixels: nothing to run faster
            continue
        if chosen == "torch":
            placed[name], used[name] = model, "torch"
            continue
        # The masked subnet computes through torch.func, which ONNX cannot trace;
        # its materialised copy computes the same forward with plain modules.
        plain = model.materialize() if isinstance(model, MomentumSubnet) else model
        with eval_mode(plain):
            try:
                placed[name] = onnx_network(plain, size)
                used[name] = "onnxruntime"
            except InputError as error:
                if runtime == "onnxruntime":
                    raise InputError(
                        f"'eval.runtime' is onnxruntime, but {name} does not export "
                        f"to ONNX ({error}); set eval.runtime: auto or torch."
                    ) from error
                placed[name], used[name] = model, f"torch ({error})"
    return placed, used


def embed_models(
    models: Mapping[str, nn.Module],
    loader: DataLoader,
    device: str | torch.device = "cpu",
    progress: bool = False,
    description: str = "embedding",
    on_batch: Callable[[Tensor, Tensor], None] | None = None,
    channels_last: bool = True,
) -> tuple[dict[str, Tensor], Tensor]:
    """Embeds every image of a loader with several frozen models, in one pass.

    Each batch is loaded (and transformed) once and fed to every model, so the data
    pipeline runs once whatever the number of models. Image batches are handed to
    the models in the ``channels_last`` memory format (the same values; convolutions
    then run in their faster NHWC kernels: 1.6x for the quickstart's MobileNetV2 on
    CPU, benchmarks/RESULTS_evaluation.md). The models run in eval mode
    under :func:`torch.inference_mode`; the train/eval mode of each model and of
    each of its submodules is restored afterwards. Images are moved to ``device``;
    the models must already live there.

    Args:
        models: Backbones by name, each mapping images ``[B, 3, H, W]`` to features
            ``[B, D]`` (trailing dimensions are flattened).
        loader: Yields batches ``(images, labels, ...)``; extra items (e.g.
            filenames) are ignored. If ``images`` is a list of views, the first
            view is used.
        device: Device the forward passes run on.
        progress: Whether to show a :class:`rich.progress.Progress` bar.
        description: Label of the progress bar.
        on_batch: Called with every batch's CPU ``(images, labels)`` (e.g. to hash
            the data), in loader order.
        channels_last: Hand 4-D image batches over in ``torch.channels_last``
            (False: as the loader yields them).

    Returns:
        ``(features, labels)``: per name a float32 CPU tensor ``[N, D]``, and the
        long CPU labels ``[N]``, in loader order.

    Raises:
        ValueError: If the loader is empty, a batch has no labels, or a model's
            parameters live on a different device than ``device``.
    """
    device = torch.device(device)
    for model in models.values():
        _check_device(model, device)
    # Only PyTorch's convolutions gain from channels_last (ONNX Runtime reads NCHW).
    to_channels_last = channels_last and any(
        next(model.parameters(), None) is not None for model in models.values()
    )
    feature_chunks: dict[str, list[Tensor]] = {name: [] for name in models}
    label_chunks: list[Tensor] = []

    def run(advance: Any = None) -> None:
        with torch.inference_mode():
            for batch in loader:
                if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                    raise InputError(
                        "embed() expects batches (images, labels, ...), got "
                        f"{type(batch).__name__}."
                    )
                images, labels = batch[0], batch[1]
                if isinstance(images, (list, tuple)):
                    images = images[0]
                labels = torch.as_tensor(labels).reshape(-1).long().cpu()
                if on_batch is not None:
                    on_batch(images, labels)
                images = images.to(device, non_blocking=True)
                if to_channels_last and images.ndim == 4:
                    images = images.contiguous(memory_format=torch.channels_last)
                for name, model in models.items():
                    features = model(images)
                    feature_chunks[name].append(features.flatten(1).float().cpu())
                label_chunks.append(labels)
                if advance is not None:
                    advance()

    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(eval_mode(model))
        if progress:
            from rich.progress import Progress

            bar = stack.enter_context(Progress(transient=True))
            task = bar.add_task(description, total=_num_batches(loader))
            run(lambda: bar.advance(task))
        else:
            run()

    if not label_chunks:
        raise InputError("The loader yielded no batches; nothing to embed.")
    # Concatenating outside inference mode gives ordinary tensors, which autograd
    # (e.g. the linear probe) may use.
    labels = torch.cat([chunk.clone() for chunk in label_chunks])
    features: dict[str, Tensor] = {}
    for name, chunks in feature_chunks.items():
        features[name] = torch.cat([chunk.clone() for chunk in chunks])
        if len(features[name]) != len(labels):
            raise InputError(
                f"Got {len(features[name])} feature rows but {len(labels)} labels; "
                "the model must return one feature vector per image."
            )
    return features, labels


def embed(
    model: nn.Module,
    loader: DataLoader,
    device: str | torch.device = "cpu",
    progress: bool = False,
    description: str = "embedding",
) -> tuple[Tensor, Tensor]:
    """Embeds every image of a loader with a frozen model (:func:`embed_models`
    with one model).

    Returns:
        ``(features, labels)``: float32 CPU tensor ``[N, D]`` and long CPU tensor
        ``[N]``, in loader order.

    Raises:
        ValueError: If the loader is empty, a batch has no labels, or the model's
            parameters live on a different device than ``device``.
    """
    features, labels = embed_models(
        {"model": model}, loader, device, progress, description
    )
    return features["model"], labels


def _check_labelled(
    train_labels: Tensor, test_labels: Tensor, num_classes: int | None
) -> int:
    """Validates labels and returns the number of classes."""
    if train_labels.numel() == 0 or test_labels.numel() == 0:
        raise InputError("Evaluation needs a non-empty training and test set.")
    if bool((train_labels < 0).all()) and bool((test_labels < 0).all()):
        raise InputError(
            "Evaluation needs labels, but every label is -1 (unlabelled data); "
            "use a labelled dataset for the train and test loaders."
        )
    if bool((train_labels < 0).any()) or bool((test_labels < 0).any()):
        raise InputError(
            "Evaluation needs labels for every sample, but some labels are negative."
        )
    inferred = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    if num_classes is None:
        return inferred
    if num_classes < inferred:
        raise InputError(
            f"num_classes={num_classes} but the labels go up to {inferred - 1}."
        )
    return num_classes


def _check_features(train_features: Tensor, test_features: Tensor) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise InputError("Features must be 2-D tensors [N, D].")
    if train_features.shape[1] != test_features.shape[1]:
        raise InputError(
            f"Train features have dimension {train_features.shape[1]} but test "
            f"features have {test_features.shape[1]}."
        )


def knn_top1(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> float:
    """Weighted kNN top-1 accuracy with lightly's ``knn_predict``.

    Features are L2-normalised, so the similarity is the cosine similarity; each
    of the ``k`` nearest training samples votes for its class with weight
    ``exp(sim / temperature)``, and the class with the largest sum wins. Test
    samples are processed in chunks of ``batch_size`` to bound memory.

    Args:
        train_features: Feature bank ``[N, D]``.
        train_labels: Labels ``[N]`` of the bank, in ``[0, num_classes)``.
        test_features: Query features ``[M, D]``.
        test_labels: Labels ``[M]`` of the queries.
        k: Number of neighbours; clipped to the bank size ``N``.
        temperature: Temperature of the vote weights.
        num_classes: Number of classes; inferred as ``max label + 1`` if None.
        batch_size: Number of test samples per ``knn_predict`` call.

    Returns:
        Top-1 accuracy in ``[0, 1]``.

    Raises:
        ValueError: On empty, unlabelled or negative labels, mismatched shapes, or
            non-positive ``k``, ``temperature`` or ``batch_size``.
    """
    _check_features(train_features, test_features)
    classes = _check_labelled(train_labels, test_labels, num_classes)
    if k < 1 or temperature <= 0 or batch_size < 1:
        raise InputError("k, temperature and batch_size must be positive.")
    if len(train_features) != len(train_labels) or len(test_features) != len(
        test_labels
    ):
        raise InputError("Every feature row needs exactly one label.")
    bank = F.normalize(train_features.float(), dim=1).t().contiguous()
    bank_labels = train_labels.long().to(bank.device)
    queries = F.normalize(test_features.float(), dim=1).to(bank.device)
    targets = test_labels.long().to(bank.device)
    knn_k = min(k, bank.shape[1])
    correct = 0
    with torch.no_grad():
        for start in range(0, len(queries), batch_size):
            chunk = queries[start : start + batch_size]
            predictions = knn_predict(
                chunk, bank, bank_labels, classes, knn_k=knn_k, knn_t=temperature
            )[:, 0]
            correct += int((predictions == targets[start : start + batch_size]).sum())
    return correct / len(queries)


def linear_probe_top1(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int | None = None,
    epochs: int = 30,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Linear-probe top-1 accuracy on cached frozen features.

    A linear layer is trained on cached, standardised frozen features (each
    dimension standardised with the training mean and std; dimensions a million
    times flatter than the widest are treated as constant, so the result does not
    depend on the features' overall scale) with cross-entropy and
    SGD (momentum 0.9, per-step cosine LR from ``lr`` to 0, optional weight
    decay). This is not lightly's ``LinearClassifier``, which re-embeds images
    every epoch; features are computed once, so the probe is fast. The weights are
    initialised and the training set shuffled with a ``torch.Generator`` seeded
    with ``seed``, so the result is deterministic for a seed (on a given device).
    Training runs on the device of ``train_features``.

    Args:
        train_features: Training features ``[N, D]``.
        train_labels: Training labels ``[N]``.
        test_features: Test features ``[M, D]``.
        test_labels: Test labels ``[M]``.
        num_classes: Number of classes; inferred as ``max label + 1`` if None.
        epochs: Passes over the training features.
        lr: Peak learning rate.
        weight_decay: L2 penalty of SGD.
        batch_size: Mini-batch size.
        seed: Seed of initialisation and shuffling.

    Returns:
        Top-1 accuracy on the test features in ``[0, 1]``.

    Raises:
        ValueError: On empty, unlabelled or negative labels, mismatched shapes, or
            non-positive ``epochs`` or ``batch_size``.
    """
    _check_features(train_features, test_features)
    classes = _check_labelled(train_labels, test_labels, num_classes)
    if epochs < 1 or batch_size < 1:
        raise InputError("epochs and batch_size must be positive.")
    if len(train_features) != len(train_labels) or len(test_features) != len(
        test_labels
    ):
        raise InputError("Every feature row needs exactly one label.")
    device = train_features.device
    # Leave inference mode / no_grad if the caller is in one; clone so that
    # inference tensors become ordinary tensors autograd may save.
    with torch.inference_mode(False), torch.enable_grad():
        x_train = train_features.detach().clone().float()
        y_train = train_labels.detach().clone().long().to(device)
        x_test = test_features.detach().clone().float().to(device)
        y_test = test_labels.detach().clone().long().to(device)
        mean = x_train.mean(dim=0, keepdim=True)
        std = x_train.std(dim=0, unbiased=False, keepdim=True)
        # Relative floor: the probe is invariant to the features' overall scale
        # (a random-init MobileNetV2's features are ~1e-8, all below an absolute
        # floor of 1e-6, which left the probe nothing to learn from); dimensions
        # a million times flatter than the widest count as constant.
        std = std.clamp_min(1e-6 * float(std.max()) if std.numel() else 1e-6)
        std = std.clamp_min(torch.finfo(std.dtype).tiny)
        x_train = (x_train - mean) / std
        x_test = (x_test - mean) / std

        generator = torch.Generator().manual_seed(seed)
        dim = x_train.shape[1]
        bound = 1.0 / math.sqrt(dim) if dim > 0 else 0.0
        weight = (torch.rand(classes, dim, generator=generator) * 2 - 1) * bound
        bias = (torch.rand(classes, generator=generator) * 2 - 1) * bound
        layer = nn.Linear(dim, classes).to(device)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        optimizer = torch.optim.SGD(
            layer.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay
        )
        n = len(x_train)
        steps_per_epoch = math.ceil(n / batch_size)
        total_steps = epochs * steps_per_epoch
        step = 0
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(device)
            # One gather per epoch; each step then reads a contiguous slice (the
            # same rows as indexing with order[start : start + batch_size]).
            x_epoch, y_epoch = x_train[order], y_train[order]
            for start in range(0, n, batch_size):
                for group in optimizer.param_groups:
                    group["lr"] = (
                        0.5 * lr * (1 + math.cos(math.pi * step / total_steps))
                    )
                end = start + batch_size
                loss = F.cross_entropy(layer(x_epoch[start:end]), y_epoch[start:end])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
        with torch.no_grad():
            predictions = layer(x_test).argmax(dim=1)
            return float((predictions == y_test).float().mean())


def evaluate_features(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    linear_epochs: int = 30,
    seed: int = 0,
) -> dict[str, Any]:
    """Top-1 of cached frozen features with kNN and a linear probe.

    Args:
        train_features: Training features ``[N, D]`` (the kNN bank).
        train_labels: Training labels ``[N]``.
        test_features: Test features ``[M, D]``.
        test_labels: Test labels ``[M]``.
        k: Number of kNN neighbours.
        temperature: kNN temperature.
        linear_epochs: Epochs of the linear probe.
        seed: Seed of the linear probe.

    Returns:
        ``{"knn_top1", "linear_top1", "feature_dim", "num_train", "num_test",
        "settings"}`` where ``settings`` holds ``k``, ``temperature``,
        ``linear_epochs``, ``seed`` and one-line descriptions of the linear
        probe and the kNN classifier.

    Raises:
        ValueError: If the data is unlabelled (all labels -1) or otherwise
            unsuitable (see :func:`knn_top1`).
    """
    num_classes = _check_labelled(train_labels, test_labels, None)
    return {
        "knn_top1": knn_top1(
            train_features,
            train_labels,
            test_features,
            test_labels,
            k=k,
            temperature=temperature,
            num_classes=num_classes,
        ),
        "linear_top1": linear_probe_top1(
            train_features,
            train_labels,
            test_features,
            test_labels,
            num_classes=num_classes,
            epochs=linear_epochs,
            seed=seed,
        ),
        "feature_dim": int(train_features.shape[1]),
        "num_train": len(train_features),
        "num_test": len(test_features),
        "settings": {
            "k": k,
            "temperature": temperature,
            "linear_epochs": linear_epochs,
            "seed": seed,
            "linear_probe": LINEAR_PROBE,
            "knn": KNN,
        },
    }


def evaluate_backbones(
    models: Mapping[str, nn.Module],
    train_loader: DataLoader,
    test_loader: DataLoader,
    *,
    device: str | torch.device = "cpu",
    k: int = 200,
    temperature: float = 0.1,
    linear_epochs: int = 30,
    seed: int = 0,
    progress: bool = False,
    on_batch: Callable[[Tensor, Tensor], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Top-1 of several frozen backbones with kNN and a linear probe.

    The training and test sets are embedded once, in one pass for all models
    (:func:`embed_models`: every image is loaded once and goes through each model
    once); each model's cached features feed both :func:`knn_top1` and
    :func:`linear_probe_top1` (:func:`evaluate_features`). The models' train/eval
    modes are left unchanged.

    Args:
        models: Backbones by name, each mapping images ``[B, 3, H, W]`` to features
            ``[B, D]``, already on ``device``.
        train_loader: Labelled training data ``(images, labels, ...)``, without
            augmentations and ideally without shuffling.
        test_loader: Labelled test data ``(images, labels, ...)``.
        device: Device of the forward passes.
        k: Number of kNN neighbours.
        temperature: kNN temperature.
        linear_epochs: Epochs of the linear probe.
        seed: Seed of the linear probe.
        progress: Whether to show rich progress bars while embedding.
        on_batch: Called with every CPU ``(images, labels)`` batch, training set
            first (see :func:`embed_models`).

    Returns:
        Per name, the dict of :func:`evaluate_features`.

    Raises:
        ValueError: If the data is unlabelled (all labels -1) or otherwise
            unsuitable (see :func:`knn_top1`).
    """
    train_x, train_y = embed_models(
        models, train_loader, device, progress, "embed train", on_batch
    )
    test_x, test_y = embed_models(
        models, test_loader, device, progress, "embed test", on_batch
    )
    _check_labelled(train_y, test_y, None)
    return {
        name: evaluate_features(
            train_x[name],
            train_y,
            test_x[name],
            test_y,
            k=k,
            temperature=temperature,
            linear_epochs=linear_epochs,
            seed=seed,
        )
        for name in models
    }


def evaluate_backbone(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader,
    *,
    device: str | torch.device = "cpu",
    k: int = 200,
    temperature: float = 0.1,
    linear_epochs: int = 30,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Top-1 of a frozen backbone with kNN and a linear probe
    (:func:`evaluate_backbones` with one model).

    The training and test sets are embedded once; the cached features feed
    :func:`knn_top1` and :func:`linear_probe_top1`. The model's train/eval mode is
    left unchanged. A randomly initialised backbone evaluated the same way is the
    "random init" baseline.

    Returns:
        The dict of :func:`evaluate_features`.

    Raises:
        ValueError: If the data is unlabelled (all labels -1) or otherwise
            unsuitable (see :func:`knn_top1`).
    """
    return evaluate_backbones(
        {"model": model},
        train_loader,
        test_loader,
        device=device,
        k=k,
        temperature=temperature,
        linear_epochs=linear_epochs,
        seed=seed,
        progress=progress,
    )["model"]


def raw_pixel_scores(
    train_pixels: Tensor,
    train_labels: Tensor,
    test_pixels: Tensor,
    test_labels: Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    center: bool = True,
    linear_epochs: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The raw-pixel baseline on flattened images ``[N, C*H*W]`` (see
    :func:`raw_pixel_baseline`).
    """
    train_x, test_x = train_pixels, test_pixels
    if center:
        mean = train_x.mean(dim=0, keepdim=True)
        train_x = train_x - mean
        test_x = test_x - mean
    result: dict[str, Any] = {
        "knn_top1": knn_top1(
            train_x, train_labels, test_x, test_labels, k=k, temperature=temperature
        ),
        "feature_dim": int(train_x.shape[1]),
        "num_train": len(train_x),
        "num_test": len(test_x),
        "settings": {
            "k": k,
            "temperature": temperature,
            "center": center,
            "knn": f"{KNN}, raw pixels"
            + (", centred on the training mean image" if center else ""),
        },
    }
    if linear_epochs is not None:
        result["linear_top1"] = linear_probe_top1(
            train_x, train_labels, test_x, test_labels, epochs=linear_epochs, seed=seed
        )
        result["settings"]["linear_epochs"] = linear_epochs
    return result


def raw_pixel_baseline(
    train_loader: DataLoader,
    test_loader: DataLoader,
    *,
    k: int = 200,
    temperature: float = 0.1,
    center: bool = True,
    linear_epochs: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Top-1 of kNN (and optionally a linear probe) on flattened pixels, the
    baseline shown beside the models.

    Args:
        train_loader: Labelled training data ``(images, labels, ...)``.
        test_loader: Labelled test data ``(images, labels, ...)``.
        k: Number of kNN neighbours.
        temperature: kNN temperature.
        center: Whether to subtract the training set's mean image (per channel and
            pixel) from every image before the cosine similarity; without it the
            similarity is dominated by overall brightness.
        linear_epochs: If set, also train :func:`linear_probe_top1` on the pixels
            for that many epochs (``"linear_top1"`` in the result).
        seed: Seed of the linear probe.

    Returns:
        ``{"knn_top1", "feature_dim", "num_train", "num_test", "settings"}`` (and
        ``"linear_top1"`` with ``linear_epochs``) where ``settings`` holds ``k``,
        ``temperature``, ``center`` and a description of the kNN classifier.

    Raises:
        ValueError: If the data is unlabelled (all labels -1) or otherwise
            unsuitable (see :func:`knn_top1`).
    """
    flatten = nn.Flatten()
    train_x, train_y = embed(flatten, train_loader)
    test_x, test_y = embed(flatten, test_loader)
    return raw_pixel_scores(
        train_x,
        train_y,
        test_x,
        test_y,
        k=k,
        temperature=temperature,
        center=center,
        linear_epochs=linear_epochs,
        seed=seed,
    )
