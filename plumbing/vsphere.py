"""vSphere's wire: a logged-in pyvmomi session, its tasks, its inventory and its datastore HTTP.

Shared by the ``vmware`` target (``targets/vmware.py``) and the ``vsphere://`` source
(``agent/vsphere.py``), so both log in, verify TLS, wait for tasks and move datastore files one
way. Why here: targets and agent may not import each other, and this is wire and TLS code that
knows nothing else of lifeboat.

- TLS is verified by default (against ``ca_file``, else the system's trust store, and the host
  name); only ``insecure=True``, which a runbook must say, turns it off.
- The password comes from a file or an environment variable, never from the runbook itself.
- Every failure is a ``VsphereError`` (exit status 1) whose message names the object at fault:
  the host and user for a refused login, the datastore, port group, resource pool or folder that
  does not exist, the task and its object for a task that failed or did not finish in time.
- Datastore files move over vSphere's documented HTTP file access (``/folder/PATH?dcPath=DC&
  dsName=DS``, authenticated by the session's ``vmware_soap_session`` cookie): uploads streamed in
  1 MiB pieces, reads at any offset by range requests.
"""

from __future__ import annotations

import functools
import http.client
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from lifeboat.plumbing.errors import LifeboatError, UsageError

PIECE = 1 << 20
T = TypeVar("T")


class VsphereError(LifeboatError):
    """vCenter/ESXi refused or failed an operation (exit status 1); the message names the object."""


class VsphereSettingsError(UsageError):
    """The connection settings cannot be used (no password given, unreadable file): exit status 2."""


def read_password(password_file: str | None, password_env: str | None) -> str:
    """The password, from a file (its first line) or an environment variable; never inline."""
    if password_file:
        try:
            text = Path(password_file).read_text()
        except OSError as e:
            raise VsphereSettingsError(f"vSphere password file {password_file}: {e.strerror}") from None
        line = text.splitlines()[0] if text.strip() else ""
        if not line:
            raise VsphereSettingsError(f"vSphere password file {password_file} is empty")
        return line
    if password_env:
        value = os.environ.get(password_env)
        if not value:
            raise VsphereSettingsError(f"vSphere password: the environment variable {password_env} is not set")
        return value
    raise VsphereSettingsError("vSphere password: give password_file or password_env")


def split_host(host: str) -> tuple[str, int]:
    """``HOST[:PORT]`` (port 443 by default)."""
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and "]" not in port:
        return name.strip("[]"), int(port)
    return host.strip("[]"), 443


