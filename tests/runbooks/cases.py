"""Runbook mistakes: (id, YAML text, [(line, column, words in the message)]) — one per mistake."""

from __future__ import annotations

BASE = """\
version: 1
name: t
kind: rehearsal
target:
  driver: qemu
  settings: {memory_mib: 256}
machines:
  - name: web01
    health:
      - console: "up"
"""


REPLICATION = """\
version: 1
name: offsite
kind: replication
replicate: {to: s3://b/p}
"""


def base(**repl: str) -> str:
    """BASE with whole lines replaced: {"old line": "new line(s)"}."""
    text = BASE
    for old, new in repl.items():
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


CASES: list[tuple[str, str, list[tuple[int, int, str]]]] = [
    ("yaml-syntax", base(**{"  settings: {memory_mib: 256}": "  settings: {memory_mib: 256"}), [(7, 9, "YAML syntax")]),
    ("duplicate-key", base(**{"kind: rehearsal": "kind: rehearsal\nname: u"}), [(4, 1, "duplicate key 'name'")]),
    ("missing-required", base(**{"kind: rehearsal\n": ""}), [(1, 1, "missing required field 'kind'")]),
    (
        "unknown-field",
        base(**{"kind: rehearsal": "kind: rehearsal\ndescripton: typo"}),
        [(4, 1, "unknown field 'descripton'")],
    ),
    ("bad-version", base(**{"version: 1": "version: 2"}), [(1, 10, "unsupported runbook version 2")]),
    ("bad-kind", base(**{"kind: rehearsal": "kind: drill"}), [(3, 7, "'drill' is not one of")]),
    ("bad-name", base(**{"name: t": "name: my runbook"}), [(2, 7, "is not a valid name")]),
    (
        "no-machines",
        base(**{'machines:\n  - name: web01\n    health:\n      - console: "up"\n': "machines: []\n"}),
        [(7, 11, "must not be empty")],
    ),
    (
        "machine-without-name",
        base(**{"  - name: web01\n    health:": "  - health:"}),
        [(8, 5, "missing required field 'name'")],
    ),
    (
        "two-check-kinds",
        base(**{'      - console: "up"': '      - console: "up"\n        tcp: {port: 22}'}),
        [(10, 9, "exactly one of: console, tcp, command")],
    ),
    (
        "port-out-of-range",
        base(**{'      - console: "up"': "      - tcp: {port: 70000}"}),
        [(10, 21, "70000 is out of range")],
    ),
    (
        "port-not-a-number",
        base(**{'      - console: "up"': "      - tcp: {port: ssh}"}),
        [(10, 21, "expected an integer, got string 'ssh'")],
    ),
    (
        "bad-duration",
        base(**{'      - console: "up"': '      - console: "up"\n        timeout: 5 minutes'}),
        [(11, 18, "is not a duration")],
    ),
    (
        "unknown-driver",
        base(**{"  driver: qemu": "  driver: hyperv"}),
        [(5, 11, "the 'hyperv' target driver is not in this version of lifeboat")],
    ),
    (
        "unknown-setting",
        base(**{"  settings: {memory_mib: 256}": "  settings: {ram: 256}"}),
        [(6, 14, "unknown field 'ram'")],
    ),
    (
        "setting-type",
        base(**{"  settings: {memory_mib: 256}": "  settings: {memory_mib: lots}"}),
        [(6, 26, "expected an integer")],
    ),
    (
        "duplicate-machine",
        base(**{'      - console: "up"': '      - console: "up"\n  - name: web01'}),
        [(11, 11, "machine 'web01' is listed twice")],
    ),
    (
        "unknown-dependency",
        base(**{"    health:": "    depends_on: [db01]\n    health:"}),
        [(9, 18, "unknown machine or group 'db01'")],
    ),
    (
        "dependency-cycle",
        base(
            **{
                "  - name: web01\n    health:": "  - name: web01\n    depends_on: [db01]\n"
                "  - name: db01\n    depends_on: [web01]\n    health:"
            }
        ),
        [(8, 11, "dependency cycle: web01 -> db01 -> web01")],
    ),
    (
        "unknown-group",
        base(**{"    health:": "    group: frontend\n    health:"}),
        [(9, 12, "unknown group 'frontend'")],
    ),
    (
        "bad-point",
        base(**{"    health:": "    point: web01@yesterday\n    health:"}),
        [(9, 12, "'yesterday' is not a point id, 'latest' or an ISO-8601 time")],
    ),
    (
        "bad-cron",
        base(**{"kind: rehearsal": "kind: rehearsal\nschedule: '61 * * * *'"}),
        [(4, 11, "is not a cron expression")],
    ),
    (
        "bad-stage-cron",
        base(**{"kind: rehearsal": "kind: failover\nstage: {schedule: 'every hour'}"}),
        [(4, 19, "'every hour' is not a cron expression")],
    ),
    (
        "stage-unknown-key",
        base(**{"kind: rehearsal": "kind: failover\nstage: {schedul: '0 * * * *'}"}),
        [(4, 9, "schedul")],
    ),
    (
        "rehearsal-never-torn-down",
        base(**{"kind: rehearsal": "kind: rehearsal\nteardown: never"}),
        [(4, 11, "a rehearsal must tear down")],
    ),
    (
        "rehearsal-on-production-network",
        base(**{"kind: rehearsal": "kind: rehearsal\nnetwork: {mode: mapped, mappings: [{from: a, to: b}]}"}),
        [(4, 17, "must not join production networks")],
    ),
    (
        "reip-without-prefix",
        base(**{"    health:": "    network: {reip: {address: 10.0.0.5}}\n    health:"}),
        [(9, 31, "not an address with a prefix length")],
    ),
    (
        "gateway-outside-subnet",
        base(**{"    health:": "    network: {reip: {address: 10.0.0.5/24, gateway: 10.9.0.1}}\n    health:"}),
        [(9, 53, "gateway 10.9.0.1 is outside 10.0.0.0/24")],
    ),
    (
        "missing-playbook",
        base(**{"    health:": "    hooks: {after_healthy: [{ansible: {playbook: nowhere.yml}}]}\n    health:"}),
        [(9, 50, "does not exist")],
    ),
    (
        "hook-without-action",
        base(**{"    health:": "    hooks: {before_boot: [{name: nothing}]}\n    health:"}),
        [(9, 27, "exactly one of: shell, ansible")],
    ),
    (
        "webhook-not-http",
        base(**{"kind: rehearsal": "kind: rehearsal\nreport: {webhook: {url: 'ftp://x/y'}}"}),
        [(4, 25, "must start with http:// or https://")],
    ),
    (
        "unquoted-on-key",
        base(**{"kind: rehearsal": "kind: rehearsal\nreport:\n  webhook:\n    url: http://x/\n    on: failure"}),
        [(7, 5, "quote the key")],
    ),
    (
        "scenario-against-source",
        base(
            **{
                "kind: rehearsal": "kind: rehearsal\nscenario: P2V",
                "    health:": "    source: {kind: virtual}\n    health:",
            }
        ),
        [(10, 20, "scenario P2V recovers physical machines, this one is virtual")],
    ),
    (
        "schedule-on-failover",
        base(**{"kind: rehearsal": "kind: failover\nschedule: '0 3 * * *'"}),
        [(4, 11, "only rehearsals and replications run on a schedule")],
    ),
    (
        "tcp-without-network",
        base(
            **{
                "kind: rehearsal": "kind: rehearsal\nnetwork: {mode: none}",
                '      - console: "up"': "      - tcp: {port: 22}",
            }
        ),
        [(11, 14, "a TCP check needs a network")],
    ),
    (
        "replicate-in-a-rehearsal",
        base(**{"kind: rehearsal": "kind: rehearsal\nreplicate: {to: /srv/offsite}"}),
        [(4, 1, "only a replication runbook has 'replicate'")],
    ),
    ("replication-without-replicate", REPLICATION.replace("replicate: {to: s3://b/p}\n", ""),
     [(1, 1, "missing required field 'replicate'")]),
    ("replication-with-machines", REPLICATION + "machines: [{name: web01}]\n",
     [(5, 1, "a replication runbook brings no machine up: remove 'machines'")]),
    ("replication-bad-bwlimit", REPLICATION.replace("{to: s3://b/p}", "{to: s3://b/p, bwlimit: fast}"),
     [(4, 36, "is not a rate")]),
    ("not-a-mapping", "- version: 1\n- name: t\n", [(1, 1, "a runbook is a mapping of fields")]),
    ("empty", "# nothing here\n", [(1, 1, "the runbook is empty")]),
    (
        "self-dependency",
        base(**{"    health:": "    depends_on: [web01]\n    health:"}),
        [(9, 18, "machine 'web01' depends on itself")],
    ),
    ("control-character", base(**{"name: t": "name: t\x01"}), [(2, 8, "character U+0001 is not allowed")]),
    ("deep-nesting", base(**{"name: t": "name: t\nx-deep: " + "[" * 70 + "]" * 70}), [(3, 72, "nested more than 64")]),
    ("too-deep-for-yaml", base(**{"name: t": "name: t\nx-deep: " + "[" * 3000 + "]" * 3000}), [(1, 1, "nested more")]),
    (
        "alias-bomb",
        base(**{"name: t": "name: t\nx-0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"x-{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 9))}),
        [(1, 1, "expands to more than 100000 values")],
    ),
]
