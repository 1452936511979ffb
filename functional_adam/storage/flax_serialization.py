"""Registering pytree types with ``flax.serialization`` without importing Flax.

``flax.serialization`` (``to_bytes``, ``from_bytes``, ``to_state_dict``) only
knows the types in its registry. Flax is not a dependency of this package, and
importing it costs a third of a second, so :func:`register` hands the type
over as soon as ``flax.serialization`` is imported, whether that happened
before or happens after: now if it is loaded, else from a one-shot finder on
``sys.meta_path`` that runs after the module's own code and then removes
itself.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

MODULE = "flax.serialization"

ToDict = Callable[[ModuleType, Any], dict]
FromDict = Callable[[ModuleType, Any, dict], Any]


def register(ty: type, to_dict: ToDict, from_dict: FromDict) -> None:
    """Registers ``ty`` with ``flax.serialization`` now or once it is imported.

    Args:
        ty: the pytree type.
        to_dict: ``(flax.serialization, x) -> state dict``.
        from_dict: ``(flax.serialization, target, state dict) -> x``; raises on a mismatch.
    """

    def callback(serialization: ModuleType) -> None:
        serialization.register_serialization_state(
            ty,
            lambda x: to_dict(serialization, x),
            lambda target, data: from_dict(serialization, target, data),
            override=True,
        )

    module = sys.modules.get(MODULE)
    if module is not None and hasattr(module, "register_serialization_state"):
        callback(module)
        return
    finder = next((f for f in sys.meta_path if isinstance(f, _AfterImport)), None)
    if finder is None:
        finder = _AfterImport()
        sys.meta_path.insert(0, finder)
    finder.callbacks.append(callback)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``flax.serialization`` with the other finders and runs callbacks after it loads."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[ModuleType], None]] = []

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != MODULE:
            return None
        sys.meta_path.remove(self)  # one shot, and no recursion into this finder
        for finder in sys.meta_path:
            spec = getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenCall(spec.loader, self.callbacks)
        return spec


class _ThenCall(importlib.abc.Loader):
    """``loader``, then the callbacks; puts ``loader`` back on the module once it has run."""

    def __init__(self, loader: Any, callbacks: list[Callable[[ModuleType], None]]) -> None:
        self.loader, self.callbacks = loader, callbacks

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        for callback in self.callbacks:
            callback(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)
