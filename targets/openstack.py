"""The ``openstack`` target: a point comes back as an OpenStack server (openstacksdk).

``provision`` uploads the point to Glance, streamed: the engine writes no file, the image
(``image_format``: qcow2, the default, where only the point's written chunks travel, or raw) is
made from the archive as the request body is sent (``Disk.open_image``); with
``boot_from_volume``, makes a Cinder volume from it; ``boot`` creates the Nova server with the
runbook's flavor, networks/ports and fixed IPs (the re-IP), security groups, key pair and zone,
and waits for ACTIVE. Everything carries the run: Glance tags ``lifeboat`` and
``lifeboat-run:RUN``, Nova/Cinder metadata ``lifeboat_run``/``lifeboat_machine``, and the
guest's token as its name; each is recorded in the ``ResourceLog`` before it is created, so that
``teardown`` (from any process) deletes exactly what the run made, finding it by name and tag when
a crash came between the create and the record of its id. A server that goes to ERROR is deleted
and Nova's fault is the error. Credentials come from ``clouds.yaml`` / ``OS_*`` (``openstack.connect``),
never from the runbook. API errors become a ``TargetError`` (exit 1) naming the object.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lifeboat.targets.base import (
    Disk,
    Guest,
    Resource,
    ResourceLog,
    TargetContext,
    TargetError,
    TargetUnavailable,
    Uploads,
)

GiB = 1 << 30
POLL_S = 1.0
TAG = "lifeboat"


def run_tag(run_id: str) -> str:
    """The Glance tag of everything one run uploaded."""
    return f"lifeboat-run:{run_id}"


def found_or_none(find: Callable[..., Any], ident: str) -> Any:
    """``find(ident)``, None when it does not exist (what ``ignore_missing=True`` did, deprecated)."""
    import openstack.exceptions as ox

    try:
        return find(ident, ignore_missing=False)
    except ox.NotFoundException:
        return None


def counted(pieces: Iterator[bytes], sent: list[int]) -> Iterator[bytes]:
    """``pieces``, adding their lengths to ``sent[0]`` as they go."""
    for piece in pieces:
        sent[0] += len(piece)
        yield piece


class OpenStackError(TargetError):
    """An OpenStack API call failed (exit status 1), the message naming the object."""


class OpenStackTarget(Uploads):
    """A Nova server booted from the point uploaded to Glance (or a Cinder volume made from it)."""

    name = "openstack"

    def __init__(self, settings: dict[str, Any], context: TargetContext) -> None:
        super().__init__(settings, context)
        self._conn: Any = None

    def image_formats(self) -> list[str]:
        """The configured ``image_format`` first; Glance takes both."""
        first = self.settings["image_format"]
        return [first, *[f for f in ("qcow2", "raw") if f != first]]

    def supports_network(self, mode: str) -> bool:
        """none; mapped (onto Neutron networks by name); isolated with an ``isolated_network``."""
        return mode in ("none", "mapped") or (mode == "isolated" and "isolated_network" in self.settings)

    # -- connection and errors -----------------------------------------------------------
    def conn(self) -> Any:
        """The openstacksdk connection (made once), from clouds.yaml or the OS_* variables."""
        if self._conn is None:
            import openstack

            try:
                self._conn = openstack.connect(
                    cloud=self.settings.get("cloud"),
                    region_name=self.settings.get("region"),
                    api_timeout=self.settings["api_timeout_s"],
                )
            except openstack.exceptions.ConfigException as e:
                raise TargetUnavailable(f"OpenStack configuration: {e} (clouds.yaml, OS_CLOUD or OS_*)") from None
        return self._conn

    def _who(self) -> str:
        auth = self.conn().config.get_auth_args() if self._conn is not None else {}
        user, project = auth.get("username") or auth.get("user_id"), auth.get("project_name") or auth.get("project_id")
        return f"user {user!r}, project {project!r} at {auth.get('auth_url')}"

    @contextmanager
    def api(self, what: str) -> Iterator[None]:
        """Turn the errors of OpenStack calls into an ``OpenStackError`` whose message says
        ``what`` was being done (it names the object) and why."""
        import keystoneauth1.exceptions as ka
        import openstack.exceptions as ox

        try:
            yield
        except (ka.Unauthorized, ka.Forbidden) as e:
            if isinstance(e, ka.Forbidden):
                raise OpenStackError(f"{what}: OpenStack refused it ({self._who()}): {e.message}") from None
            raise OpenStackError(
                f"{what}: OpenStack refused the credentials ({self._who()}): wrong password, user or project?"
            ) from None
        except ka.ConnectTimeout as e:
            raise OpenStackError(f"{what}: no answer within {self.settings['api_timeout_s']} s ({e})") from None
        except ka.ConnectFailure as e:
            raise OpenStackError(f"{what}: cannot reach the service ({e})") from None
        except ka.EndpointNotFound as e:
            raise OpenStackError(f"{what}: the cloud's catalog has no such service ({e})") from None
        except ka.ClientException as e:
            raise OpenStackError(f"{what}: {e}") from None
        except ox.ResourceNotFound as e:
            raise OpenStackError(f"{what}: not found ({e.details or e.message})") from None
        except ox.ResourceTimeout as e:
            raise OpenStackError(f"{what}: timed out ({e.message})") from None
        except ox.HttpException as e:
            detail = e.details or e.message
            if e.status_code in (403, 413) and "quota" in str(detail).lower():
                raise OpenStackError(f"{what}: quota exceeded: {detail}") from None
            if e.status_code == 401:
                raise OpenStackError(f"{what}: OpenStack refused the credentials ({self._who()})") from None
            raise OpenStackError(f"{what}: HTTP {e.status_code}: {detail}") from None
        except ox.SDKException as e:
            if "does not have any supported versions" in str(e):  # its version discovery went unanswered
                limit = self.settings["api_timeout_s"]
                raise OpenStackError(f"{what}: no answer within {limit} s, or no API version we speak ({e})") from None
            raise OpenStackError(f"{what}: {e}") from None

    # -- checks --------------------------------------------------------------------------
    def prepare(self) -> None:
        """Authenticate, then look up the flavor, networks, ports, security groups, key pair and
        zone, so that a wrong name fails before anything is uploaded."""
        conn = self.conn()
        with self.api("authenticating to OpenStack"):
            conn.session.get_token()
        self.flavor()
        for net in self.settings["networks"]:
            self.network_ref(net)
        if "isolated_network" in self.settings:
            self.network_ref({"network": self.settings["isolated_network"]})
        for name in self.settings["security_groups"]:
            with self.api(f"security group {name!r}"):
                conn.network.find_security_group(name, ignore_missing=False)
        if "key_name" in self.settings:
            with self.api(f"key pair {self.settings['key_name']!r}"):
                conn.compute.get_keypair(self.settings["key_name"])
        zone = self.settings.get("availability_zone")
        if zone is not None:
            with self.api("availability zones"):
                zones = [z.name for z in conn.compute.availability_zones()]
            if zone not in zones:
                raise OpenStackError(f"availability zone {zone!r}: not found (the cloud has {', '.join(zones)})")

    def flavor(self) -> Any:
        """The configured flavor."""
        with self.api(f"flavor {self.settings['flavor']!r}"):
            return self.conn().compute.find_flavor(self.settings["flavor"], ignore_missing=False)

    def network_ref(self, net: dict[str, str]) -> dict[str, str]:
        """One Nova ``networks`` entry: ``{"uuid", "fixed_ip"}`` or ``{"port"}``, checked in Neutron."""
        conn = self.conn()
        if "port" in net:
            with self.api(f"port {net['port']!r}"):
                return {"port": conn.network.find_port(net["port"], ignore_missing=False).id}
        with self.api(f"network {net['network']!r}"):
            ref = {"uuid": conn.network.find_network(net["network"], ignore_missing=False).id}
        if "fixed_ip" in net:
            ref["fixed_ip"] = net["fixed_ip"]
        return ref

    def networks(self, guest: Guest) -> list[dict[str, str]]:
        """The server's NICs: the runbook's network mode first (``mapped``: each mapping's
        target network; ``isolated``: ``isolated_network``), then the settings' ``networks``; a
        settings entry naming a network the mode already attaches gives that NIC its fixed IP."""
        mode = guest.network.mode
        named = [{"network": to} for to in guest.network.mappings.values()] if mode == "mapped" else []
        if mode == "isolated":
            named = [{"network": self.settings["isolated_network"]}]
        extra = list(self.settings["networks"])
        for nic in named:
            same = next((n for n in extra if n.get("network") == nic["network"]), None)
            if same is not None:
                nic.update(same)
                extra.remove(same)
        return [self.network_ref(n) for n in [*named, *extra]]

    @staticmethod
    def metadata(guest: Guest) -> dict[str, str]:
        """What every server and volume of the run carries (found by it at teardown)."""
        return {"lifeboat_run": guest.run_id, "lifeboat_machine": guest.name}

    # -- provision: the image, maybe a volume --------------------------------------------
    def provision(self, guest: Guest, disk: Disk, log: ResourceLog) -> None:
        """Upload the point's image to Glance; with ``boot_from_volume``, make the boot volume."""
        if disk.open_image is None or disk.image_format is None:
            raise TargetError(f"{guest.name}: the openstack target needs the point's image as a stream")
        image_id = self._upload(guest, disk, log)
        if self.settings["boot_from_volume"]:
            size = self.settings.get("volume_size_gib") or max(1, -(-disk.size // GiB))
            self._volume(guest, image_id, int(size), log)

    def _find_image(self, guest: Guest) -> Any:
        """This run's image of this guest in Glance (by name and run tag), or None."""
        with self.api(f"looking up image {guest.token!r} in Glance"):
            for image in self.conn().image.images(tag=[run_tag(guest.run_id)]):
                if image.name == guest.token:
                    return image
        return None

    def _upload(self, guest: Guest, disk: Disk, log: ResourceLog) -> str:
        conn = self.conn()
        res = log.record("image", guest.token, {"run": guest.run_id})
        if res.data.get("id"):
            with self.api(f"looking up image {res.data['id']} ({guest.token}) in Glance"):
                image = found_or_none(conn.image.find_image, res.data["id"])
        else:
            image = self._find_image(guest)
        if image is None:
            with self.api(f"creating image {guest.token!r} in Glance"):
                image = conn.image.create_image(
                    name=guest.token,
                    disk_format=disk.image_format,
                    container_format="bare",
                    visibility="private",
                    tags=[TAG, run_tag(guest.run_id)],
                    allow_duplicates=True,
                    lifeboat_machine=guest.name,
                )
            log.update(res, {"id": image.id})
        if image.status == "active":
            return str(image.id)
        if image.status != "queued":  # an interrupted upload left it "saving"/"killed": start again
            with self.api(f"deleting the incomplete image {image.id}"):
                conn.image.delete_image(image, ignore_missing=True)
            log.update(res, {"id": None})
            return self._upload(guest, disk, log)
        assert disk.open_image is not None
        sent = [0]
        body = counted(disk.open_image(), sent)
        self.context.log(f"{guest.name}: uploading the point ({disk.image_format}) to Glance image {image.id}")
        started = time.monotonic()
        import openstack.exceptions as ox

        with self.api(f"uploading the point to Glance image {image.id} ({guest.token})"):
            resp = conn.image.put(
                f"/images/{image.id}/file", data=body, headers={"Content-Type": "application/octet-stream"}
            )
            ox.raise_from_response(resp)
            image = conn.image.get_image(image.id)
        if image.status != "active" or image.size != sent[0]:
            raise OpenStackError(
                f"Glance image {image.id} ({guest.token}) is {image.status!r} with {image.size} bytes "
                f"after an upload of {sent[0]}"
            )
        log.update(res, {"bytes": sent[0], "seconds": round(time.monotonic() - started, 3)})
        return str(image.id)

    def _volume(self, guest: Guest, image_id: str, size: int, log: ResourceLog) -> None:
        conn = self.conn()
        res = log.record("volume", guest.token, {"run": guest.run_id})
        volume = self._existing_volume(res)
        if volume is None:
            what = f"creating volume {guest.token!r} ({size} GiB) from image {image_id}"
            with self.api(what):
                volume = conn.block_storage.create_volume(
                    name=guest.token,
                    size=size,
                    image_id=image_id,
                    availability_zone=self.settings.get("availability_zone"),
                    metadata=self.metadata(guest),
                )
            log.update(res, {"id": volume.id})
        with self.api(f"waiting for volume {volume.id} ({guest.token}) to become available"):
            conn.block_storage.wait_for_status(
                volume, "available", failures=["error"], interval=POLL_S, wait=self.settings["volume_timeout_s"]
            )

    def _existing_volume(self, res: Resource) -> Any:
        """The recorded volume, found by id, else by name and run metadata; None if none."""
        conn = self.conn()
        with self.api(f"looking up volume {res.ident}"):
            if res.data.get("id"):
                return found_or_none(conn.block_storage.find_volume, res.data["id"])
            for volume in conn.block_storage.volumes(name=res.ident):
                if volume.name == res.ident and (volume.metadata or {}).get("lifeboat_run") == res.data.get("run"):
                    return volume
        return None

    def _existing_server(self, res: Resource) -> Any:
        """The recorded server, found by id, else by name and run metadata; None if none."""
        conn = self.conn()
        with self.api(f"looking up server {res.ident}"):
            if res.data.get("id"):
                return found_or_none(conn.compute.find_server, res.data["id"])
            for server in conn.compute.servers(name=f"^{res.ident}$"):
                if server.name == res.ident and (server.metadata or {}).get("lifeboat_run") == res.data.get("run"):
                    return server
        return None

    # -- boot ----------------------------------------------------------------------------
    def _resource(self, log: ResourceLog, kind: str) -> Resource | None:
        return next((r for r in log.resources() if r.kind == kind), None)

    def boot(self, guest: Guest, log: ResourceLog) -> None:
        """Create the server (adopting one this run already made) and wait for ACTIVE; on ERROR,
        delete it and fail with Nova's fault."""
        conn = self.conn()
        image = self._resource(log, "image")
        if image is None or not image.data.get("id"):
            raise TargetError(f"{guest.name}: boot before provision (no image recorded)")
        res = log.record("server", guest.token, {"run": guest.run_id})
        server = self._existing_server(res)
        if server is None:
            spec: dict[str, Any] = {
                "name": guest.token,
                "flavor_id": self.flavor().id,
                "networks": self.networks(guest),
                "metadata": self.metadata(guest),
            }
            if self.settings["security_groups"]:
                spec["security_groups"] = [{"name": g} for g in self.settings["security_groups"]]
            for key in ("key_name", "availability_zone"):
                if key in self.settings:
                    spec[key] = self.settings[key]
            volume = self._resource(log, "volume")
            if volume is not None:
                spec["block_device_mapping"] = [
                    {
                        "boot_index": 0,
                        "uuid": volume.data["id"],
                        "source_type": "volume",
                        "destination_type": "volume",
                        "delete_on_termination": False,
                    }
                ]
            else:
                spec["image_id"] = image.data["id"]
            with self.api(f"creating server {guest.token!r} (flavor {self.settings['flavor']!r})"):
                server = conn.compute.create_server(**spec)
            log.update(res, {"id": server.id})
        self._wait_active(guest, res, server.id)

    def _wait_active(self, guest: Guest, res: Resource, server_id: str) -> None:
        timeout = self.settings["boot_timeout_s"]
        deadline = time.monotonic() + timeout
        while True:
            with self.api(f"waiting for server {server_id} ({guest.token})"):
                server = self.conn().compute.get_server(server_id)
            if server.status == "ACTIVE":
                return
            if server.status == "ERROR":
                fault = (server.fault or {}).get("message") or "no fault message"
                self.destroy(res)
                raise OpenStackError(f"server {server_id} ({guest.token}) went to ERROR: {fault} (deleted)")
            if time.monotonic() > deadline:
                raise OpenStackError(
                    f"server {server_id} ({guest.token}) is still {server.status} after {timeout} s "
                    f"(boot_timeout_s); it is left for teardown"
                )
            time.sleep(POLL_S)

    def is_running(self, guest: Guest, log: ResourceLog) -> bool:
        """The server exists and is ACTIVE."""
        res = self._resource(log, "server")
        server = self._existing_server(res) if res is not None else None
        return server is not None and server.status == "ACTIVE"

    def poll(self, guest: Guest, log: ResourceLog) -> None:
        """A server that went to ERROR or vanished is lost: say why."""
        res = self._resource(log, "server")
        server = self._existing_server(res) if res is not None else None
        if server is None:
            raise OpenStackError(f"{guest.name}: server {guest.token} is gone")
        if server.status == "ERROR":
            fault = (server.fault or {}).get("message") or "no fault message"
            raise OpenStackError(f"{guest.name}: server {server.id} went to ERROR: {fault}")

    def guest_endpoint(self, guest: Guest, log: ResourceLog, port: int) -> tuple[str, int] | None:
        """The server's first fixed address (the orchestrator host must route to it)."""
        res = self._resource(log, "server")
        server = self._existing_server(res) if res is not None else None
        for addresses in (server.addresses or {}).values() if server is not None else []:
            for a in addresses:
                return str(a["addr"]), port
        return None

    def uploaded_image(self, guest: Guest, log: ResourceLog) -> str | None:
        """The Glance id of the guest's image (None before provision)."""
        res = self._resource(log, "image")
        return str(res.data["id"]) if res is not None and res.data.get("id") else None

    # -- teardown ------------------------------------------------------------------------
    def destroy(self, resource: Resource) -> None:
        """Delete a server (waiting until it is gone, so its volume is free), a volume or an
        image; found by the recorded id, else by name and the run's tag or metadata."""
        conn = self.conn()
        if resource.kind == "server":
            server = self._existing_server(resource)
            if server is not None:
                with self.api(f"deleting server {server.id} ({resource.ident})"):
                    conn.compute.delete_server(server, ignore_missing=True)
                    conn.compute.wait_for_delete(server, interval=POLL_S, wait=self.settings["boot_timeout_s"])
        elif resource.kind == "volume":
            volume = self._existing_volume(resource)
            if volume is not None:
                with self.api(f"deleting volume {volume.id} ({resource.ident})"):
                    conn.block_storage.delete_volume(volume, ignore_missing=True)
                    conn.block_storage.wait_for_delete(volume, interval=POLL_S, wait=self.settings["volume_timeout_s"])
        elif resource.kind == "image":
            with self.api(f"deleting Glance image of {resource.ident}"):
                ids = [resource.data["id"]] if resource.data.get("id") else []
                ids += [
                    i.id
                    for i in conn.image.images(tag=[run_tag(str(resource.data.get("run")))])
                    if i.name == resource.ident and i.id not in ids
                ]
                for image_id in ids:
                    conn.image.delete_image(image_id, ignore_missing=True)
        else:
            super().destroy(resource)
