"""Benchmark suites: a base scenario, axes to sweep and a repetition count, expanded to runs.

A suite file is TOML::

    [suite]
    name = "page-size"            # names the output directory and the runs' scenarios
    description = "..."
    repetitions = 3               # each combination runs this many times

    [base]                        # a complete scenario (see migrator.config.models)
    name = "page-size"            # optional: defaults to suite.name
    vm = { memory_mib = 512, backing = "memfd-4k" }
    ...

    [[axes]]                      # one field, a list of values: labels are the values
    field = "migration.preempt"   # a dotted scenario path
    name = "preempt"              # optional: defaults to the path's last part
    values = [false, true]

    [[axes]]                      # several fields per value: a table keyed by label
    name = "page-size"
    [axes.values]
    4k = { "vm.backing" = "memfd-4k" }
    1g = { "vm.backing" = "hugetlb-1g", "vm.memory_mib" = 1024 }
    1g-hgm = { "vm.backing" = "hugetlb-1g", "vm.memory_mib" = 1024, "vm.hgm" = "require" }

``values`` is a list (each element is the value of ``field``; its label is the
value as TOML writes it: ``true``, ``512``, ``hugetlb-2m``) or a table keyed by
label.  With ``field`` a table's values are the field's values (tables such as a
``migration.switchover`` policy need labels); without ``field`` each value is a
table of overrides.  In an override table a quoted dotted key
(``"migration.switchover" = {...}``) replaces whatever is at that path, while a
bare key holding a table (``vm = { backing = "x" }``) sets the leaves under it.

The matrix is the product of the axes in file order (the first axis varies
slowest), repeated ``repetitions`` times with the repetition as the OUTERMOST
loop: a suite cut short still has every combination once, and slow drift of a
shared host spreads over all combinations instead of biasing one.  Each run's
id lists its labels and repetition, e.g. ``page-size=2m,preempt=true,rep=1``;
ids do not depend on what else is in the matrix, so adding values or
repetitions keeps every finished run's id.  Every run is validated with
:func:`parse_scenario`; errors name the run and the axis value that set the
offending field.

``vm.hgm`` (HugeTLB high-granularity mapping) takes the scenario's words,
``auto``, ``require`` or ``off``, in ``[base]`` and on axes alike, and reaches
each run's scenario as written.  A run whose ``vm.hgm`` is ``require`` is an
HGM run: :mod:`migrator.bench.runner` first checks its hosts with
:func:`migrator.hgm.detect_hgm` and records it as not supported (rather than
failed) where they lack HGM, and the page-size table calls its row ``+HGM``.
An ``auto`` run uses HGM wherever the hosts have it, so it is not marked.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from migrator.config.loader import dump_scenario, parse_scenario, read_toml
from migrator.config.models import Scenario
from migrator.errors import ConfigError

__all__ = [
    "HGM_FIELD",
    "Axis",
    "AxisValue",
    "PlannedRun",
    "Selection",
    "Suite",
    "load_suite",
    "parse_only",
    "parse_suite",
]

HGM_FIELD = "vm.hgm"
REP_KEY = "rep"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
AXIS_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9._-]*$"
# Labels end up in run ids ("a=x,b=y"), file names and --only terms: no ',', '=' or spaces.
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+:-]*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Header(_Model):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    repetitions: int = Field(1, ge=1, le=1000)


class _RawAxis(_Model):
    name: str | None = Field(None, pattern=AXIS_NAME_PATTERN)
    field: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
    values: list[Any] | dict[str, Any]


class _RawSuite(_Model):
    suite: _Header
    base: dict[str, Any]
    axes: list[_RawAxis] = Field(default_factory=list)


@dataclass(frozen=True)
class AxisValue:
    """One value of an axis: its label and the scenario fields it sets (path, value)."""

    label: str
    overrides: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Axis:
    """One dimension of the matrix."""

    name: str
    values: tuple[AxisValue, ...]

    @property
    def paths(self) -> frozenset[str]:
        """Every scenario path some value of this axis sets."""
        return frozenset(path for value in self.values for path, _ in value.overrides)

    def sets(self, path: str) -> bool:
        """Whether this axis sets ``path`` (or a field under it, or a table holding it)."""
        return any(_related(path, mine) for mine in self.paths)


@dataclass(frozen=True)
class PlannedRun:
    """One entry of the expanded matrix: a validated scenario and where it came from."""

    run_id: str
    labels: tuple[tuple[str, str], ...]
    repetition: int
    scenario: Scenario

    @property
    def hgm(self) -> bool:
        """Whether this is an HGM run: its ``vm.hgm`` is ``require``."""
        return self.scenario.vm.hgm == "require"

    @property
    def combination(self) -> str:
        """The id without the repetition: equal for every repetition of one combination."""
        return ",".join(f"{axis}={label}" for axis, label in self.labels)

    @property
    def scenario_sha256(self) -> str:
        """Hash of the resolved scenario: what a finished run measured."""
        # The HGM mark adds nothing to the scenario now, but it was hashed when it did:
        # keeping it keeps the hashes of suites already run, so --resume does not redo them.
        text = dump_scenario(self.scenario) + f"\n# hgm={self.hgm}\n"
        return hashlib.sha256(text.encode()).hexdigest()

    def label(self, axis: str) -> str | None:
        """This run's label on ``axis`` (``rep`` gives the repetition)."""
        if axis == REP_KEY:
            return str(self.repetition)
        return dict(self.labels).get(axis)


