"""Power and boot control of a physical server through its management controller (BMC).

Redfish through the ``sushy`` library and IPMI over LAN through ``pyghmi``, as OpenStack Ironic does;
the password is read from a file (``password_file``), never from a runbook. Every failure is a
``BmcError`` naming the server and its BMC: not answering, refusing the credentials, or refusing the
request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from lifeboat.targets.base import TargetError


class BmcError(TargetError):
    """The server's BMC does not answer, refuses the credentials or the request (exit status 1)."""


class Bmc(Protocol):
    """What the pxe driver asks of a BMC."""

    def power_state(self) -> str:
        """ "on" or "off"."""
        ...

    def power_on(self) -> None:
        """Power the server on (nothing if it is on)."""
        ...

    def power_off(self) -> None:
        """Power the server off at once (nothing if it is off)."""
        ...

    def set_next_boot(self, device: str) -> None:
        """Boot from ``network`` or ``disk`` from now on."""
        ...


def read_password(server: str, path: str | None) -> str | None:
    """The BMC password from its file (first line), None without a file."""
    if not path:
        return None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise BmcError(f"{server}: cannot read the BMC password file {path}: {e.strerror}") from None
    return lines[0] if lines else ""


class RedfishBmc:
    """A Redfish service (``address``: its base URL, e.g. https://10.0.9.30; ``system``: the system's
    path or id, default the only one)."""

    def __init__(self, server: str, settings: dict[str, Any]) -> None:
        self.server = server
        address = str(settings["address"])
        self.url = address if "://" in address else f"https://{address}"
        self.user = settings.get("user")
        self.password = read_password(server, settings.get("password_file"))
        self.system_id = settings.get("system")
        self.verify = bool(settings.get("verify_tls", True))
        self._system: Any = None

    def _fail(self, doing: str, e: Exception) -> BmcError:
        import sushy.exceptions as sx

        if isinstance(e, sx.AccessError):
            why = "refused the credentials" if e.status_code in (401, 403) else f"refused access ({e.status_code})"
        elif isinstance(e, sx.ConnectionError):
            why = "does not answer"
        else:
            why = f"failed: {e}"
        return BmcError(f"{self.server}: the Redfish BMC at {self.url} {why} ({doing})")

    def system(self) -> Any:
        """The sushy System of the server (connecting on first use)."""
        if self._system is not None:
            return self._system
        import sushy

        try:
            root = sushy.Sushy(
                self.url + "/redfish/v1",
                verify=self.verify,
                auth=sushy.auth.BasicAuth(self.user, self.password or "") if self.user else None,
                connect_timeout=10,
                read_timeout=60,
                server_side_retries=2,
                server_side_retries_delay=1,
            )
            if self.system_id:
                path = self.system_id if self.system_id.startswith("/") else f"/redfish/v1/Systems/{self.system_id}"
                self._system = root.get_system(path)
            else:
                members = root.get_system_collection().get_members()
                if len(members) != 1:
                    raise BmcError(
                        f"{self.server}: the Redfish BMC at {self.url} has {len(members)} systems: "
                        "set bmc.system to the server's"
                    )
                self._system = members[0]
        except sushy.exceptions.SushyError as e:
            raise self._fail("connecting", e) from None
        return self._system

    def power_state(self) -> str:
        """See ``Bmc``."""
        import sushy

        try:
            system = self.system()
            system.refresh()
            return "on" if system.power_state == sushy.PowerState.ON else "off"
        except sushy.exceptions.SushyError as e:
            raise self._fail("reading the power state", e) from None

    def _reset(self, kind: Any, doing: str) -> None:
        import sushy

        try:
            self.system().reset_system(kind)
        except sushy.exceptions.SushyError as e:
            raise self._fail(doing, e) from None

    def power_on(self) -> None:
        """See ``Bmc``."""
        import sushy

        if self.power_state() != "on":
            self._reset(sushy.ResetType.ON, "powering on")

    def power_off(self) -> None:
        """See ``Bmc``."""
        import sushy

        if self.power_state() != "off":
            self._reset(sushy.ResetType.FORCE_OFF, "powering off")

    def set_next_boot(self, device: str) -> None:
        """See ``Bmc``: a continuous override, so that a reboot during the restore netboots again."""
        import sushy

        target = {"network": sushy.BootSource.PXE, "disk": sushy.BootSource.HDD}[device]
        try:
            self.system().set_system_boot_options(target, enabled=sushy.BootSourceOverrideEnabled.CONTINUOUS)
        except sushy.exceptions.SushyError as e:
            raise self._fail(f"setting the boot device to {device}", e) from None


_IPMI_SESSIONS: dict[tuple[str, int, str, str], Any] = {}


class IpmiBmc:
    """An IPMI-over-LAN BMC (``address``: HOST or HOST:PORT, port 623 by default)."""

    def __init__(self, server: str, settings: dict[str, Any]) -> None:
        self.server = server
        self.address = str(settings["address"])
        host, _, port = self.address.rpartition(":") if self.address.count(":") == 1 else (self.address, "", "")
        self.host, self.port = host, int(port or 623)
        self.user = settings.get("user", "")
        self.password = read_password(server, settings.get("password_file")) or ""

    def _fail(self, doing: str, e: Exception) -> BmcError:
        text = str(e)
        if "timeout" in text.lower() or "no response" in text.lower():
            why = "does not answer"
        elif "unauthorized" in text.lower() or "password" in text.lower() or "user" in text.lower():
            why = f"refused the credentials ({text})"
        else:
            why = f"failed: {text}"
        return BmcError(f"{self.server}: the IPMI BMC at {self.address} {why} ({doing})")

    def command(self) -> Any:
        """The pyghmi session, one per BMC and user in a process (pyghmi keeps its sessions in a
        process-wide table: a second ``Command`` for the same BMC waits forever for a logon that
        has already happened)."""
        key = (self.host, self.port, self.user, self.password)
        if key not in _IPMI_SESSIONS:
            from pyghmi.exceptions import IpmiException
            from pyghmi.ipmi import command

            try:
                _IPMI_SESSIONS[key] = command.Command(
                    bmc=self.host, userid=self.user, password=self.password, port=self.port
                )
            except IpmiException as e:
                raise self._fail("logging in", e) from None
        return _IPMI_SESSIONS[key]

    def _call(self, doing: str, method: str, *args: Any, **kwargs: Any) -> Any:
        from pyghmi.exceptions import IpmiException

        try:
            result = getattr(self.command(), method)(*args, **kwargs)
        except IpmiException as e:
            raise self._fail(doing, e) from None
        if isinstance(result, dict) and result.get("error"):
            raise self._fail(doing, Exception(result["error"]))
        return result

    def power_state(self) -> str:
        """See ``Bmc``."""
        return "on" if self._call("reading the power state", "get_power")["powerstate"] == "on" else "off"

    def power_on(self) -> None:
        """See ``Bmc``."""
        self._call("powering on", "set_power", "on", wait=True)

    def power_off(self) -> None:
        """See ``Bmc``."""
        self._call("powering off", "set_power", "off", wait=True)

    def set_next_boot(self, device: str) -> None:
        """See ``Bmc``: persistent, so that a reboot during the restore netboots again."""
        self._call(f"setting the boot device to {device}", "set_bootdev", {"network": "network", "disk": "hd"}[device],
                   persist=True)  # fmt: skip


def connect(server: str, settings: dict[str, Any]) -> Bmc:
    """The BMC of ``server`` as its settings (the pxe schema's ``bmc``) describe it."""
    if settings.get("protocol", "redfish") == "ipmi":
        return IpmiBmc(server, settings)
    return RedfishBmc(server, settings)
