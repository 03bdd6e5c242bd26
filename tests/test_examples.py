from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_readme_trainer_example_runs_and_shrinks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    runpy.run_path(str(EXAMPLES / "mcp_trainer.py"), run_name="__main__")
    dense, compact = capsys.readouterr().out.strip().splitlines()[-1].split(" -> ")
    assert int(compact.split()[0]) < 0.25 * int(dense)


def _lightly_checkpoint_and_images(tmp_path: Path) -> tuple[Path, Path]:
    """A lightly example checkpoint (ResNet-18, one step) and 16 images of 32 px."""
    import numpy as np
    import torch
    from PIL import Image

    from tests.helpers import loader, trainer
    from tests.methods.test_checkpoints import LightlyExampleMoCo

    torch.manual_seed(0)
    example = LightlyExampleMoCo()
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(example, loader(size=32))
    checkpoint = tmp_path / "moco.ckpt"
    fit.save_checkpoint(checkpoint)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    return checkpoint, images


def test_ten_line_example_wires_checkpoint_images_and_trainer(
    tmp_path: Path,
) -> None:
    """examples/from_your_checkpoint.py up to the start of training: the settings
    come from the lightly checkpoint, the images from the folder, and a run too
    short for the converging schedule is refused with the shortest that works
    (README's block, which the next test runs to the export, is the same code)."""
    from lightly_mcp.errors import InputError

    checkpoint, images = _lightly_checkpoint_and_images(tmp_path)
    example = runpy.run_path(str(EXAMPLES / "from_your_checkpoint.py"))
    with pytest.raises(InputError, match="needs a run of at least .* this run has 4"):
        example["main"](str(checkpoint), str(images), steps=4, batch_size=4, size=16)


def test_readme_ten_lines_run_as_written(tmp_path: Path, tiny_dense: Path) -> None:
    """README's ten-line block, executed with its file names pointed at the tiny
    dense checkpoint (MobileNetV2 width 0.25; the lightly example's ResNet-18 takes
    the test above, up to training) and a folder of images, 160 steps of batch 8 at
    16 px."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    block = readme.split("<!-- ten lines -->")[1].split("```python")[1].split("```")[0]
    assert len([line for line in block.splitlines() if line.strip()]) <= 11
    _, images = _lightly_checkpoint_and_images(tmp_path)
    checkpoint = tiny_dense
    out = tmp_path / "compact"
    for written, here in (
        ('"moco.ckpt"', repr(str(checkpoint))),
        ('"images/"', repr(str(images))),
        ('"compact/")', repr(str(out)) + ", latency=False)"),  # no timing here
        ("max_steps=200", "max_steps=160"),
        ("batch_size=128", "batch_size=8"),
        ("input_size=32", "input_size=16"),
    ):
        assert written in block, written
        block = block.replace(written, here)
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - our own README
    assert (out / "model.pt2").is_file()