@dataclass(frozen=True)
class Selection:
    """An ``--only`` filter: every key must match one of its values."""

    terms: Mapping[str, frozenset[str]]

    def __call__(self, run: PlannedRun) -> bool:
        return all(run.label(key) in values for key, values in self.terms.items())

    def __bool__(self) -> bool:
        return bool(self.terms)


@dataclass(frozen=True)
class Suite:
    """A validated suite and its expanded matrix (see the module docstring)."""

    name: str
    description: str
    repetitions: int
    base: Scenario
    axes: tuple[Axis, ...]
    runs: tuple[PlannedRun, ...]
    source: str

    def axis(self, name: str) -> Axis:
        """The axis called ``name``."""
        for axis in self.axes:
            if axis.name == name:
                return axis
        raise KeyError(name)

    @property
    def varies_backing(self) -> bool:
        """Whether some axis changes ``vm.backing`` (the page size)."""
        return any(axis.sets("vm.backing") for axis in self.axes)

    @property
    def page_axes(self) -> frozenset[str]:
        """Axes that choose the page size or HGM (a page-size table's row names say them)."""
        return frozenset(axis.name for axis in self.axes
                         if axis.sets("vm.backing") or axis.sets(HGM_FIELD))

    def select(self, selection: Selection | None) -> list[PlannedRun]:
        """The runs an ``--only`` filter keeps, in matrix order."""
        return [run for run in self.runs if selection is None or selection(run)]


def _related(a: str, b: str) -> bool:
    """One path is the other or lies under it."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _label_of(value: Any) -> str:
    """A list value's label: the value as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise TypeError(type(value).__name__)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(path, value) pairs of an override table (quoted dotted keys replace, tables nest)."""
    for key, value in table.items():
        path = f"{prefix}{key}"
        if "." not in key and isinstance(value, dict):
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def _axis(raw: _RawAxis, index: int, where: str) -> Axis:
    name = raw.name or (raw.field.rsplit(".", 1)[-1] if raw.field else None)
    if name is None:
        raise ConfigError("an axis needs a field or a name", field=f"{where}: axes[{index}]")
    where = f"{where}: axis {name}"
    if name == REP_KEY:
        raise ConfigError(f"'{REP_KEY}' is reserved for the repetition; rename the axis",
                          field=where)
    if not raw.values:
        raise ConfigError("no values", field=where)
    labelled: list[tuple[str, Any]] = []
    if isinstance(raw.values, dict):
        labelled = list(raw.values.items())
    else:
        for value in raw.values:
            try:
                labelled.append((_label_of(value), value))
            except TypeError:
                raise ConfigError(
                    f"a {type(value).__name__} value has no label; write values as a table "
                    "keyed by label ([axes.values] LABEL = ...)", field=where) from None
    values = []
    seen: set[str] = set()
    for label, value in labelled:
        if not LABEL_PATTERN.match(label):
            raise ConfigError(f"label {label!r} must match {LABEL_PATTERN.pattern} (it goes "
                              "into run ids)", field=where)
        if label in seen:
            raise ConfigError(f"label {label!r} appears twice", field=where)
        seen.add(label)
        if raw.field is not None:
            overrides: tuple[tuple[str, Any], ...] = ((raw.field, value),)
        elif isinstance(value, dict):
            overrides = tuple(_flatten(value))
        else:
            raise ConfigError(
                f"value {label!r} must be a table of field overrides (or give the axis a "
                "field)", field=where)
        if not overrides:
            raise ConfigError(f"value {label!r} sets nothing", field=where)
        values.append(AxisValue(label, overrides))
    return Axis(name, tuple(values))


def _set_path(data: dict[str, Any], path: str, value: Any, where: str) -> None:
    *parents, leaf = path.split(".")
    node = data
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            above = ".".join(parents[: depth + 1])
            raise ConfigError(f"cannot set {path}: {above} is not a table", field=where)
        node = child
    node[leaf] = copy.deepcopy(value)


