"""Spiking: adaptive-threshold integrate-and-fire neurons and spike-train coding of integer spike counts."""
