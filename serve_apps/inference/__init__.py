"""The LLM app's internals, shared with validator-core's verifier.

- ``model``: the whitelisted model source turned once into an fp32 Hugging Face folder.
- ``gumbel``: keyed Gumbel sampling, version 1 (a wire-level contract with verifiers).
- ``engine``: the :class:`InferenceEngine` interface; ``vllm_engine`` and ``transformers_engine``
  implement it; ``vllm_processor`` is the keyed sampler inside vLLM.
- ``openai_api``: the OpenAI-compatible request models and answers.

Nothing here imports vLLM or torch at import time; each engine module does when it is used.
"""
