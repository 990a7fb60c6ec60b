"""One registry for every plug-in kind (targets, exporters, backends, sources).

Why: each kind used to be registered its own way (a map, eager imports, ``if`` chains). A
``Registry`` maps a name to a ``"module:attr"`` string and imports the module only on the first
``get`` of that name, so declaring the registry (and ``lifeboat --help``) imports no plug-in.

- ``add(name, ref)`` is the one way to add a plug-in from code;
- ``names()`` the one way to list what can be used (``planned()`` what is designed but absent);
- outside plug-ins come from one environment variable, read at each lookup::

      LIFEBOAT_PLUGINS="targets:proc=tests.orchestrator.procdriver:ProcTarget,exporters:foo=pkg.mod:Cls"

  (comma-separated ``KIND:NAME=MODULE:ATTR``; a plug-in may replace a built-in of the same name).

Python entry points are deliberately not read: listing them scans the metadata of every installed
distribution, and ``--format``'s choices are listed when the CLI is built.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar, cast

from lifeboat.plumbing.errors import LifeboatError, UsageError

T = TypeVar("T")


class NotAvailable(UsageError):
    """A name this version of lifeboat has no plug-in for (planned, or unknown): the request, not
    the host, is at fault, and nothing was changed."""

ENV = "LIFEBOAT_PLUGINS"


def env_plugins(kind: str) -> dict[str, str]:
    """``name -> "module:attr"`` of the plug-ins of ``kind`` named in ``$LIFEBOAT_PLUGINS``."""
    out: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in os.environ.get(ENV, "").split(","))):
        head, eq, ref = entry.partition("=")
        entry_kind, colon, name = head.strip().partition(":")
        if not (eq and colon and name.strip() and ":" in ref):
            raise UsageError(f"${ENV}: {entry!r} is not KIND:NAME=MODULE:ATTR")
        if entry_kind == kind:
            out[name.strip()] = ref.strip()
    return out


class Registry(Generic[T]):
    """Plug-ins of one kind by name, imported lazily; see the module docstring.

    ``kind`` is the key in ``$LIFEBOAT_PLUGINS`` ("targets"); ``noun`` names one entry in messages
    ("target driver"); ``base``, when given, is the class every entry must be a subclass of.
    """

    def __init__(self, kind: str, noun: str, entries: Mapping[str, str], *, planned: Iterable[str] = (),
                 base: type | None = None) -> None:
        self.kind = kind
        self.noun = noun
        self.base = base
        self._refs: dict[str, str] = {}
        self._planned = tuple(planned)
        for name, ref in entries.items():
            self.add(name, ref)

    def add(self, name: str, ref: str) -> None:
        """Register ``name`` as the object at ``ref`` ("package.module:attr"), imported on first use."""
        if ":" not in ref:
            raise UsageError(f"{self.noun} {name!r}: {ref!r} is not MODULE:ATTR")
        self._refs[name] = ref

    def _all(self) -> dict[str, str]:
        return {**self._refs, **env_plugins(self.kind)}

    def names(self) -> list[str]:
        """The names that can be used, built-in and plug-ins, in registration order."""
        return list(self._all())

    def planned(self) -> list[str]:
        """Names designed but not available in this version (``get`` refuses them clearly)."""
        refs = self._all()
        return [n for n in self._planned if n not in refs]

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def get(self, name: str) -> T:
        """The object registered as ``name`` (its module is imported now if it was not yet)."""
        refs = self._all()
        ref = refs.get(name)
        if ref is None:
            if name in self._planned:
                raise NotAvailable(f"the {name} {self.noun} is planned but not available in this version of lifeboat")
            raise NotAvailable(f"unknown {self.noun} {name!r} (available: {', '.join(refs) or 'none'})")
        module, _, attr = ref.partition(":")
        try:
            found = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:  # a missing dependency: an operation failed (exit 1)
            raise LifeboatError(f"the {name} {self.noun} ({ref}) cannot be loaded: {e}") from None
        if self.base is not None and not (isinstance(found, type) and issubclass(found, self.base)):
            raise UsageError(f"the {name} {self.noun} ({ref}) is not a {self.base.__name__}")
        return cast(T, found)
