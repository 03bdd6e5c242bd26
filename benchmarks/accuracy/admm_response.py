"""How the ADMM mask behaves when θ_q does (not) follow the penalty between updates.

Diagnostic for ``../RESULTS.md``. MCP is built from the shipped dense checkpoint as in
the accuracy grid; then, instead of SGD on InfoNCE + ADMM penalty, every "interval"
moves the query weights a fraction ``alpha`` of the way to the penalty's minimiser,
θ_q ← θ_q + alpha · (Z − U − θ_q) on the output-side parameters (alpha = 0: θ_q does
not respond between updates; alpha = 1: θ_q lands on Z − U, the θ-step of exact
ADMM with the InfoNCE term ignored), and an ADMM update follows
(Z ← Π(θ_q + U), U ← U + θ_q − Z, mask ← support(Z)). Printed per alpha: the channels
whose mask changed at each update and ‖θ_q − Z‖ after it.

In the grid, SGD at lr 0.03 with ρ = 0.01 moves θ_q by roughly
lr · ρ · steps · 1/(1 − momentum) ≈ 0.03 · 0.01 · 8 · 10 ≈ 0.024 of the way per
8-step interval, i.e. alpha ≈ 0.02; the paper's interval (15 epochs of 195 steps)
gives alpha ≥ 1.

Usage:
    OMP_NUM_THREADS=2 python benchmarks/accuracy/admm_response.py --ratio 0.76
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import main as grid  # noqa: E402  (benchmarks/accuracy/main.py)

from lightly_mcp.app.recipe import load_recipe  # noqa: E402


def run(ratio: float, alpha: float, updates: int) -> list[tuple[int, float]]:
    recipe = load_recipe(grid.RECIPE)
    ctx = grid.Context(
        recipe=recipe,
        dense_checkpoint=grid.dense_checkpoint(HERE, [], 0, progress=False),
        seed=0,
    )
    model = grid.mcp_builder(ratio)(ctx)
    admm = model.admm
    history = []
    with torch.no_grad():
        for _ in range(updates):
            params = dict(model.backbone.named_parameters())
            z, u = admm.z(), admm.u()
            for name in admm.param_names:
                p = params[name]
                p.add_(alpha * (z[name] - u[name] - p))
            changed = model.admm_update()
            history.append((changed, admm.distance(model.backbone)))
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=grid.R92)
    parser.add_argument("--updates", type=int, default=8)
    parser.add_argument(
        "--alphas", type=float, nargs="+", default=[0.0, 0.02, 0.1, 0.5, 1.0]
    )
    args = parser.parse_args()
    recipe = load_recipe(grid.RECIPE)
    print(f"ratio {args.ratio}, rho {recipe.mcp.rho}, {args.updates} updates")
    for alpha in args.alphas:
        history = run(args.ratio, alpha, args.updates)
        churn = " ".join(f"{c:5d}" for c, _ in history)
        dist = " ".join(f"{d:6.2f}" for _, d in history)
        print(f"alpha {alpha:<5} channels changed: {churn}")
        print(f"{'':11} ||theta_q - Z||:  {dist}")


if __name__ == "__main__":
    main()
