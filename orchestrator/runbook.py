"""Runbooks: loading, validation with file:line:column for every mistake, and the typed model.

Validation has three layers, all reported together, each problem as one line
``FILE:LINE:COLUMN: FIELD: message``:

1. YAML itself (syntax, duplicate keys: PyYAML would silently keep the last one);
2. ``runbooks/schema.json`` (JSON Schema 2020-12), and each target driver's settings against
   ``targets/schemas/DRIVER.json``;
3. what a schema cannot say: names that refer to other names, dependency cycles, cron syntax,
   point selectors, addresses, files that hooks name, policies that contradict the runbook's kind,
   checks the target cannot carry out; each a small function in ``RULES``.

Positions come from PyYAML's node tree: the document is composed (not just loaded), and each
error's JSON path is walked down the nodes to the key or value at fault.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import yaml
from jsonschema.exceptions import ValidationError

from lifeboat.archive.points import parse_selector, parse_when
from lifeboat.plumbing.errors import LifeboatError, UsageError

if TYPE_CHECKING:
    from lifeboat.targets.base import Target

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "runbooks" / "schema.json"
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?$")
_POINT_ID = re.compile(r"^[0-9a-f]{12}$")

PathElem = str | int | bool | None


@dataclass(frozen=True)
class Problem:
    """One mistake in a runbook, with where it is."""

    file: str
    line: int  # 1-based
    column: int  # 1-based
    field: str  # e.g. machines[0].health[1].tcp.port
    message: str

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{self.file}:{self.line}:{self.column}: {where}{self.message}"


class InvalidRunbook(UsageError):
    """The runbook has mistakes: nothing was run (exit status 2)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# --------------------------------------------------------------------------- the model


@dataclass
class Check:
    """A health check: exactly one of console / tcp / command."""

    name: str
    kind: str  # console | tcp | command
    spec: dict[str, Any]
    timeout: float


@dataclass
class Hook:
    """A shell command or an Ansible playbook run at a point of a machine's (or the run's) life."""

    name: str
    shell: str | None
    ansible: dict[str, Any] | None
    timeout: float
    on_failure: str  # fail | continue


@dataclass
class Machine:
    """One machine of a runbook, with its target settings merged."""

    name: str
    selector: str
    source_kind: str
    platform: str | None
    group: str | None
    depends_on: list[str]  # machine names (groups expanded)
    driver: str
    settings: dict[str, Any]
    reip: dict[str, Any] | None
    health: list[Check]
    hooks: dict[str, list[Hook]]
    rto_objective: float | None
    rpo_objective: float | None  # the newest point's age the dashboard holds this machine to


@dataclass
class Runbook:
    """A validated runbook."""

    path: Path
    digest: str  # sha256 of the file: a changed runbook is not silently resumed
    doc: dict[str, Any]
    name: str
    kind: str
    description: str
    archive: str | None
    key_file: str | None
    schedule: str | None
    network_mode: str
    mappings: dict[str, str]
    machines: list[Machine]
    hooks: dict[str, list[Hook]]
    teardown: str
    move_to_local: bool
    max_parallel: int
    report_dir: Path | None
    formats: list[str]
    webhook: dict[str, Any] | None
    replicate: dict[str, Any] | None = None  # a replication runbook's ``replicate:`` (to, machines, bwlimit)
    stage_schedule: str | None = None  # cron: ``lifeboat stage`` by the scheduler

    def machine(self, name: str) -> Machine:
        """The machine called ``name``."""
        for m in self.machines:
            if m.name == name:
                return m
        raise KeyError(name)

    def waves(self) -> list[list[str]]:
        """Machines in dependency order, grouped into waves that may run in parallel."""
        done: set[str] = set()
        left = [m.name for m in self.machines]
        out: list[list[str]] = []
        while left:
            wave = [n for n in left if all(d in done for d in self.machine(n).depends_on)]
            out.append(wave)
            done.update(wave)
            left = [n for n in left if n not in done]
        return out


