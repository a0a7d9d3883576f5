"""Tests of spikingbrain.train."""
