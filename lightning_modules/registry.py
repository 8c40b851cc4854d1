"""The method registry: every method declares its short name once, everything else derives from it.

A method is a subclass of :class:`~lightning_modules.base.AnomalySegmentationModule` decorated
with :func:`register_method`. ``python main.py fit --model=<name>``, the roster and defaults of
``compare``, the benchmarks and the contract tests read this registry; method folders under
``lightning_modules/`` are imported by :func:`discover_methods`, so adding a method is its folder
plus its config, with no list to edit.

Example:
    >>> from lightning_modules.registry import discover_methods, get_method
    >>> discover_methods()
    >>> get_method("sml").cls.__name__
    'SMLSegmenter'
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

__all__ = ["MethodEntry", "discover_methods", "get_method", "method_names", "methods", "register_method", "roster"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
#: Where each method's configs live: ``configs/method/<name>.yaml`` (real data) and
#: ``configs/method/demo/<name>.yaml`` (the embedded synthetic dataset on CPU).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "method"


@dataclass(frozen=True)
class MethodEntry:
    """One registered method.

    Attributes:
        name: the short name (``--model=<name>``, result files, tables).
        cls: the ``LightningModule`` class.
        scores_network_of: in ``compare``, score the network another method trained instead of
            training one (FRE scores the segmenter trained for SML).
        init_from: in the default (demo) ``compare``, start training from the network another
            method trained (the dual decoder starts from the SML segmenter).
        compared_by_default: whether ``python main.py compare`` runs it without ``--methods``.
    """

    name: str
    cls: type
    scores_network_of: str | None = None
    init_from: str | None = None
    compared_by_default: bool = True

    @property
    def class_path(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"

    def config(self, demo: bool = True) -> Path:
        """The method's config file (``configs/method[/demo]/<name>.yaml``)."""
        return CONFIG_DIR / "demo" / f"{self.name}.yaml" if demo else CONFIG_DIR / f"{self.name}.yaml"


_REGISTRY: dict[str, MethodEntry] = {}
T = TypeVar("T", bound=type)


def register_method(
    name: str,
    *,
    scores_network_of: str | None = None,
    init_from: str | None = None,
    compared_by_default: bool = True,
) -> Callable[[T], T]:
    """Class decorator: register a method under ``name`` and set its ``method_name``.

    Registering the same class again (a module imported twice, e.g. by a test) replaces the
    entry; another class under a taken name is an error.
    """
    if not _NAME.match(name):
        raise ValueError(f"method name '{name}' must be lower case letters, digits and '_', starting with a letter")

    def decorate(cls: T) -> T:
        previous = _REGISTRY.get(name)
        if previous is not None and previous.class_path != f"{cls.__module__}.{cls.__qualname__}":
            raise ValueError(f"method name '{name}' is taken by {previous.class_path}")
        cls.method_name = name
        _REGISTRY[name] = MethodEntry(name, cls, scores_network_of, init_from, compared_by_default)
        return cls

    return decorate


def discover_methods() -> None:
    """Import every package under ``lightning_modules/`` so that its methods register themselves."""
    importlib.invalidate_caches()  # a folder added since the last call is found too
    package = importlib.import_module("lightning_modules")
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg:
            importlib.import_module(f"lightning_modules.{info.name}")


def methods() -> dict[str, MethodEntry]:
    """The registered methods by name, in registration order."""
    return dict(_REGISTRY)


def method_names() -> list[str]:
    return list(_REGISTRY)


def roster(names: Collection[str] | None = None) -> list[str]:
    """Methods in the order tables list them: those that train a network from scratch, then those
    scoring another's network, then those starting from another's network; by name within each.
    ``None``: every method registered as compared by default."""
    if names is None:
        names = [name for name, entry in _REGISTRY.items() if entry.compared_by_default]

    def group(name: str) -> int:
        entry = _REGISTRY.get(name)
        if entry is None:
            return 0
        return 2 if entry.init_from else 1 if entry.scores_network_of else 0

    return sorted(names, key=lambda name: (group(name), name))


def get_method(name: str) -> MethodEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method '{name}'; registered: {', '.join(_REGISTRY) or 'none'}") from None
