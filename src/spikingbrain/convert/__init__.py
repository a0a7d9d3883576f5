"""Conversion of pretrained Transformers into SpikingBrain models: layer plans, weight mapping, upcycling."""
