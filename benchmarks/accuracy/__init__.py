"""The accuracy grid (``main.py``), its report, curves and convergence scripts."""
