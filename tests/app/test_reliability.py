"""Exact resume, divergence, unsafe files and signals (the reliability issue)."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lightly_mcp.app.assemble import mcp_model, training_data
from lightly_mcp.app.cli import main
from lightly_mcp.app.recipe import Recipe, recipe_from_dict
from lightly_mcp.methods.checkpoints import CheckpointError, read_checkpoint
from lightly_mcp.methods.mcp import MCP
from lightly_mcp.methods.moco_v2 import TrainingDivergedError
from tests.helpers import (
    MAX_MESSAGE,
    TINY,
    TINY_RECIPE,
    loader,
    message_length,
    trainer,
)

MCP_ARGS = dict(
    pruning_ratio=0.5,
    frq=3,
    dr=1,
    admm_interval=3,
    admm_interval_unit="steps",
    rho=0.05,
    input_size=16,
)


# The paper's block schedule with ρ derived per block (blocks of 3 steps: the split
# after step 8 falls inside a block), and with a frozen-mask phase from step 6 on
# (the split falls inside it). No SGD momentum: 3-step blocks are too short for it.
BLOCK_SCHEDULES = {
    "cosine": {},
    "block_step_mid_block": dict(
        lr_schedule="block_step", rho_response=1.0, sgd_momentum=0.0
    ),
    "frozen_phase": dict(
        lr_schedule="block_cosine",
        rho_response=1.0,
        sgd_momentum=0.0,
        frozen_blocks=4,
    ),
}


def _model(schedule: str = "cosine") -> MCP:
    torch.manual_seed(0)
    args = {**MCP_ARGS, **BLOCK_SCHEDULES[schedule]}
    if "rho_response" in args:
        args.pop("rho")
    return MCP(**TINY, **args)


@pytest.mark.parametrize("schedule", list(BLOCK_SCHEDULES))
def test_resume_equals_uninterrupted_run(tmp_path: Path, schedule: str) -> None:
    """4 epochs straight == 2 epochs + checkpoint + resume for 2 more (7 steps of
    transition and 2 ADMM updates happen on each side of the split)."""
    straight = _model(schedule)
    trainer(tmp_path / "a", max_epochs=4).fit(straight, loader(n=32))

    class StopAfterTwoEpochs(Callback):
        """An interruption: the run is configured for 4 epochs (the LR schedule
        depends on it) but stops after 2."""

        def on_train_epoch_end(self, trainer: pl.Trainer, module: object) -> None:
            if trainer.current_epoch == 1:
                trainer.should_stop = True

    first = _model(schedule)
    fit = trainer(tmp_path / "b", max_epochs=4, callbacks=[StopAfterTwoEpochs()])
    fit.fit(first, loader(n=32))
    assert first.transition.iteration == 8
    path = tmp_path / "half.ckpt"
    fit.save_checkpoint(path)
    torch.manual_seed(999)  # the resumed run must not depend on the caller's RNG
    resumed = _model(schedule)
    torch.manual_seed(999)
    resumed_fit = trainer(tmp_path / "c", max_epochs=4)
    resumed_fit.fit(resumed, loader(n=32), ckpt_path=str(path), weights_only=True)

    assert resumed.transition.state_dict() == straight.transition.state_dict()
    assert resumed.transition.iteration == 16
    assert resumed.block_history == straight.block_history
    assert resumed.admm.rho == straight.admm.rho
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    bank_a, bank_b = straight.criterion.memory_bank, resumed.criterion.memory_bank
    assert torch.allclose(bank_a.bank, bank_b.bank, atol=1e-6)
    assert torch.equal(bank_a.bank_ptr, bank_b.bank_ptr)
    opt_a = straight.trainer.optimizers[0].state_dict()["state"]
    opt_b = resumed_fit.optimizers[0].state_dict()["state"]
    for key in opt_a:
        assert torch.allclose(
            opt_a[key]["momentum_buffer"], opt_b[key]["momentum_buffer"], atol=1e-6
        )
    lr_a = straight.trainer.lr_scheduler_configs[0].scheduler.state_dict()
    lr_b = resumed_fit.lr_scheduler_configs[0].scheduler.state_dict()
    assert lr_a["last_epoch"] == lr_b["last_epoch"]


def test_nan_loss_stops_with_the_likely_cause(tmp_path: Path) -> None:
    model = MCP(**TINY, **{**MCP_ARGS, "rho": 1e38})
    with pytest.raises(
        TrainingDivergedError, match="lower the learning rate .* mcp.rho"
    ):
        trainer(tmp_path, max_steps=3).fit(model, loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_not_executed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        read_checkpoint(path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    for argv in (
        ["export", str(path), "--out", str(tmp_path / "e")],
        ["prune", str(recipe), "--from", str(path), "--out", str(tmp_path / "p")],
        ["evaluate", str(path), str(recipe), "--out", str(tmp_path / "v")],
    ):
        assert main(argv) == 2
        assert "cannot be read safely" in capsys.readouterr().err
    assert not marker.exists()


def test_plain_state_dict_where_a_checkpoint_is_expected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "weights.pt"
    torch.save(_model().state_dict(), path)
    assert main(["export", str(path), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err
    assert not (tmp_path / "e").exists()


def test_truncated_resume_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    stage = tmp_path / "run" / "pretrain"
    stage.mkdir(parents=True)
    (stage / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    assert main(["pretrain", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    # A stage folder without its recorded recipe is refused before its last.ckpt
    # is read (outputs without provenance are never reused); a truncated file is
    # refused by the reader itself (tests/io/test_hostile_model_files.py).
    assert len(err.splitlines()) == 1
    assert "recorded recipe" in err and "missing" in err and "--restart" in err
    assert len(err.splitlines()) == 1 and message_length(err) <= MAX_MESSAGE


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightly_mcp", *args]


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    start = time.time()
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() - start < timeout, f"{path} did not appear"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_run_survives_sigterm_and_sigkill(tmp_path: Path, sig: signal.Signals) -> None:
    recipe = dict(TINY_RECIPE)
    # 20 epochs leave time to interrupt. ADMM blocks of 40 steps keep the steps
    # cheap: each mask change rebuilds the compact keys, and a change every 2 steps
    # (the tiny recipe's blocks) made this test several times slower.
    recipe["mcp"] = {**TINY_RECIPE["mcp"], "epochs": 20, "admm_interval": 40}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The preflight is not what is tested here (tests/app/test_preflight.py).
    process = subprocess.Popen(
        _cli("run", str(path), "--out", str(out), "--quiet", "--no-preflight"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Wait until MCP has written an end-of-epoch checkpoint, then interrupt it.
    _wait_for(out / "prune" / "last.ckpt", process)
    pretrain_mtime = (out / "pretrain" / "final.ckpt").stat().st_mtime
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert process.returncode == 143, err
        assert "stopped by SIGTERM" in err and "Run the same command again" in err
    else:
        assert process.returncode == -signal.SIGKILL
    interrupted = read_checkpoint(out / "prune" / "last.ckpt")  # complete, not torn
    assert interrupted["global_step"] >= 4
    assert not (out / "prune" / "done.json").exists()

    finish = subprocess.run(
        _cli(
            "run",
            str(path),
            "--out",
            str(out),
            "--quiet",
            "--no-preflight",
            "--set",
            "mcp.epochs=20",
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finish.returncode == 0, finish.stderr
    assert (out / "report.json").is_file()
    assert (out / "pretrain" / "final.ckpt").stat().st_mtime == pretrain_mtime
    done = read_checkpoint(out / "prune" / "final.ckpt")
    assert done["global_step"] == 20 * 4  # 64 images / batch 16, 20 epochs


# --- resume from inside an epoch, through the pipeline's loader ---------------------
MID_EPOCH_RECIPE = {
    **TINY_RECIPE,
    "seed": 3,
    "data": {"kind": "digits", "input_size": 16, "subset": 24},  # 3 batches of 8
    "pretrain": {**TINY_RECIPE["pretrain"], "batch_size": 8, "memory_bank_size": 32},
    "mcp": {**TINY_RECIPE["mcp"], "batch_size": 8, "frq": 3, "admm_interval": 3},
}
EPOCHS = 2


def _pipeline_mcp(recipe: Recipe, seed: int) -> MCP:
    """MCP as ``pipeline.prune`` builds it (random dense weights)."""
    torch.manual_seed(seed)
    return mcp_model(recipe)


@pytest.fixture(scope="module")
def mid_epoch_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The initial model, another one, and the model trained straight (6 steps)."""
    recipe = recipe_from_dict(MID_EPOCH_RECIPE)
    initial = _pipeline_mcp(recipe, seed=0)
    other = _pipeline_mcp(recipe, seed=999)
    straight = copy.deepcopy(initial)
    pl.seed_everything(recipe.seed, workers=True, verbose=False)  # as pipeline._fit
    fit = trainer(tmp_path_factory.mktemp("straight"), max_epochs=EPOCHS)
    fit.fit(straight, training_data(recipe, 8)[1])
    assert fit.global_step == 6
    return {"recipe": recipe, "initial": initial, "other": other, "straight": fit}


