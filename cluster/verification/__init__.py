"""Verification: validators re-check sampled LLM answers with one prefill pass on a
private, autoscaled verification cluster. See ``models.py`` for what crosses its boundary."""
