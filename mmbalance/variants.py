"""Rows of a matrix spec: named method variants and grids of override values.

A **variant** is a registered method under its own name with its own overrides; it is a row of
its own in the plan and the tables::

    [variants.cggm_paper]
    method = "cggm"          # the registered method (required)
    direction = "paper"      # any override key, as in [method_overrides.M]

A **grid**: an override whose value is a list, in any table of the spec (``[overrides]``,
``[dataset_overrides.D]``, ``[method_overrides.M]``, ``[variants.V]``), is swept: the run expands
to one run per value, and per combination of values when several keys are lists (their product,
in the order the keys first appear). The swept values are part of the row label:
``cggm[rho=1.3]``, ``cggm_paper[rho=1.3, lam=0.1]``, ``unimodal[text, lr=0.01]``. A key whose
field itself takes a list (``model.aspp_rates``) is swept by a list of lists; a plain list is its
value. ``--set`` values are never swept. A later table that sets a key to a single value ends the
sweep of an earlier table's list.

Which joint row a row is compared with (tables' Δ and "identical to joint"): the ``joint`` row
with the same swept values when the spec sweeps joint too (``joint[clip_grad_norm=0.8]`` for
``cggm_paper[clip_grad_norm=0.8]``), else plain ``joint``: :func:`reference_label`.

The run id is the resolved run's, as without variants or grids: a variant or a grid point that
resolves to a run of an earlier spec has that run's id (and its row is reused on resume).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmbalance.config import format_value
from mmbalance.errors import ConfigError

__all__ = [
    "Variant",
    "parse_variants",
    "grid_points",
    "row_label",
    "swept_items",
    "reference_label",
]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Variant:
    """A named row: ``method`` with ``overrides`` (flattened keys, list values are grids)."""

    name: str
    method: str
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dict(self.overrides)}


def parse_variants(tables: Any, source: str, flatten: Any) -> dict[str, Variant]:
    """Validate ``[variants.NAME]`` tables (``flatten(table, where)`` flattens sub-tables). That a
    variant's name is not a registered method's, and its method is, is checked when planning.

    Raises:
        ConfigError: a table that is not one table per name, a bad name, a missing or non-string
            ``method``, or a variant of a variant.
    """
    if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
        raise ConfigError(
            f"{source}: 'variants' must hold one table per name ([variants.NAME]), got {tables!r}"
        )
    out: dict[str, Variant] = {}
    for name, table in tables.items():
        where = f"{source} [variants.{name}]"
        if not _NAME_RE.match(name):
            raise ConfigError(f"{where}: a variant name must be lowercase snake_case, got {name!r}")
        method = table.get("method")
        if not isinstance(method, str) or not method:
            raise ConfigError(
                f"{where}: needs method = \"<registered method>\" (the method it is a variant of), "
                f"got {method!r}"
            )
        if method in tables:
            raise ConfigError(f"{where}: method {method!r} is another variant; name a registered method")
        rest = {k: v for k, v in table.items() if k != "method"}
        out[name] = Variant(name, method, flatten(rest, where))
    return out


def swept_items(label: str) -> tuple[str, ...]:
    """The ``key=value`` items of a label's brackets: ``cggm[rho=1.3]`` -> ``("rho=1.3",)``."""
    base, sep, inner = label.partition("[")
    if not sep or not inner.endswith("]"):
        return ()
    return tuple(item.strip() for item in inner[:-1].split(", ") if "=" in item)


def row_label(name: str, modality: str | None, swept: Sequence[tuple[str, Any]]) -> str:
    """``name``, ``name[text]``, ``name[rho=1.3]`` or ``name[text, rho=1.3, lam=0.1]``."""
    items = ([modality] if modality else []) + [f"{k}={format_value(v)}" for k, v in swept]
    return f"{name}[{', '.join(items)}]" if items else name


def reference_label(label: str, labels: Sequence[str] | set[str], reference: str = "joint") -> str:
    """The ``reference`` row (joint) that ``label`` is compared with: the one with the same swept
    values when it exists among ``labels``, else the plain ``reference``."""
    items = swept_items(label)
    if items:
        same = f"{reference}[{', '.join(items)}]"
        if same in labels:
            return same
    return reference


def _is_grid(value: Any, takes_list: bool) -> bool:
    if not isinstance(value, list):
        return False
    return all(isinstance(v, list) for v in value) if takes_list else True


def grid_points(
    levels: Sequence[Mapping[str, Any]],
    fixed: Mapping[str, Any],
    takes_list: Any,
    where: str,
) -> list[tuple[dict[str, Any], tuple[tuple[str, Any], ...]]]:
    """Merge the spec's override ``levels`` (later wins), then ``fixed`` (``--set``, never swept),
    and expand the list values: ``[(overrides, swept), ...]``, one per grid point, ``swept`` the
    ``(key, value)`` pairs of that point. ``takes_list(keys)`` returns the keys whose config field
    itself takes a list.

    Raises:
        ConfigError: naming ``where`` and the key: an empty list, or a grid value that is a table.
    """
    merged: dict[str, Any] = {}
    for level in levels:
        merged.update(level)
    candidates = [k for k, v in merged.items() if isinstance(v, list) and k not in fixed]
    listy = set(takes_list(candidates)) if candidates else set()
    axes = [k for k in candidates if _is_grid(merged[k], k in listy)]
    for key in axes:
        values = merged[key]
        if not values:
            raise ConfigError(f"{where}: {key} = [] sweeps no value; give at least one, or remove the key")
        bad = [v for v in values if isinstance(v, dict)]
        if bad:
            raise ConfigError(f"{where}: {key} sweeps a table ({bad[0]!r}); grid values are single values")
    base = {**{k: v for k, v in merged.items() if k not in axes}, **fixed}
    points = []
    for combo in itertools.product(*(merged[k] for k in axes)):
        swept = tuple(zip(axes, combo, strict=True))
        points.append(({**base, **dict(swept)}, swept))
    return points