def _scenario_name(base: str, labels: Sequence[tuple[str, str]]) -> str:
    """``BASE.axis-label...``, within the scenario name pattern (64 characters)."""
    parts = [base] + [re.sub(r"[^A-Za-z0-9._-]", "_", f"{axis}-{label}")
                      for axis, label in labels]
    return ".".join(parts)[:64]


def _plan(
    base: dict[str, Any], axes: Sequence[Axis], chosen: Sequence[AxisValue], repetition: int,
    where: str,
) -> PlannedRun:
    labels = tuple((axis.name, value.label) for axis, value in zip(axes, chosen, strict=True))
    run_id = ",".join([f"{axis}={label}" for axis, label in labels]
                      + [f"{REP_KEY}={repetition}"])
    data = copy.deepcopy(base)
    for axis, value in zip(axes, chosen, strict=True):
        for path, setting in value.overrides:
            _set_path(data, path, setting, f"{where}: axis {axis.name} = {value.label}")
    data["name"] = _scenario_name(str(base["name"]), labels)
    source = f"{where}: run {run_id}"
    try:
        scenario = parse_scenario(data, source=source)
    except ConfigError as error:
        field = (error.field or "").removeprefix(f"{source}: ")
        setters = [f"{axis.name} = {value.label}" for axis, value in zip(axes, chosen, strict=True)
                   if any(_related(field, path) for path, _ in value.overrides)]
        origin = f"set by axis {', '.join(setters)}" if setters else "from [base]"
        raise ConfigError(f"{error} ({origin})") from None
    return PlannedRun(run_id, labels, repetition, scenario)


def parse_suite(data: dict[str, Any], *, source: str = "suite") -> Suite:
    """Validate a decoded suite and expand its matrix; :class:`ConfigError` says where."""
    try:
        raw = _RawSuite.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        message = ("unknown key; remove it or check its spelling"
                   if first["type"] == "extra_forbidden" else first["msg"])
        more = error.error_count() - 1
        if more:
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise ConfigError(message, field=f"{source}: {field}") from None
    base_data = copy.deepcopy(raw.base)
    base_data.setdefault("name", raw.suite.name)
    base = parse_scenario(base_data, source=f"{source}: [base]")
    axes = [_axis(axis, index, source) for index, axis in enumerate(raw.axes)]
    names = [axis.name for axis in axes]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"two axes are called {name!r}; give one a name",
                              field=f"{source}: axes")
    for i, first_axis in enumerate(axes):
        for second in axes[i + 1:]:
            clash = sorted(p for p in first_axis.paths if second.sets(p))
            if clash:
                raise ConfigError(
                    f"axes {first_axis.name!r} and {second.name!r} both set {clash[0]}; "
                    "merge them into one axis", field=f"{source}: axes")
    runs = [
        _plan(base_data, axes, chosen, repetition, source)
        for repetition in range(1, raw.suite.repetitions + 1)
        for chosen in product(*(axis.values for axis in axes))
    ]
    return Suite(name=raw.suite.name, description=raw.suite.description,
                 repetitions=raw.suite.repetitions, base=base, axes=tuple(axes),
                 runs=tuple(runs), source=source)


def load_suite(path: Path) -> Suite:
    """Read, validate and expand a suite TOML file."""
    return parse_suite(read_toml(path, "suite"), source=str(path))


def parse_only(terms: Sequence[str], suite: Suite) -> Selection | None:
    """An ``--only`` filter from ``KEY=VALUE[,KEY=VALUE...]`` terms (None for no terms).

    Keys are axis names or ``rep``.  Terms with the same key are alternatives;
    different keys must all match.  Unknown keys and values are errors that
    list what exists, so a typo never silently selects nothing.
    """
    selected: dict[str, set[str]] = {}
    for term in (part.strip() for option in terms for part in option.split(",")):
        if not term:
            continue
        key, sep, value = term.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ConfigError(f"{term!r} is not KEY=VALUE", field="--only")
        if key == REP_KEY:
            known = [str(n) for n in range(1, suite.repetitions + 1)]
        else:
            try:
                known = [v.label for v in suite.axis(key).values]
            except KeyError:
                axes = ", ".join([axis.name for axis in suite.axes] + [REP_KEY])
                raise ConfigError(f"no axis {key!r}; the suite has: {axes}",
                                  field="--only") from None
        if value not in known:
            raise ConfigError(f"{key} has no value {value!r}; it has: {', '.join(known)}",
                              field="--only")
        selected.setdefault(key, set()).add(value)
    if not selected:
        return None
    return Selection({key: frozenset(values) for key, values in selected.items()})
