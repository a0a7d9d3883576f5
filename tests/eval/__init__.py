"""Tests of spikingbrain.eval."""
