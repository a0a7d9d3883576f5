"""Distributed runs on torch.distributed: sequence-parallel prefill and data-parallel conversion training."""
