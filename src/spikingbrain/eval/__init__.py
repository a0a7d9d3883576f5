"""Evaluation of language models: perplexity (``spikingbrain.eval.perplexity``)."""
