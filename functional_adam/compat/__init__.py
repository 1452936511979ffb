r"""Adam as PyTorch, Keras and TF1 write it: a port is a one-line change.

Each constructor takes the other framework's argument names, order and
defaults and returns an ordinary :class:`~functional_adam.GradientTransformation`
(a chain of :mod:`functional_adam` pieces) that follows that framework's
trajectory: the same parameters after hundreds of steps up to float32
rounding. The learning rate may be a schedule ``count -> lr`` (``count`` is 0
at the first update, as a ``torch.optim.lr_scheduler`` or a Keras
``LearningRateSchedule`` sees it), and the result drops into ``optax.chain``.

Where the frameworks differ (see ``docs/porting.md``)::

    PyTorch Adam   g ← ±g (+ wd·θ)           u = m̂ / (sqrt(v̂) + eps)         θ ← θ - lr·u
    PyTorch AdamW  g ← ±g                     u = m̂ / (sqrt(v̂) + eps)         θ ← θ(1 - lr·wd) - lr·u
    Keras Adam(W)  lr_t = lr·sqrt(1-b2^t)/(1-b1^t)   u = m / (sqrt(v) + eps)   θ ← θ(1 - lr·wd) - lr_t·u
    TF1 Adam       as Keras Adam, default eps 1e-8, no AMSGrad, no weight decay

with AMSGrad's maximum over the raw ``v`` in all three (bias-corrected after
the maximum in PyTorch). The chains are::

    torch_adam:  [negate] → [add_decayed_weights] → scale_by_adam/amsgrad(PYTORCH)
                 → scale_by_learning_rate → [ ]
    torch_adamw: [negate] → [ ] → scale_by_adam/amsgrad(PYTORCH)
                 → scale_by_learning_rate → [torch_decoupled_weight_decay]
    keras_adam(w):  scale_by_adam/amsgrad(KERAS) → [ ]
                 → scale_by_learning_rate or keras_learning_rate_and_decay
    tf1_adam:    scale_by_adam(KERAS) → [ ] → scale_by_learning_rate
    torch_adamax, torch_radam, torch_nadam: as torch_adam(w) with their own directions
                 (:mod:`functional_adam.compat.pytorch_family`)

Bracketed pieces are :func:`~functional_adam.identity` when switched off, so
the state has the same structure whatever the options. The AdamW decays are
applied as the frameworks round them: θ is decayed in place and rounded, and
only then stepped and rounded again (:func:`torch_decoupled_weight_decay`,
:func:`keras_learning_rate_and_decay`, :func:`~functional_adam.compat.staged.staged_update`);
``add_decayed_weights`` is the same in exact arithmetic but, rounding once,
drifts 3e-4 (PyTorch) to 6e-4 (Keras) of the displacement away over 500
steps at the frameworks' default ``lr·wd``.

Options of the other framework that only choose a kernel or a name
(PyTorch's ``foreach``, ``fused``, ``capturable``, ``differentiable``; Keras'
and TF1's ``name``, TF1's ``use_locking``) are accepted and have no effect;
any other keyword raises one ``TypeError`` naming all of them. PyTorch states
convert with :func:`from_torch_state` and :func:`to_torch_state`.
"""

from functional_adam.compat.keras import (
    keras_adam,
    keras_adamw,
    keras_learning_rate_and_decay,
    tf1_adam,
)
from functional_adam.compat.pytorch import (
    negate,
    torch_adam,
    torch_adamw,
    torch_decoupled_weight_decay,
)
from functional_adam.compat.pytorch_family import (
    ScaleByTorchNAdamState,
    scale_by_torch_nadam,
    torch_adamax,
    torch_nadam,
    torch_radam,
)
from functional_adam.compat.torch_state import from_torch_state, to_torch_state

__all__ = [
    "ScaleByTorchNAdamState",
    "from_torch_state",
    "keras_adam",
    "keras_adamw",
    "keras_learning_rate_and_decay",
    "negate",
    "scale_by_torch_nadam",
    "tf1_adam",
    "to_torch_state",
    "torch_adam",
    "torch_adamax",
    "torch_adamw",
    "torch_decoupled_weight_decay",
    "torch_nadam",
    "torch_radam",
]
