"""icm-lora-vllm: a vLLM plugin that serves icm-lora tasks by id (see README.md). ``register`` in ``plugin`` is the
``vllm.general_plugins`` entry point; ``store`` (fetch, verify, cache) needs neither vLLM nor torch."""