def parse_duration(value: int | str) -> float:
    """Seconds in ``90``, ``"90s"``, ``"5m"``, ``"1h30m"`` (already checked by the schema)."""
    if isinstance(value, int):
        return float(value)
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"not a duration: {value!r}")
    h, mi, s = (int(g) if g else 0 for g in m.groups())
    return float(h * 3600 + mi * 60 + s)


# --------------------------------------------------------------------------- YAML with positions


@cache
def runbook_schema() -> dict[str, Any]:
    """``runbooks/schema.json``."""
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return schema


def _field(path: list[PathElem]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) and not isinstance(p, bool) else (f".{p}" if out else str(p))
    return out


class _Located:
    """The composed YAML node tree, to turn a JSON path into a line and column."""

    def __init__(self, file: str, root: yaml.Node | None) -> None:
        self.file = file
        self.root = root

    def find(self, path: list[PathElem], *, key: bool = False) -> yaml.Node | None:
        """The node at ``path`` (its key node if ``key`` and the last element is a mapping key);
        the deepest existing node if the path runs out."""
        node = self.root
        for i, p in enumerate(path):
            if node is None:
                return None
            last = i == len(path) - 1
            if isinstance(node, yaml.MappingNode) and isinstance(p, str | bool) or p is None:
                if not isinstance(node, yaml.MappingNode):
                    return node
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and _key_is(k, p):
                        node = k if (last and key) else v
                        break
                else:
                    return node
            elif isinstance(node, yaml.SequenceNode) and isinstance(p, int) and p < len(node.value):
                node = node.value[p]
            else:
                return node
        return node

    def problem(self, path: list[PathElem], message: str, *, key: bool = False) -> Problem:
        """A problem located at ``path``."""
        node = self.find(path, key=key)
        line, col = (node.start_mark.line + 1, node.start_mark.column + 1) if node is not None else (1, 1)
        return Problem(self.file, line, col, _field(path), message)


def _key_is(node: yaml.ScalarNode, key: object) -> bool:
    """Whether a key node means ``key`` (``on:`` unquoted means True in YAML 1.1)."""
    if isinstance(key, str):
        return bool(node.value == key)
    if node.style is not None:
        return False
    return bool(yaml.safe_load(node.value) == key and type(yaml.safe_load(node.value)) is type(key))


def _duplicate_keys(loc: _Located, node: yaml.Node | None, path: list[PathElem]) -> list[Problem]:
    out: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, yaml.Node] = {}
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                if k.value in seen and k.value != "<<":
                    first = seen[k.value].start_mark
                    out.append(
                        Problem(
                            loc.file,
                            k.start_mark.line + 1,
                            k.start_mark.column + 1,
                            _field(path + [k.value]),
                            f"duplicate key {k.value!r} (first at line {first.line + 1})",
                        )
                    )
                seen.setdefault(k.value, k)
                out += _duplicate_keys(loc, v, path + [k.value])
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out += _duplicate_keys(loc, item, path + [i])
    return out


def _schema_message(e: ValidationError) -> str:
    custom = (e.schema.get("x-messages") or {}).get(str(e.validator)) if isinstance(e.schema, dict) else None
    if custom:
        return str(custom).format(instance=e.instance)
    v, inst = e.validator, e.instance
    if v == "required":
        missing = e.message.split("'")[1] if "'" in e.message else e.message
        return f"missing required field {missing!r}"
    if v == "type":
        return f"expected {_a(e.validator_value)}, got {_describe(inst)}"
    if v == "enum":
        return f"{inst!r} is not one of: {', '.join(map(str, e.validator_value))}"
    if v == "const":
        return f"must be {e.validator_value!r}, got {inst!r}"
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        words = {
            "minimum": "at least",
            "maximum": "at most",
            "exclusiveMinimum": "more than",
            "exclusiveMaximum": "less than",
        }
        return f"{inst!r} is out of range: must be {words[str(v)]} {e.validator_value}"
    if v == "minItems":
        return "must not be empty" if e.validator_value == 1 else f"needs at least {e.validator_value} items"
    if v == "minLength":
        return "must not be empty"
    if v == "uniqueItems":
        return f"has repeated items: {inst!r}"
    if v == "pattern":
        return f"{inst!r} does not match the pattern {e.validator_value}"
    if v in ("oneOf", "anyOf") and e.context:
        best = jsonschema.exceptions.best_match(e.context)
        return _schema_message(best)
    return e.message


