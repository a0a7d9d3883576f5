"""Tests of spikingbrain.ops."""