@dataclass
class Session:
    """A logged-in connection: the service instance, its content, and what datastore HTTP needs."""

    host: str  # HOST[:PORT] as given
    si: Any  # vim.ServiceInstance
    context: ssl.SSLContext
    timeout: float

    @property
    def content(self) -> Any:
        """The ServiceContent (inventory root, managers)."""
        return self.si.RetrieveContent()

    def close(self) -> None:
        """Log out (a failure to do so is not an error: the session expires)."""
        from pyVim.connect import Disconnect

        try:
            Disconnect(self.si)
        except Exception:  # noqa: BLE001 - the server may be gone already
            pass

    # -- inventory ------------------------------------------------------------------------
    def datacenter(self, name: str) -> Any:
        """The datacenter called ``name``."""
        for entity in self.content.rootFolder.childEntity:
            if _is(entity, "Datacenter") and entity.name == name:
                return entity
        raise VsphereError(f"vSphere at {self.host}: no datacenter {name!r}")

    def datastore(self, dc: Any, name: str) -> Any:
        """The datastore called ``name`` in the datacenter."""
        for ds in dc.datastore:
            if ds.name == name:
                return ds
        raise VsphereError(f"vSphere at {self.host}: no datastore {name!r} in datacenter {dc.name!r}")

    def network(self, dc: Any, name: str) -> Any:
        """The port group (standard or distributed) called ``name`` in the datacenter."""
        for net in dc.network:
            if net.name == name:
                return net
        raise VsphereError(f"vSphere at {self.host}: no port group {name!r} in datacenter {dc.name!r}")

    def resource_pool(self, dc: Any, path: str | None) -> Any:
        """The resource pool at ``path`` (``CLUSTER_OR_HOST[/POOL...]``, below the datacenter's
        host folder); None: the first compute resource's root pool."""
        computes = [c for c in _walk_folder(dc.hostFolder) if hasattr(c, "resourcePool")]
        if not computes:
            raise VsphereError(f"vSphere at {self.host}: datacenter {dc.name!r} has no host or cluster")
        if not path:
            return computes[0].resourcePool
        head, *rest = path.strip("/").split("/")
        pool = next((c.resourcePool for c in computes if c.name == head), None)
        for name in rest:
            if pool is None:
                break
            pool = next((p for p in pool.resourcePool if p.name == name), None)
        if pool is None:
            raise VsphereError(f"vSphere at {self.host}: no resource pool {path!r} in datacenter {dc.name!r}")
        return pool

    def child_folder(self, parent: Any, name: str) -> Any | None:
        """The folder called ``name`` right below ``parent``, or None."""
        for child in parent.childEntity:
            if _is(child, "Folder") and child.name == name:
                return child
        return None

    def find_vm(self, folder: Any, name: str) -> Any | None:
        """The virtual machine called ``name`` right in ``folder``, or None."""
        for child in folder.childEntity:
            if _is(child, "VirtualMachine") and child.name == name:
                return child
        return None

    def vm_by_path(self, dc: Any, path: str) -> Any:
        """The VM at ``path`` below the datacenter's VM folder (``NAME`` or ``FOLDER/.../NAME``)."""
        found = self.content.searchIndex.FindByInventoryPath(f"{dc.name}/vm/{path.strip('/')}")
        if found is None or not _is(found, "VirtualMachine"):
            raise VsphereError(f"vSphere at {self.host}: no virtual machine {path!r} in datacenter {dc.name!r}")
        return found

    # -- tasks ----------------------------------------------------------------------------
    def wait(self, task: Any, what: str) -> Any:
        """Wait for a task; its result. A failed task, or one still running after the session's
        timeout (the step's), is a ``VsphereError`` naming ``what`` (the running task is cancelled)."""
        limit = self.timeout
        deadline = time.monotonic() + limit
        delay = 0.05
        while True:
            info = self.properties(task, ["info.state", "info.error", "info.result"])
            if info["info.state"] == "success":
                return info.get("info.result")
            if info["info.state"] == "error":
                raise VsphereError(f"vSphere at {self.host}: {what} failed: {fault_text(info.get('info.error'))}")
            if time.monotonic() > deadline:
                try:
                    task.CancelTask()
                except Exception:  # noqa: BLE001 - not every task can be cancelled
                    pass
                raise VsphereError(f"vSphere at {self.host}: {what} did not finish within {limit:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def properties(self, obj: Any, paths: list[str]) -> dict[str, Any]:
        """Some properties of ``obj`` by one ``RetrieveContents``; an unset one is absent. Why not
        ``obj.prop``: a task's whole ``info`` also carries its entity, which govmomi's simulator
        fills with a non-entity (the FileManager) that pyvmomi refuses to decode, and the
        simulator's ``Fetch`` of an unset property (a VM's ``snapshot``) breaks the connection."""
        from pyVmomi import vmodl

        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=obj)],
            propSet=[pc.PropertySpec(type=type(obj), pathSet=paths)],
        )
        found = self.content.propertyCollector.RetrieveContents([spec])
        return {p.name: p.val for obj in found for p in obj.propSet}

    # -- datastore HTTP -------------------------------------------------------------------
    def _request(self, method: str, dc: str, ds: str, path: str, body: Any = None, length: int | None = None) -> Any:
        name, port = split_host(self.host)
        conn = http.client.HTTPSConnection(name, port, context=self.context, timeout=self.timeout)
        url = f"/folder/{quote(path)}?{urlencode({'dcPath': dc, 'dsName': ds})}"
        headers = {"Cookie": self._cookie()}
        if length is not None:
            headers["Content-Length"] = str(length)
            headers["Content-Type"] = "application/octet-stream"
        try:
            conn.request(method, url, body=body, headers=headers)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise VsphereError(f"vSphere at {self.host}: {method} [{ds}] {path}: {e}") from None

    def _cookie(self) -> str:
        raw: str = self.si._stub.cookie
        # pyvmomi keeps the whole Set-Cookie value; the server wants name=value only
        return raw.split(";", 1)[0].strip()

    def upload(self, dc: str, ds: str, path: str, chunks: Iterator[bytes], length: int) -> None:
        """PUT ``length`` bytes from ``chunks`` as the datastore file ``[ds] path``."""
        conn, resp = self._request("PUT", dc, ds, path, body=chunks, length=length)
        try:
            resp.read()
            if resp.status not in (200, 201, 204):
                raise VsphereError(
                    f"vSphere at {self.host}: upload of [{ds}] {path} answered {resp.status} {resp.reason}"
                )
        finally:
            conn.close()

    def ranged(self, dc: str, ds: str, path: str) -> DatastoreFile:
        """The datastore file ``[ds] path`` for reads at any offset (HTTP range requests)."""
        return DatastoreFile(self, dc, ds, path)