def _a(t: Any) -> str:
    names = {
        "object": "a mapping",
        "array": "a list",
        "string": "a string",
        "integer": "an integer",
        "number": "a number",
        "boolean": "true or false",
        "null": "nothing",
    }
    if isinstance(t, list):
        return " or ".join(names.get(str(x), str(x)) for x in t)
    return names.get(t, str(t))


def _describe(v: Any) -> str:
    if v is None:
        return "nothing"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return f"{type(v).__name__.replace('str', 'string').replace('int', 'integer')} {v!r}"


def _schema_problems(loc: _Located, schema: dict[str, Any], data: Any, prefix: list[PathElem]) -> list[Problem]:
    out: list[Problem] = []
    validator = jsonschema.Draft202012Validator(schema)
    for e in validator.iter_errors(data):
        path = prefix + list(e.absolute_path)
        if e.validator == "additionalProperties" and isinstance(e.instance, dict):
            allowed = sorted((e.schema.get("properties") or {}).keys())
            for extra in sorted(set(e.instance) - set(allowed), key=str):
                hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
                if isinstance(extra, bool) or extra is None:
                    hint += "; YAML reads on/off/yes/no/true/false/null as values: quote the key"
                out.append(loc.problem(path + [extra], f"unknown field {extra!r}{hint}", key=True))
            continue
        if e.validator == "required":
            out.append(loc.problem(path, _schema_message(e)))
            continue
        out.append(loc.problem(path, _schema_message(e)))
    return out


# bounds on what a runbook's YAML may expand to: every later check walks the tree, and an alias
# repeats its anchor's whole subtree (nine aliases of nine aliases of ... is a "billion laughs")
MAX_DEPTH = 64
MAX_NODES = 100_000


def _too_big(file: str, root: yaml.Node | None) -> Problem | None:
    """A problem if the node tree, aliases expanded, is deeper than MAX_DEPTH or has more than
    MAX_NODES nodes; walked without recursion and stopped at the bound, so it is bounded too."""
    stack = [(root, 1)] if root is not None else []
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        mark = node.start_mark
        if depth > MAX_DEPTH:
            return Problem(file, mark.line + 1, mark.column + 1, "", f"YAML nested more than {MAX_DEPTH} levels deep")
        if count > MAX_NODES:
            return Problem(file, 1, 1, "", f"the YAML expands to more than {MAX_NODES} values (aliases of aliases?)")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend((child, depth + 1) for pair in node.value for child in pair)
    return None


