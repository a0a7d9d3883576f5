"""Defaults of the evaluations that the command line shows, importable without torch."""

__all__ = ["SWEEP_K"]

#: The report's Table 11 values of k (threshold = mean|x| / k): the spiking sweep's default.
SWEEP_K = (2.0, 2.5, 3.0, 3.5, 4.0)
