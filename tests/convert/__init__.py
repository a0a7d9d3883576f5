"""Tests of spikingbrain.convert."""