def _compose(text: str, file: str) -> tuple[yaml.Node | None, Any]:
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # refuses control characters already (a ReaderError)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except RecursionError:  # the composer recurses once per level
        raise InvalidRunbook([Problem(file, 1, 1, "", f"YAML nested more than {MAX_DEPTH} levels deep")]) from None
    except yaml.reader.ReaderError as e:  # a control character: no mark, only an offset
        line = text.count("\n", 0, e.position) + 1
        col = e.position - text.rfind("\n", 0, e.position)
        message = f"YAML: character U+{e.character:04X} is not allowed"
        raise InvalidRunbook([Problem(file, line, col, "", message)]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise InvalidRunbook([Problem(file, line, col, "", f"YAML syntax: {e.problem or e.context}")]) from None
    except yaml.YAMLError as e:
        raise InvalidRunbook([Problem(file, 1, 1, "", f"YAML: {e}")]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return node, data


# --------------------------------------------------------------------------- checks beyond the schema


def _driver_schema(driver: str) -> dict[str, Any] | None:
    from lifeboat.targets import driver_schema

    return driver_schema(driver)


def _driver(driver: str, settings: dict[str, Any]) -> type[Target] | None:
    """The driver class that would serve these settings; None when it cannot be loaded here
    (planned, unknown: reported on its own), so capability rules are checked only where known."""
    from lifeboat.targets import TARGETS

    try:
        return TARGETS.get(driver).variant(settings)
    except LifeboatError:
        return None


@dataclass
class RuleContext:
    """What a validation rule looks at: the schema-valid document, its node tree (for positions)
    and the folder that hook files are relative to."""

    loc: _Located
    doc: dict[str, Any]
    base: Path

    def problem(self, path: list[PathElem], message: str) -> Problem:
        """A problem located at ``path``."""
        return self.loc.problem(path, message)

    @property
    def machines(self) -> list[dict[str, Any]]:
        """The ``machines`` entries."""
        return list(self.doc["machines"])

    @property
    def groups(self) -> list[dict[str, Any]]:
        """The ``groups`` entries."""
        return list(self.doc.get("groups", []))

    @property
    def machine_index(self) -> dict[str, int]:
        """Each machine name and where it is first listed."""
        out: dict[str, int] = {}
        for i, m in enumerate(self.machines):
            out.setdefault(m["name"], i)
        return out

    @property
    def group_index(self) -> dict[str, int]:
        """Each group name and where it is first defined."""
        out: dict[str, int] = {}
        for i, g in enumerate(self.groups):
            out.setdefault(g["name"], i)
        return out

    @property
    def network_mode(self) -> str:
        """``network.mode``, or the kind's default."""
        return str(self.doc.get("network", {}).get("mode", "isolated" if self.doc["kind"] == "rehearsal" else "none"))

    def targets(self) -> list[tuple[list[PathElem], dict[str, Any], str]]:
        """The runbook's target and each machine's own: (path, entry, driver)."""
        default = self.doc["target"]["driver"]
        out: list[tuple[list[PathElem], dict[str, Any], str]] = [(["target"], self.doc["target"], default)]
        for i, m in enumerate(self.machines):
            if "target" in m:
                out.append((["machines", i, "target"], m["target"], m["target"].get("driver", default)))
        return out


Rule = Callable[[RuleContext], list[Problem]]


def _unique_machine_names(ctx: RuleContext) -> list[Problem]:
    out, first = [], ctx.machine_index
    for i, m in enumerate(ctx.machines):
        if first[m["name"]] != i:
            out.append(
                ctx.problem(
                    ["machines", i, "name"],
                    f"machine {m['name']!r} is listed twice (also machines[{first[m['name']]}])",
                )
            )
    return out


def _unique_group_names(ctx: RuleContext) -> list[Problem]:
    out, first, machines = [], ctx.group_index, ctx.machine_index
    for i, g in enumerate(ctx.groups):
        if first[g["name"]] != i:
            out.append(ctx.problem(["groups", i, "name"], f"group {g['name']!r} is defined twice"))
        if g["name"] in machines:
            out.append(
                ctx.problem(["groups", i, "name"], f"group {g['name']!r} has the name of a machine: names must differ")
            )
    return out


def _group_dependencies(ctx: RuleContext) -> list[Problem]:
    out, groups = [], ctx.group_index
    for i, g in enumerate(ctx.groups):
        for j, dep in enumerate(g.get("depends_on", [])):
            if dep not in groups:
                out.append(ctx.problem(["groups", i, "depends_on", j], f"unknown group {dep!r}"))
            elif dep == g["name"]:
                out.append(ctx.problem(["groups", i, "depends_on", j], f"group {dep!r} depends on itself"))
    return out


def _machine_groups_and_dependencies(ctx: RuleContext) -> list[Problem]:
    out, machines, groups = [], ctx.machine_index, ctx.group_index
    for i, m in enumerate(ctx.machines):
        if "group" in m and m["group"] not in groups:
            out.append(
                ctx.problem(
                    ["machines", i, "group"], f"unknown group {m['group']!r} (groups: {', '.join(groups) or 'none'})"
                )
            )
        for j, dep in enumerate(m.get("depends_on", [])):
            if dep == m["name"]:
                out.append(ctx.problem(["machines", i, "depends_on", j], f"machine {dep!r} depends on itself"))
            elif dep not in machines and dep not in groups:
                out.append(ctx.problem(["machines", i, "depends_on", j], f"unknown machine or group {dep!r}"))
    return out


def _point_selectors(ctx: RuleContext) -> list[Problem]:
    out = []
    for i, m in enumerate(ctx.machines):
        if "point" in m:
            try:
                _machine, when = parse_selector(m["point"])
                if when != "latest" and not _POINT_ID.match(when):
                    parse_when(m["point"], when)
            except UsageError as e:
                out.append(ctx.problem(["machines", i, "point"], str(e)))
    return out


def _schedule_syntax(ctx: RuleContext) -> list[Problem]:
    from croniter import croniter

    out: list[Problem] = []
    stage = ctx.doc.get("stage")
    places: list[tuple[list[PathElem], Any]] = [
        (["schedule"], ctx.doc.get("schedule")),
        (["stage", "schedule"], stage.get("schedule") if isinstance(stage, dict) else None),
    ]
    for path, expr in places:
        if expr is not None and not (croniter.is_valid(expr) and len(expr.split()) == 5):
            out.append(ctx.problem(path, f"{expr!r} is not a cron expression (5 fields: minute hour day month "
                                         "weekday)"))
    return out


def _target_drivers(ctx: RuleContext) -> list[Problem]:
    from lifeboat.targets import TARGETS

    out: list[Problem] = []
    drivers = TARGETS.names() + TARGETS.planned()
    for path, t, driver in ctx.targets():
        if driver not in drivers:
            out.append(
                ctx.problem(
                    path + ["driver"],
                    f"the {driver!r} target driver is not in this version of lifeboat "
                    f"(available: {', '.join(sorted(drivers))})",
                )
            )
        schema = _driver_schema(driver)
        if schema is not None and "settings" in t:
            out += _schema_problems(ctx.loc, schema, t["settings"], path + ["settings"])
    return out


def _network(ctx: RuleContext) -> list[Problem]:
    out = []
    net, mode, kind = ctx.doc.get("network", {}), ctx.network_mode, ctx.doc["kind"]
    if kind == "rehearsal" and mode == "mapped":
        out.append(
            ctx.problem(["network", "mode"], "a rehearsal must not join production networks: use isolated or none")
        )
    if mode == "mapped" and not net.get("mappings"):
        out.append(
            ctx.problem(["network"], "network mode 'mapped' needs mappings (from: SOURCE-NETWORK, to: TARGET-NETWORK)")
        )
    if mode != "mapped" and net.get("mappings"):
        out.append(ctx.problem(["network", "mappings"], f"mappings are only used with mode 'mapped', not {mode!r}"))
    return out


def _policies_for_kind(ctx: RuleContext) -> list[Problem]:
    out, kind = [], ctx.doc["kind"]
    if kind == "rehearsal" and ctx.doc.get("teardown") == "never":
        out.append(ctx.problem(["teardown"], "a rehearsal must tear down what it brought up: use always or on-success"))
    if kind not in ("rehearsal", "replication") and "schedule" in ctx.doc:
        out.append(ctx.problem(["schedule"], f"only rehearsals and replications run on a schedule, this runbook "
                                             f"is a {kind}"))
    return out


# what only brings machines back: a replication runbook has none of it
RECOVERY_FIELDS = ("scenario", "target", "network", "groups", "machines", "hooks", "teardown", "move_to_local",
                   "max_parallel")


def _replication_fields(ctx: RuleContext) -> list[Problem]:
    if ctx.doc["kind"] != "replication":
        return [ctx.loc.problem(["replicate"], f"only a replication runbook has 'replicate', this runbook is a "
                                               f"{ctx.doc['kind']}", key=True)] if "replicate" in ctx.doc else []
    return [ctx.loc.problem([f], f"a replication runbook brings no machine up: remove {f!r}", key=True)
            for f in RECOVERY_FIELDS if f in ctx.doc]


def _scenario(ctx: RuleContext) -> list[Problem]:
    from lifeboat.targets import driver_kind

    scenario = ctx.doc.get("scenario")
    if not scenario:
        return []
    out = []
    want_src = "physical" if scenario[0] == "P" else "virtual"
    want_tgt = "physical" if scenario[2] == "P" else "virtual"
    for i, m in enumerate(ctx.machines):
        src = (m.get("source") or {}).get("kind")
        if src is None:
            out.append(
                ctx.problem(["machines", i], f"scenario {scenario} needs source.kind ({want_src}) on every machine")
            )
        elif src != want_src:
            out.append(
                ctx.problem(
                    ["machines", i, "source", "kind"],
                    f"scenario {scenario} recovers {want_src} machines, this one is {src}",
                )
            )
    target_kinds = {driver_kind(driver) or "" for _path, _t, driver in ctx.targets() if driver_kind(driver)}
    for tk in target_kinds:
        if tk != want_tgt:
            out.append(
                ctx.problem(
                    ["target", "driver"],
                    f"scenario {scenario} needs a {want_tgt} target, "
                    f"the {ctx.doc['target']['driver']!r} driver is {tk}",
                )
            )
    return out


def _reip_addresses(ctx: RuleContext) -> list[Problem]:
    out = []
    for i, m in enumerate(ctx.machines):
        reip = (m.get("network") or {}).get("reip")
        if not reip:
            continue
        where: list[PathElem] = ["machines", i, "network", "reip"]
        try:
            iface = ipaddress.ip_interface(reip["address"])
            if "/" not in reip["address"]:
                raise ValueError("no prefix")
        except ValueError:
            out.append(
                ctx.problem(
                    where + ["address"],
                    f"{reip['address']!r} is not an address with a prefix length (like 10.20.0.5/24)",
                )
            )
            continue
        if "gateway" in reip:
            try:
                gw = ipaddress.ip_address(reip["gateway"])
                if gw not in iface.network:
                    out.append(ctx.problem(where + ["gateway"], f"gateway {gw} is outside {iface.network}"))
            except ValueError:
                out.append(ctx.problem(where + ["gateway"], f"{reip['gateway']!r} is not an IP address"))
        for j, dns in enumerate(reip.get("dns", [])):
            try:
                ipaddress.ip_address(dns)
            except ValueError:
                out.append(ctx.problem(where + ["dns", j], f"{dns!r} is not an IP address"))
    return out


def _hook_playbooks_exist(ctx: RuleContext) -> list[Problem]:
    lists: list[tuple[list[PathElem], list[dict[str, Any]]]] = [
        (["hooks", when], hs) for when, hs in (ctx.doc.get("hooks") or {}).items()
    ]
    for i, m in enumerate(ctx.machines):
        lists += [(["machines", i, "hooks", when], hs) for when, hs in (m.get("hooks") or {}).items()]
    out = []
    for path, hooks in lists:
        for j, h in enumerate(hooks):
            if "ansible" in h:
                playbook = ctx.base / h["ansible"]["playbook"]
                if not playbook.is_file():
                    out.append(
                        ctx.problem(path + [j, "ansible", "playbook"], f"playbook {str(playbook)!r} does not exist")
                    )
    return out


def _health_checks_fit_target(ctx: RuleContext) -> list[Problem]:
    from lifeboat.targets.base import ExecInGuest, HasConsole

    out = []
    for i, m in enumerate(ctx.machines):
        tgt = {**ctx.doc["target"], **(m.get("target") or {})}
        cls = _driver(tgt["driver"], tgt.get("settings", {}))
        for j, c in enumerate(m.get("health", [])):
            where: list[PathElem] = ["machines", i, "health", j]
            if "tcp" in c and "host" not in c["tcp"] and ctx.network_mode == "none":
                out.append(
                    ctx.problem(
                        where + ["tcp"], "a TCP check needs a network: set network.mode, or give the host to connect to"
                    )
                )
            if cls is not None and "console" in c and not issubclass(cls, HasConsole):
                out.append(ctx.problem(where + ["console"], f"the {cls.name} target has no console to watch"))
            in_guest = "command" in c and c["command"].get("in", "guest") == "guest"
            if cls is not None and in_guest and not issubclass(cls, ExecInGuest):
                out.append(ctx.problem(where + ["command"], f"the {cls.name} target cannot run commands in the guest"))
    return out


# What a schema cannot say, one rule a function (each sees a schema-valid document).
RULES: list[Rule] = [
    _unique_machine_names,
    _unique_group_names,
    _group_dependencies,
    _machine_groups_and_dependencies,
    _point_selectors,
    _schedule_syntax,
    _target_drivers,
    _network,
    _policies_for_kind,
    _scenario,
    _reip_addresses,
    _hook_playbooks_exist,
    _health_checks_fit_target,
]


# a replication runbook has no machines or target for the other rules to look at
REPLICATION_RULES: list[Rule] = [_schedule_syntax, _policies_for_kind, _replication_fields]


def _rule_problems(loc: _Located, doc: dict[str, Any], base: Path) -> list[Problem]:
    """The problems every rule of ``RULES`` (``REPLICATION_RULES``) finds."""
    ctx = RuleContext(loc, doc, base)
    if doc["kind"] == "replication" or "replicate" in doc:
        return [problem for rule in REPLICATION_RULES for problem in rule(ctx)]
    return [problem for rule in RULES for problem in rule(ctx)]


# --------------------------------------------------------------------------- load


def load(path: str | Path) -> Runbook:
    """Read and validate a runbook; ``InvalidRunbook`` lists every mistake with its position."""
    path = Path(path)
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"runbook {file}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRunbook([Problem(file, 1, 1, "", f"not UTF-8 text ({e.reason} at byte {e.start})")]) from None
    node, data = _compose(text, file)
    too_big = _too_big(file, node)
    if too_big:
        raise InvalidRunbook([too_big])
    loc = _Located(file, node)
    if data is None:
        raise InvalidRunbook([Problem(file, 1, 1, "", "the runbook is empty")])
    if not isinstance(data, dict):
        raise InvalidRunbook([loc.problem([], f"a runbook is a mapping of fields, this is {_describe(data)}")])
    problems = _duplicate_keys(loc, node, [])
    problems += _schema_problems(loc, runbook_schema(), data, [])
    if not problems:
        problems += _rule_problems(loc, data, path.parent)
    if not problems and data["kind"] != "replication":
        cycle = _find_cycle(data)
        if cycle:
            i = [m["name"] for m in data["machines"]].index(cycle[0])
            problems.append(loc.problem(["machines", i, "name"], f"dependency cycle: {' -> '.join(cycle)}"))
    if problems:
        problems.sort(key=lambda pr: (pr.line, pr.column, pr.message))
        unique = list(dict.fromkeys(problems))
        raise InvalidRunbook(unique)
    return _build(path, hashlib.sha256(raw).hexdigest(), data)


def _expanded_deps(doc: dict[str, Any]) -> dict[str, list[str]]:
    """Each machine's machine dependencies: explicit ones (groups expanded), its group's
    dependencies, and every machine of a group with a lower priority."""
    groups = {g["name"]: g for g in doc.get("groups", [])}
    members: dict[str, list[str]] = {g: [] for g in groups}
    for m in doc["machines"]:
        if m.get("enabled", True) and m.get("group") in members:
            members[m["group"]].append(m["name"])
    enabled = {m["name"] for m in doc["machines"] if m.get("enabled", True)}
    out: dict[str, list[str]] = {}
    for m in doc["machines"]:
        if m["name"] not in enabled:
            continue
        deps: list[str] = []
        for d in m.get("depends_on", []):
            deps += members.get(d, [d])
        g = groups.get(m.get("group", ""))
        if g is not None:
            for gd in g.get("depends_on", []):
                deps += members.get(gd, [])
            if "priority" in g:
                for other in groups.values():
                    if "priority" in other and other["priority"] < g["priority"]:
                        deps += members[other["name"]]
        out[m["name"]] = [d for d in dict.fromkeys(deps) if d in enabled and d != m["name"]]
    return out


def _find_cycle(doc: dict[str, Any]) -> list[str] | None:
    deps = _expanded_deps(doc)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in deps.get(n, []):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in deps:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def _hooks(items: list[dict[str, Any]], where: str) -> list[Hook]:
    return [
        Hook(
            name=h.get("name")
            or (f"{where}: {h['shell']}" if "shell" in h else f"{where}: {h['ansible']['playbook']}"),
            shell=h.get("shell"),
            ansible=h.get("ansible"),
            timeout=parse_duration(h.get("timeout", 600)),
            on_failure=h.get("on_failure", "fail"),
        )
        for h in items
    ]


def _build(path: Path, digest: str, doc: dict[str, Any]) -> Runbook:
    kind = doc["kind"]
    base = path.resolve().parent
    net = doc.get("network", {})
    deps = _expanded_deps(doc) if "machines" in doc else {}
    machines: list[Machine] = []
    for m in doc.get("machines", []):
        if not m.get("enabled", True):
            continue
        mt = m.get("target") or {}
        driver = mt.get("driver", doc["target"]["driver"])
        settings = dict(doc["target"].get("settings", {})) if driver == doc["target"]["driver"] else {}
        settings.update(mt.get("settings", {}))
        checks = []
        for j, c in enumerate(m.get("health", [])):
            ck = next(k for k in ("console", "tcp", "command") if k in c)
            spec = c[ck]
            if ck == "console" and isinstance(spec, str):
                spec = {"match": spec, "regex": False}
            checks.append(Check(c.get("name") or f"{ck} #{j + 1}", ck, spec, parse_duration(c.get("timeout", 300))))
        hooks = {w: _hooks(hs, w) for w, hs in (m.get("hooks") or {}).items()}
        machines.append(
            Machine(
                name=m["name"],
                selector=m.get("point", f"{m['name']}@latest"),
                source_kind=(m.get("source") or {}).get("kind", "virtual"),
                platform=(m.get("source") or {}).get("platform"),
                group=m.get("group"),
                depends_on=deps[m["name"]],
                driver=driver,
                settings=settings,
                reip=(m.get("network") or {}).get("reip"),
                health=checks,
                hooks=hooks,
                rto_objective=parse_duration(m["rto_objective"]) if "rto_objective" in m else None,
                rpo_objective=parse_duration(m["rpo_objective"]) if "rpo_objective" in m else None,
            )
        )
    report = doc.get("report", {})
    archive = doc.get("archive")
    if archive and "://" not in archive:
        archive = str((base / archive).resolve())
    key_file = doc.get("key_file")
    if key_file:
        key_file = str((base / key_file).resolve())
    return Runbook(
        path=path.resolve(),
        digest=digest,
        doc=doc,
        name=doc["name"],
        kind=kind,
        description=doc.get("description", ""),
        archive=archive,
        key_file=key_file,
        schedule=doc.get("schedule"),
        network_mode=net.get("mode", "isolated" if kind == "rehearsal" else "none"),
        mappings={mp["from"]: mp["to"] for mp in net.get("mappings", [])},
        machines=machines,
        hooks={w: _hooks(hs, w) for w, hs in (doc.get("hooks") or {}).items()},
        teardown=doc.get("teardown", "always" if kind == "rehearsal" else "never"),
        move_to_local=doc.get("move_to_local", kind != "rehearsal"),
        max_parallel=doc.get("max_parallel", 4),
        report_dir=(base / report["dir"]).resolve() if "dir" in report else None,
        formats=report.get("formats", ["json", "junit", "html"]),
        webhook=report.get("webhook"),
        replicate=doc.get("replicate"),
        stage_schedule=(doc.get("stage") or {}).get("schedule"),
    )


def with_points(rb: Runbook, points: dict[str, str]) -> Runbook:
    """``rb`` with some machines booting other points for one run (``lifeboat run --point
    NAME=MACHINE@WHEN``): machine name -> point selector. Its digest changes with them, so an
    interrupted run is resumed only with the same points."""
    if not points:
        return rb
    names = {m.name for m in rb.machines}
    for name, selector in points.items():
        if name not in names:
            raise UsageError(f"--point {name}={selector}: runbook {rb.name!r} has no machine {name!r} "
                             f"(it has: {', '.join(sorted(names))})")
        try:
            _machine, when = parse_selector(selector)
            if when != "latest" and not _POINT_ID.match(when):
                parse_when(selector, when)
        except UsageError as e:
            raise UsageError(f"--point {name}={selector}: {e}") from None
    machines = [replace(m, selector=points.get(m.name, m.selector)) for m in rb.machines]
    salt = json.dumps(sorted(points.items())).encode()
    return replace(rb, machines=machines, digest=hashlib.sha256(rb.digest.encode() + salt).hexdigest())
