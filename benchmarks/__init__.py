"""Speed benchmarks of the diffdis library against diffusers references; run them with ``python benchmarks/run.py``."""
