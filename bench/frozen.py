"""Read-only containers of a validated sweep config (bench.config.SweepConfig): the config a run started with
is the one it records; what the run decides goes to its `Resolved` record (bench.resolved)."""

from __future__ import annotations

READ_ONLY = "a validated sweep config is read-only; derive a changed one with dataclasses.replace"


class FrozenDict(dict):
    """A mapping of a validated config that refuses changes: the config a run started with is the one it records
    (the engine's own decisions go to a `Resolved` record). A dict underneath, so `isinstance(x, dict)`, JSON and
    the dataset and method code that read options keep working; copies (`dict(x)`, `{**x}`) are plain and free."""

    def _refuse(self, *args, **kwargs):
        raise TypeError(READ_ONLY)

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):  # pickling (Ray actors) and deepcopy rebuild it whole, not item by item
        return FrozenDict, (dict(self),)

    def __hash__(self):
        return hash(tuple(sorted(map(repr, self.items()))))


class FrozenList(list):
    """A list of a validated config (seeds, grid values, overrides) that refuses changes, as FrozenDict."""

    def _refuse(self, *args, **kwargs):
        raise TypeError(READ_ONLY)

    __setitem__ = __delitem__ = __iadd__ = __imul__ = append = extend = insert = pop = remove = clear = sort = \
        reverse = _refuse

    def __reduce__(self):
        return FrozenList, (list(self),)

    def __hash__(self):
        return hash(tuple(map(repr, self)))


def freeze(value):
    """Nested dicts and lists as FrozenDict / FrozenList (scalars as they are)."""
    if isinstance(value, dict):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return FrozenList(freeze(v) for v in value)
    return value


def thaw(value):
    """Plain dicts and lists again (config.yaml, JSON records, code that builds on a copy)."""
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value
