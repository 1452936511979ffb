"""The MNIST MLP example: data (IDX loader), model (Flax NNX), training loop, checkpoints.

Run it with ``python examples/mnist_mlp.py --help``; see ``docs/mnist.md``.
"""
