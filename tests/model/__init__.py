"""Tests of spikingbrain.model."""