class _Crash(Exception):
    """A process dying right after a checkpoint (SIGKILL, node failure)."""


class _InterruptAt(Callback):
    """Interrupts training after global step ``step`` and checks that the loader
    counts exactly the batches trained on (Lightning does not prefetch ahead of it).

    ``how="sigterm"``: a real SIGTERM; Lightning stops at the step boundary and the
    caller saves the checkpoint, as ``pipeline._fit`` does. ``how="batch_end"``: a
    checkpoint written in ``on_train_batch_end`` (as ``ModelCheckpoint(
    every_n_train_steps=...)`` writes it), then a crash.
    """

    def __init__(self, step: int, how: str, path: Path, loader: object) -> None:
        self.step, self.how, self.path, self.loader = step, how, path, loader

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        assert self.loader.state_dict()["batches"] == batch_idx + 1
        if trainer.global_step != self.step:
            return
        if self.how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            trainer.save_checkpoint(self.path)
            raise _Crash


# SIGTERM after step 4 (1 batch into epoch 2, just after an ADMM update); a
# checkpoint from on_train_batch_end after step 2 (the resumed run finishes epoch 1
# and runs epoch 2). Such a checkpoint is written before MCP's own
# on_train_batch_end runs its ADMM update, so it is not taken at an ADMM step.
@pytest.mark.parametrize("how, step", [("sigterm", 4), ("batch_end", 2)])
def test_mid_epoch_resume_equals_uninterrupted_run(
    tmp_path: Path,
    how: str,
    step: int,
    mid_epoch_runs: dict,
    recwarn: pytest.WarningsRecorder,
) -> None:
    """2 epochs of 3 steps straight == interrupted inside an epoch + resume, with the
    pipeline's shuffling loader and real MoCo v2 augmentations of digits."""
    recipe = mid_epoch_runs["recipe"]
    path = tmp_path / "mid.ckpt"
    first = copy.deepcopy(mid_epoch_runs["initial"])
    _, first_loader = training_data(recipe, 8)
    interrupt = _InterruptAt(step, how, path, first_loader)
    pl.seed_everything(recipe.seed, workers=True, verbose=False)
    fit = trainer(tmp_path / "b", max_epochs=EPOCHS, callbacks=[interrupt])
    with pytest.raises(SIGTERMException if how == "sigterm" else _Crash):
        fit.fit(first, first_loader)
    if how == "sigterm":
        fit.save_checkpoint(path)  # as pipeline._fit does
    saved = read_checkpoint(path)
    assert saved["global_step"] == step
    (state,) = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    epoch, batch = divmod(step - 1, 3)
    assert (state["epoch"], state["batches"]) == (epoch, batch + 1)

    torch.manual_seed(1234)  # the resumed run must not depend on the caller's RNG
    resumed = copy.deepcopy(mid_epoch_runs["other"])
    _, resumed_loader = training_data(recipe, 8)
    resumed_fit = trainer(tmp_path / "c", max_epochs=EPOCHS)
    resumed_fit.fit(resumed, resumed_loader, ckpt_path=str(path), weights_only=True)
    assert resumed_fit.global_step == 6
    assert not [w for w in recwarn if "not resumable" in str(w.message)]

    straight_fit = mid_epoch_runs["straight"]
    straight = straight_fit.lightning_module
    # Query and momentum weights, Z, U, masks, rho, BatchNorm statistics: every
    # parameter and buffer of the module.
    assert set(straight.state_dict()) == set(resumed.state_dict())
    for name, a in straight.state_dict().items():
        b = resumed.state_dict()[name]
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    # One update after step 3; none after the last step (6).
    assert straight.admm.num_updates == resumed.admm.num_updates == 1
    for a, b in zip(straight.admm.masks, resumed.admm.masks, strict=True):
        assert torch.equal(a, b)
    for name, z in straight.admm.z().items():
        assert torch.allclose(z, resumed.admm.z()[name], atol=1e-6), name
        assert torch.allclose(
            straight.admm.u()[name], resumed.admm.u()[name], atol=1e-6
        )
    assert resumed.transition.state_dict() == straight.transition.state_dict()
    bank_a, bank_b = straight.criterion.memory_bank, resumed.criterion.memory_bank
    assert torch.allclose(bank_a.bank, bank_b.bank, atol=1e-6)
    assert torch.equal(bank_a.bank_ptr, bank_b.bank_ptr)
    opt_a = straight_fit.optimizers[0].state_dict()["state"]
    opt_b = resumed_fit.optimizers[0].state_dict()["state"]
    for key in opt_a:
        assert torch.allclose(
            opt_a[key]["momentum_buffer"], opt_b[key]["momentum_buffer"], atol=1e-6
        )
