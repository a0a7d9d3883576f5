"""Conversion training: data loading, packing and synthesis, and the trainer."""
