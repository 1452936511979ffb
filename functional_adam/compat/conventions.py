"""Where each framework places epsilon and the AMSGrad maximum.

Optax, PyTorch and TF1/Keras compute the same Adam in exact arithmetic but
differ in two places that change the trajectory:

========================  ==============================  ==============================
point                     ``"corrected"``                 the alternative
========================  ==============================  ==============================
``epsilon``               ``m̂ / (sqrt(v̂ + eps_root) + eps)``  ``"hat"``: ``m·sqrt(1-b2^t)/(1-b1^t) / (sqrt(v) + eps)``
                          (Optax, PyTorch)                (TF1, Keras: "epsilon hat")
``amsgrad_max``           ``max`` over bias-corrected v̂   ``"raw"``: over raw v, then
                          (Optax)                         bias-corrected (PyTorch, Keras)
========================  ==============================  ==============================

With ``epsilon="hat"`` the effective epsilon is ``eps·sqrt(1-b2^t)`` in the
``"corrected"`` form, so a Keras epsilon of 1e-7 weighs most in the first steps.
"""

from __future__ import annotations

from typing import Literal, NamedTuple


class Convention(NamedTuple):
    """How a framework places epsilon and the AMSGrad maximum (see the module docstring).

    Example:
        >>> from functional_adam import conventions
        >>> conventions.KERAS
        Convention(epsilon='hat', amsgrad_max='raw')
    """

    epsilon: Literal["corrected", "hat"] = "corrected"
    amsgrad_max: Literal["corrected", "raw"] = "corrected"


OPTAX = Convention(epsilon="corrected", amsgrad_max="corrected")
PYTORCH = Convention(epsilon="corrected", amsgrad_max="raw")
KERAS = Convention(epsilon="hat", amsgrad_max="raw")
TF1 = KERAS

_CHOICES = {"epsilon": ("corrected", "hat"), "amsgrad_max": ("corrected", "raw")}


def check_convention(convention: Convention) -> Convention:
    """Returns ``convention`` if each field has a known value, else raises ``ValueError``.

    Example:
        >>> check_convention(Convention(epsilon="inside"))
        Traceback (most recent call last):
        ...
        ValueError: convention.epsilon must be one of ('corrected', 'hat'), got 'inside'
    """
    if not isinstance(convention, Convention):
        raise TypeError(f"convention must be a functional_adam Convention, got {convention!r}")
    for field, choices in _CHOICES.items():
        value = getattr(convention, field)
        if value not in choices:
            raise ValueError(f"convention.{field} must be one of {choices}, got {value!r}")
    if convention.epsilon == "hat" and convention.amsgrad_max != "raw":
        raise ValueError(
            "convention.epsilon='hat' works on the raw second moment, so its AMSGrad maximum "
            "is over raw v: use amsgrad_max='raw'."
        )
    return convention
