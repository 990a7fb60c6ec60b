"""Runbook hooks: shell commands and Ansible playbooks (through ``ansible-runner``).

Hooks get the run's context: shell hooks as ``LIFEBOAT_*`` environment variables, playbooks as
extra variables (``lifeboat_machine``, ``lifeboat_point``, ``lifeboat_reip_address``, ...), which is
how re-IP is carried out: lifeboat cannot change a guest's address itself, a playbook can. A hook
that was running when the orchestrator died runs again on resume, so hooks must be idempotent
(as Ansible playbooks are meant to be).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lifeboat.orchestrator.runbook import Hook
from lifeboat.plumbing.errors import LifeboatError


class HookFailed(LifeboatError):
    """A hook exited with failure (or timed out)."""


def run_hook(hook: Hook, *, env: dict[str, str], base: Path, workdir: Path) -> str:
    """Run one hook; return a short summary, raise ``HookFailed`` on failure."""
    if hook.shell is not None:
        try:
            done = subprocess.run(
                ["/bin/sh", "-c", hook.shell],
                capture_output=True,
                text=True,
                timeout=hook.timeout,
                env={**os.environ, **env},
                cwd=base,
            )
        except subprocess.TimeoutExpired:
            raise HookFailed(f"hook {hook.name!r} timed out after {hook.timeout:.0f} s") from None
        out = (done.stdout + done.stderr).strip()
        if done.returncode != 0:
            raise HookFailed(f"hook {hook.name!r} exited {done.returncode}: {out[-300:]}")
        return out[-300:]
    assert hook.ansible is not None
    return _ansible(hook, hook.ansible, env=env, base=base, workdir=workdir)


def _ansible(hook: Hook, spec: dict[str, Any], *, env: dict[str, str], base: Path, workdir: Path) -> str:
    import ansible_runner

    private = workdir / "ansible"
    private.mkdir(parents=True, exist_ok=True)
    extravars = {k.lower(): v for k, v in env.items()}
    extravars.update(spec.get("extravars", {}))
    bindir = str(Path(sys.executable).parent)  # ansible-playbook of this environment
    envvars = {
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
    }
    inventory = spec.get("inventory", "localhost ansible_connection=local ansible_python_interpreter=" + sys.executable)
    if spec.get("inventory") and (base / spec["inventory"]).exists():
        inventory = str(base / spec["inventory"])
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        # ansible-runner looks ansible-playbook up in this process's PATH (set once, for every thread)
        os.environ["PATH"] = envvars["PATH"]
    r = ansible_runner.run(
        private_data_dir=str(private),
        playbook=str((base / spec["playbook"]).resolve()),
        inventory=inventory,
        extravars=extravars,
        envvars=envvars,
        limit=spec.get("limit"),
        quiet=True,
        timeout=int(hook.timeout),
    )
    if r.status != "successful" or r.rc != 0:
        tail = ""
        try:
            tail = r.stdout.read()[-400:]
        except Exception:
            pass
        raise HookFailed(f"playbook {spec['playbook']} {r.status} (rc {r.rc}): {tail.strip()}")
    return f"playbook {spec['playbook']}: {r.status}"