class DatastoreFile:
    """Reads of one datastore file at any offset, by HTTP range requests on one kept-alive
    connection per thread (the archive reads with several threads)."""

    def __init__(self, session: Session, dc: str, ds: str, path: str) -> None:
        self.session, self.dc, self.ds, self.path = session, dc, ds, path
        self._local = threading.local()
        self._all: list[http.client.HTTPSConnection] = []
        self._lock = threading.Lock()

    def _conn(self) -> http.client.HTTPSConnection:
        conn: http.client.HTTPSConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            name, port = split_host(self.session.host)
            conn = http.client.HTTPSConnection(name, port, context=self.session.context, timeout=self.session.timeout)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer only at the end of the file)."""
        url = f"/folder/{quote(self.path)}?{urlencode({'dcPath': self.dc, 'dsName': self.ds})}"
        headers = {"Cookie": self.session._cookie(), "Range": f"bytes={offset}-{offset + length - 1}"}
        for attempt in (1, 2):  # a kept-alive connection the server closed is opened again once
            conn = self._conn()
            try:
                conn.request("GET", url, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    where = f"[{self.ds}] {self.path}"
                    raise VsphereError(f"vSphere at {self.session.host}: reading {where}: {e}") from None
        if resp.status == 206 or (resp.status == 200 and offset == 0 and len(data) <= length):
            return data
        raise VsphereError(
            f"vSphere at {self.session.host}: range read of [{self.ds}] {self.path} at {offset} answered "
            f"{resp.status} {resp.reason}"
        )

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


def guarded(method: Callable[..., T]) -> Callable[..., T]:
    """A driver method whose pyvmomi calls may fail on the wire (a timeout, a reset connection) or
    with a fault the code did not expect: either becomes a ``VsphereError`` naming the host and the
    step, not an internal error. ``self.settings["host"]`` names the host."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except (OSError, http.client.HTTPException) as e:
            raise VsphereError(f"vSphere at {self.settings['host']}: {method.__name__}: {e!r}") from None
        except Exception as e:
            from pyVmomi import vmodl

            if isinstance(e, vmodl.MethodFault):
                raise VsphereError(f"vSphere at {self.settings['host']}: {method.__name__}: {fault_text(e)}") from None
            raise

    return wrapper


def fault_text(fault: Any) -> str:
    """A vSphere fault as one line: its message, else its type's name."""
    msg = getattr(fault, "localizedMessage", None) or getattr(fault, "msg", None)
    kind = type(fault).__name__.rsplit(".", 1)[-1]
    return f"{msg} ({kind})" if msg else kind


def _is(obj: Any, kind: str) -> bool:
    return type(obj).__name__.rsplit(".", 1)[-1] == kind


def _walk_folder(folder: Any) -> Iterator[Any]:
    for child in folder.childEntity:
        if _is(child, "Folder"):
            yield from _walk_folder(child)
        else:
            yield child


def connect(
    host: str,
    user: str,
    password: str,
    *,
    ca_file: str | None = None,
    insecure: bool = False,
    timeout: float = 600,
) -> Session:
    """Log in to vCenter/ESXi at ``host`` (``HOST[:PORT]``) over https, the certificate verified
    unless ``insecure``; every call of the session gives up after ``timeout`` seconds without an
    answer (a hung server is an error, not a wait forever)."""
    from pyVim.connect import SmartConnect
    from pyVmomi import vim

    if insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            raise VsphereSettingsError(f"vSphere CA file {ca_file}: {e}") from None
    name, port = split_host(host)
    try:
        # pyvmomi asks for the API versions with no timeout at all: ask first, with one
        probe = http.client.HTTPSConnection(name, port, context=context, timeout=timeout)
        try:
            probe.request("GET", "/sdk/vimServiceVersions.xml")
            probe.getresponse().read()
        finally:
            probe.close()
        si = SmartConnect(
            host=name, port=port, user=user, pwd=password, sslContext=context, httpConnectionTimeout=timeout
        )
    except vim.fault.InvalidLogin:
        raise VsphereError(f"vSphere at {host}: login as {user!r} refused (wrong user name or password)") from None
    except ssl.SSLCertVerificationError as e:
        raise VsphereError(
            f"vSphere at {host}: its TLS certificate is not trusted ({e.verify_message}); "
            "give ca_file, or (only if you mean it) insecure: true in the runbook"
        ) from None
    except (OSError, http.client.HTTPException) as e:
        raise VsphereError(f"vSphere at {host}: cannot connect: {e}") from None
    return Session(host, si, context, timeout)
