"""Small helpers shared across diffdis: cross-process sums and gathers, accelerator state, image grids."""
