"""MCP on your own MoCo checkpoint and images, in ten lines: a lightly (or MoCo, or
this project's) checkpoint, a folder of images, a Lightning Trainer, and the compact
model exported. The model settings come from the checkpoint; the ADMM blocks, ρ and
the transition are laid out from the Trainer's ``max_steps`` (``schedule="converging"``;
a run too short for them is refused with the shortest that works, about 150 steps).

Usage:
    python examples/from_your_checkpoint.py MOCO_CKPT IMAGE_FOLDER [STEPS] [OUT]
"""

import sys


def main(checkpoint, images, steps=200, out="compact", batch_size=128, size=32):
    """Prunes ``checkpoint`` on ``images`` for ``steps`` and exports to ``out``."""
    import pytorch_lightning as pl
    import torch
    from lightly.data import LightlyDataset

    import lightly_mcp
    from lightly_mcp import MCP, build_transform

    dataset = LightlyDataset(images, transform=build_transform(input_size=size))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True
    )
    model = MCP.from_checkpoint(checkpoint, pruning_ratio=0.3, schedule="converging")
    pl.Trainer(max_steps=steps, accelerator="auto", devices=1).fit(model, loader)
    return lightly_mcp.export(model, out)  # model.pt2, model.onnx, report.json


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    out = args[3] if len(args) > 3 else "compact"
    report = main(args[0], args[1], int(args[2]) if len(args) > 2 else 200, out)
    dense, compact = report["dense"]["params"], report["compact"]["params"]
    print(f"{dense:,} -> {compact:,} parameters; files in {out}/")
