"""A GPT-style byte-level language model trained with functional_adam on a device mesh.

Run it with ``python -m examples.lm.train --help``; see ``docs/lm.md``.
"""
