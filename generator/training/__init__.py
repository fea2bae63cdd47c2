"""The offline pipeline that makes a generator: LoRA collection, CVAE training, evaluation.

The service never imports this package.
"""
