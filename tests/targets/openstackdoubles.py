"""Nova, Cinder and Neutron as contract doubles: one small HTTP service on loopback that answers
the parts of their APIs the openstack target uses, shaped by the API references (compute v2.1
without microversions, block storage v3, networking v2.0): bodies, status codes, error bodies
(``{"badRequest": {"message", "code"}}``, ``{"itemNotFound": ...}``, ``{"forbidden": ...}``,
Neutron's ``{"NeutronError": ...}``) and the server life cycle BUILD -> ACTIVE, or ERROR with a
``fault``. It is registered in the real Keystone's catalog and trusts only tokens the real
Keystone validates (``GET /v3/auth/tokens``); an ``imageRef`` must be an active image of the real
Glance, asked with the caller's token.

What it is not: nothing boots. Fixed data stands for the cloud's operator set-up: flavors
``m1.tiny``/``m1.small``, ``x1.nohost`` (the scheduler fails: ERROR, "No valid host was found"),
``x1.slow`` (stays in BUILD), ``m1.huge`` (more cores than the project's quota of 20), networks
``private`` (10.0.0.0/24) and ``public`` (203.0.113.0/24), a free port ``spare-port`` on
``private``, security groups ``default`` and ``ssh``, key pair ``ops``, zones ``nova`` and ``az2``.
Servers and volumes live in memory; ``state()`` is what the tests ask (the driver is not its own
judge).
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

QUOTA_CORES = 20
QUOTA_GIGABYTES = 1000
GiB = 1 << 30

FLAVORS: dict[str, dict[str, Any]] = {
    "1": {"id": "1", "name": "m1.tiny", "vcpus": 1, "ram": 512, "disk": 1},
    "2": {"id": "2", "name": "m1.small", "vcpus": 1, "ram": 2048, "disk": 20},
    "90": {"id": "90", "name": "x1.nohost", "vcpus": 2, "ram": 4096, "disk": 20},
    "91": {"id": "91", "name": "x1.slow", "vcpus": 1, "ram": 512, "disk": 1},
    "99": {"id": "99", "name": "m1.huge", "vcpus": 64, "ram": 262144, "disk": 100},
}
ZONES = ("nova", "az2")
KEYPAIRS = {"ops": {"name": "ops", "type": "ssh", "fingerprint": "00:11", "public_key": "ssh-ed25519 AAAA ops"}}
NO_VALID_HOST = "No valid host was found. There are not enough hosts available."


class ApiError(Exception):
    """An error answer: HTTP status and the body the real service sends."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status, body)
        self.status, self.body = status, body


def nova_error(status: int, message: str) -> ApiError:
    key = {400: "badRequest", 403: "forbidden", 404: "itemNotFound", 409: "conflictingRequest"}[status]
    return ApiError(status, {key: {"message": message, "code": status}})


def cinder_error(status: int, message: str) -> ApiError:
    key = {400: "badRequest", 404: "itemNotFound", 413: "overLimit"}[status]
    return ApiError(status, {key: {"message": message, "code": status}})


def neutron_error(status: int, kind: str, message: str) -> ApiError:
    return ApiError(status, {"NeutronError": {"type": kind, "message": message, "detail": ""}})


def public(item: dict[str, Any]) -> dict[str, Any]:
    """An item as the API shows it (keys starting with ``_`` are the double's own)."""
    return {k: v for k, v in item.items() if not k.startswith("_")}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Doubles:
    """The three services on one port: ``/compute/v2.1``, ``/volume/v3/{project}``, ``/network``."""

    def __init__(self, keystone_url: str, glance_url: str) -> None:
        self.keystone_url, self.glance_url = keystone_url, glance_url
        self.lock = threading.RLock()
        self.tokens: dict[str, str] = {}  # token -> project id
        self.servers: dict[str, dict[str, Any]] = {}
        self.volumes: dict[str, dict[str, Any]] = {}
        self.networks: dict[str, dict[str, Any]] = {}
        self.subnets: dict[str, dict[str, Any]] = {}
        self.ports: dict[str, dict[str, Any]] = {}
        self.security_groups: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) in order, for tests
        for name, cidr in (("private", "10.0.0.0/24"), ("public", "203.0.113.0/24")):
            net_id, sub_id = str(uuid.uuid4()), str(uuid.uuid4())
            self.networks[net_id] = {
                "id": net_id,
                "name": name,
                "status": "ACTIVE",
                "subnets": [sub_id],
                "admin_state_up": True,
                "shared": True,
            }
            self.subnets[sub_id] = {
                "id": sub_id,
                "name": f"{name}-subnet",
                "network_id": net_id,
                "cidr": cidr,
                "ip_version": 4,
            }
        for name in ("default", "ssh"):
            sg_id = str(uuid.uuid4())
            self.security_groups[sg_id] = {"id": sg_id, "name": name, "description": name, "security_group_rules": []}
        private = next(n for n in self.networks.values() if n["name"] == "private")
        self._new_port(private, "spare-port", "10.0.0.250", device_id="")
        self.server: ThreadingHTTPServer | None = None
        self.url = ""

    # -- HTTP ----------------------------------------------------------------------------
    def start(self) -> Doubles:
        doubles = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, body = doubles.handle(method, self.path, dict(self.headers), raw)
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server's names)
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def do_PUT(self) -> None:  # noqa: N802
                self._serve("PUT")

            def do_DELETE(self) -> None:  # noqa: N802
                self._serve("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="openstack-doubles", daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def handle(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        """One request: (status, JSON body or None)."""
        parts = urlsplit(path)
        route, query = parts.path.rstrip("/"), {k: v[0] for k, v in parse_qs(parts.query).items()}
        with self.lock:
            self.requests.append((method, route))
        try:
            version = self._version_document(route)
            if version is not None:
                return 200, version
            project = self._project_of(headers.get("X-Auth-Token") or headers.get("x-auth-token") or "")
            body = json.loads(raw) if raw else {}
            with self.lock:
                if route.startswith("/compute/v2.1"):
                    return self._compute(method, route[len("/compute/v2.1") :], query, body, project, headers)
                m = re.match(r"/volume/v3/([^/]+)(/.*)?$", route)
                if m:
                    return self._volume(method, m.group(2) or "", query, body, project, headers)
                if route.startswith("/network/v2.0"):
                    return self._network(method, route[len("/network/v2.0") :], query)
            return 404, {"itemNotFound": {"message": f"no route {route}", "code": 404}}
        except ApiError as e:
            return e.status, e.body

    def _version_document(self, route: str) -> dict[str, Any] | None:
        if route in ("/compute", "/compute/v2.1"):
            v = {
                "id": "v2.1",
                "status": "CURRENT",
                "version": "2.1",
                "min_version": "2.1",
                "updated": "2013-07-23T11:33:21Z",
                "links": [{"rel": "self", "href": f"{self.url}/compute/v2.1/"}],
            }
            return {"version": v} if route.endswith("v2.1") else {"versions": [v]}
        if route in ("/volume", "/volume/v3"):
            v = {
                "id": "v3.0",
                "status": "CURRENT",
                "version": "3.0",
                "min_version": "3.0",
                "updated": "2023-01-01T00:00:00Z",
                "links": [{"rel": "self", "href": f"{self.url}/volume/v3/"}],
            }
            return {"versions": [v]}
        if route == "/network":
            links = [{"rel": "self", "href": f"{self.url}/network/v2.0/"}]
            return {"versions": [{"id": "v2.0", "status": "CURRENT", "links": links}]}
        return None

    def _project_of(self, token: str) -> str:
        """The project of a token, as the real Keystone says (cached); 401 when it does not know it."""
        with self.lock:
            if token in self.tokens:
                return self.tokens[token]
        req = urllib.request.Request(
            f"{self.keystone_url}/auth/tokens", headers={"X-Auth-Token": token, "X-Subject-Token": token}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                project = json.load(resp)["token"]["project"]["id"]
        except (urllib.error.URLError, KeyError, ValueError):
            raise ApiError(
                401, {"error": {"message": "The request you have made requires authentication.", "code": 401}}
            ) from None
        with self.lock:
            self.tokens[token] = project
        return str(project)

    def _glance_image(self, image_id: str, headers: dict[str, str]) -> dict[str, Any] | None:
        """The image as the real Glance shows it to the caller, or None."""
        token = headers.get("X-Auth-Token") or headers.get("x-auth-token") or ""
        req = urllib.request.Request(f"{self.glance_url}/v2/images/{image_id}", headers={"X-Auth-Token": token})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                image: dict[str, Any] = json.load(resp)
                return image
        except (urllib.error.URLError, ValueError):
            return None

    # -- compute ---------------------------------------------------------------------------
    def _compute(
        self,
        method: str,
        route: str,
        query: dict[str, str],
        body: dict[str, Any],
        project: str,
        headers: dict[str, str],
    ) -> tuple[int, Any]:
        if method == "GET" and route in ("/flavors", "/flavors/detail"):
            return 200, {
                "flavors": [self._flavor(f) for f in FLAVORS.values() if query.get("name") in (None, f["name"])]
            }
        m = re.fullmatch(r"/flavors/([^/]+)", route)
        if method == "GET" and m:
            if m.group(1) not in FLAVORS:
                raise nova_error(404, f"Flavor {m.group(1)} could not be found.")
            return 200, {"flavor": self._flavor(FLAVORS[m.group(1)])}
        if method == "GET" and route == "/os-keypairs":
            return 200, {"keypairs": [{"keypair": k} for k in KEYPAIRS.values()]}
        m = re.fullmatch(r"/os-keypairs/([^/]+)", route)
        if method == "GET" and m:
            if m.group(1) not in KEYPAIRS:
                raise nova_error(404, f"Keypair {m.group(1)} not found for user")
            return 200, {"keypair": KEYPAIRS[m.group(1)]}
        if method == "GET" and route in ("/os-availability-zone", "/os-availability-zone/detail"):
            zones = [{"zoneName": z, "zoneState": {"available": True}, "hosts": None} for z in ZONES]
            return 200, {"availabilityZoneInfo": zones}
        if method == "POST" and route == "/servers":
            return 202, {"server": self._create_server(body.get("server") or {}, project, headers)}
        if method == "GET" and route in ("/servers", "/servers/detail"):
            found = [s for s in self.servers.values() if s["tenant_id"] == project]
            if "name" in query:
                found = [s for s in found if re.search(query["name"], s["name"])]
            for s in found:
                self._advance(s)
            return 200, {"servers": [public(s) for s in found]}
        m = re.fullmatch(r"/servers/([^/]+)", route)
        if m:
            server = self.servers.get(m.group(1))
            if server is None or server["tenant_id"] != project:
                raise nova_error(404, "Instance could not be found.")
            if method == "GET":
                self._advance(server)
                return 200, {"server": public(server)}
            if method == "DELETE":
                self._delete_server(server)
                return 204, None
        raise nova_error(404, f"no such compute resource {method} {route}")

    def _flavor(self, f: dict[str, Any]) -> dict[str, Any]:
        links = [{"rel": "self", "href": f"{self.url}/compute/v2.1/flavors/{f['id']}"}]
        return {
            **f,
            "links": links,
            "swap": "",
            "OS-FLV-EXT-DATA:ephemeral": 0,
            "os-flavor-access:is_public": True,
            "rxtx_factor": 1.0,
            "OS-FLV-DISABLED:disabled": False,
        }

    def _find_network(self, ident: str) -> dict[str, Any]:
        if ident in self.networks:
            return self.networks[ident]
        raise nova_error(400, f"Network {ident} could not be found.")

    def _create_server(self, spec: dict[str, Any], project: str, headers: dict[str, str]) -> dict[str, Any]:
        flavor = FLAVORS.get(str(spec.get("flavorRef", "")).rsplit("/", 1)[-1])
        if flavor is None:
            raise nova_error(400, f"Flavor {spec.get('flavorRef')} could not be found.")
        used = sum(FLAVORS[s["flavor"]["id"]]["vcpus"] for s in self.servers.values() if s["tenant_id"] == project)
        if used + flavor["vcpus"] > QUOTA_CORES:
            raise nova_error(
                403,
                f"Quota exceeded for cores: Requested {flavor['vcpus']}, but already used {used} "
                f"of {QUOTA_CORES} cores",
            )
        zone = spec.get("availability_zone") or "nova"
        if zone not in ZONES:
            raise nova_error(400, "The requested availability zone is not available")
        key = spec.get("key_name")
        if key is not None and key not in KEYPAIRS:
            raise nova_error(400, "Invalid key_name provided.")
        groups = []
        for g in spec.get("security_groups") or [{"name": "default"}]:
            if not any(g["name"] in (sg["name"], sg["id"]) for sg in self.security_groups.values()):
                raise nova_error(400, f"Security group {g['name']} not found for project {project}.")
            groups.append({"name": g["name"]})
        volumes = []
        image_ref = spec.get("imageRef") or ""
        for bdm in spec.get("block_device_mapping_v2") or []:
            if bdm.get("source_type") != "volume" or bdm.get("uuid") not in self.volumes:
                raise nova_error(400, f"Block Device Mapping is Invalid: failed to get volume {bdm.get('uuid')}.")
            volume = self.volumes[bdm["uuid"]]
            if volume["status"] != "available":
                raise nova_error(
                    400,
                    f"Invalid volume: volume '{volume['id']}' status must be 'available'. "
                    f"Currently in '{volume['status']}'",
                )
            volumes.append(volume)
        if image_ref:
            image = self._glance_image(image_ref, headers)
            if image is None:
                raise nova_error(400, "Can not find requested image")
            if image.get("status") != "active":
                raise nova_error(400, f"Image {image_ref} is not active.")
        elif not volumes:
            raise nova_error(
                400, "Block Device Mapping is Invalid: You specified more local devices than the limit allows"
            )
        server_id = str(uuid.uuid4())
        ports = []
        for net in spec.get("networks") or []:
            if net.get("port"):
                port = self.ports.get(net["port"])
                if port is None:
                    raise nova_error(400, f"Port {net['port']} could not be found.")
                if port["device_id"]:
                    raise nova_error(409, f"Port {port['id']} is still in use.")
                port["device_id"] = server_id
                ports.append(port)
            else:
                network = self._find_network(str(net.get("uuid")))
                ports.append(self._port_for(network, net.get("fixed_ip"), server_id))
        for v in volumes:
            v["status"] = "in-use"
            v["attachments"] = [{"server_id": server_id, "volume_id": v["id"], "device": "/dev/vda"}]
        addresses: dict[str, list[dict[str, Any]]] = {}
        for port in ports:
            net_name = self.networks[port["network_id"]]["name"]
            for ip in port["fixed_ips"]:
                addresses.setdefault(net_name, []).append(
                    {"addr": ip["ip_address"], "version": 4, "OS-EXT-IPS:type": "fixed"}
                )
        server = {
            "id": server_id,
            "name": spec.get("name", ""),
            "status": "BUILD",
            "tenant_id": project,
            "user_id": "",
            "metadata": dict(spec.get("metadata") or {}),
            "flavor": {"id": flavor["id"], "links": []},
            "image": {"id": image_ref, "links": []} if image_ref else "",
            "key_name": key,
            "security_groups": groups,
            "addresses": addresses,
            "OS-EXT-AZ:availability_zone": zone,
            "os-extended-volumes:volumes_attached": [{"id": v["id"]} for v in volumes],
            "created": now(),
            "updated": now(),
            "hostId": "",
            "progress": 0,
            "links": [{"rel": "self", "href": f"{self.url}/compute/v2.1/servers/{server_id}"}],
            "OS-EXT-STS:vm_state": "building",
            "OS-EXT-STS:task_state": "scheduling",
            "OS-EXT-STS:power_state": 0,
            "_ports": [p["id"] for p in ports],
        }
        self.servers[server_id] = server
        return {
            "id": server_id,
            "links": server["links"],
            "adminPass": "x",
            "security_groups": groups,
            "OS-DCF:diskConfig": "MANUAL",
        }

    def _advance(self, server: dict[str, Any]) -> None:
        """BUILD becomes ACTIVE (or ERROR on ``x1.nohost``; ``x1.slow`` stays) once looked at."""
        if server["status"] != "BUILD" or server["flavor"]["id"] == "91":
            return
        if server["flavor"]["id"] == "90":
            server.update(
                {
                    "status": "ERROR",
                    "OS-EXT-STS:vm_state": "error",
                    "OS-EXT-STS:task_state": None,
                    "fault": {"code": 500, "created": now(), "message": NO_VALID_HOST},
                }
            )
        else:
            server.update(
                {
                    "status": "ACTIVE",
                    "OS-EXT-STS:vm_state": "active",
                    "OS-EXT-STS:task_state": None,
                    "OS-EXT-STS:power_state": 1,
                    "progress": 100,
                }
            )
        server["updated"] = now()

    def _delete_server(self, server: dict[str, Any]) -> None:
        for port_id in server.pop("_ports", []):
            port = self.ports.get(port_id)
            if port is not None and port.get("_nova_created"):
                del self.ports[port_id]
            elif port is not None:
                port["device_id"] = ""
        for v in server["os-extended-volumes:volumes_attached"]:
            if v["id"] in self.volumes:
                self.volumes[v["id"]].update(status="available", attachments=[])
        del self.servers[server["id"]]

    # -- network -------------------------------------------------------------------------
    def _new_port(self, network: dict[str, Any], name: str, ip: str, device_id: str) -> dict[str, Any]:
        subnet = self.subnets[network["subnets"][0]]
        port_id = str(uuid.uuid4())
        port = {
            "id": port_id,
            "name": name,
            "network_id": network["id"],
            "device_id": device_id,
            "status": "ACTIVE",
            "mac_address": "fa:16:3e:00:00:01",
            "fixed_ips": [{"subnet_id": subnet["id"], "ip_address": ip}],
        }
        self.ports[port_id] = port
        return port

    def _port_for(self, network: dict[str, Any], fixed_ip: str | None, server_id: str) -> dict[str, Any]:
        subnet = self.subnets[network["subnets"][0]]
        cidr = ipaddress.ip_network(subnet["cidr"])
        taken = {ip["ip_address"] for p in self.ports.values() for ip in p["fixed_ips"]}
        if fixed_ip is not None:
            try:
                valid = ipaddress.ip_address(fixed_ip) in cidr
            except ValueError:
                valid = False
            if not valid:
                raise nova_error(400, f"Invalid fixed IP address ({fixed_ip})")
            if fixed_ip in taken:
                raise nova_error(409, f"Fixed IP address {fixed_ip} is already in use on instance.")
            ip = fixed_ip
        else:
            ip = next(str(h) for h in list(cidr.hosts())[9:] if str(h) not in taken)
        port = self._new_port(network, "", ip, server_id)
        port["_nova_created"] = True
        return port

    def _network(self, method: str, route: str, query: dict[str, str]) -> tuple[int, Any]:
        collections = {
            "networks": self.networks,
            "subnets": self.subnets,
            "ports": self.ports,
            "security-groups": self.security_groups,
        }
        m = re.fullmatch(r"/([a-z-]+)(?:/([^/]+))?", route)
        if method != "GET" or not m or m.group(1) not in collections:
            raise neutron_error(404, "HTTPNotFound", f"The resource could not be found: {method} {route}")
        kind, ident = m.group(1), m.group(2)
        key = kind.replace("-", "_")
        if ident is not None:
            item = collections[kind].get(ident)
            if item is None:
                what = {"networks": "Network", "subnets": "Subnet", "ports": "Port"}.get(kind, "Security group")
                raise neutron_error(404, f"{what.replace(' ', '')}NotFound", f"{what} {ident} could not be found.")
            return 200, {key[:-1]: public(item)}
        items = [i for i in collections[kind].values() if all(str(i.get(k)) == v for k, v in query.items() if k in i)]
        return 200, {key: [public(i) for i in items]}

    # -- volume --------------------------------------------------------------------------
    def _volume(
        self,
        method: str,
        route: str,
        query: dict[str, str],
        body: dict[str, Any],
        project: str,
        headers: dict[str, str],
    ) -> tuple[int, Any]:
        if method == "POST" and route == "/volumes":
            return 202, {"volume": self._create_volume(body.get("volume") or {}, project, headers)}
        if method == "GET" and route in ("/volumes", "/volumes/detail"):
            found = [v for v in self.volumes.values() if v["_project"] == project]
            if "name" in query:
                found = [v for v in found if v["name"] == query["name"]]
            for v in found:
                self._advance_volume(v)
            return 200, {"volumes": [public(v) for v in found]}
        m = re.fullmatch(r"/volumes/([^/]+)", route)
        if m:
            volume = self.volumes.get(m.group(1))
            if volume is None or volume["_project"] != project:
                raise cinder_error(404, f"Volume {m.group(1)} could not be found.")
            if method == "GET":
                self._advance_volume(volume)
                return 200, {"volume": public(volume)}
            if method == "DELETE":
                if volume["status"] == "in-use":
                    raise cinder_error(
                        400,
                        "Invalid volume: Volume status must be available or error or "
                        "error_restoring or error_extending or error_managing and must not be "
                        "migrating, attached, belong to a group, have snapshots or be "
                        "disassociated from snapshots after volume transfer.",
                    )
                del self.volumes[volume["id"]]
                return 202, None
        raise cinder_error(404, f"no such block-storage resource {method} {route}")

    def _create_volume(self, spec: dict[str, Any], project: str, headers: dict[str, str]) -> dict[str, Any]:
        size = int(spec.get("size") or 0)
        used = sum(v["size"] for v in self.volumes.values() if v["_project"] == project)
        if used + size > QUOTA_GIGABYTES:
            raise cinder_error(
                413,
                f"VolumeSizeExceedsAvailableQuota: Requested volume or snapshot exceeds allowed "
                f"gigabytes quota. Requested {size}G, quota is {QUOTA_GIGABYTES}G and {used}G "
                f"has been consumed.",
            )
        zone = spec.get("availability_zone") or "nova"
        if zone not in ZONES:
            raise cinder_error(400, f"Invalid input received: Availability zone '{zone}' is invalid.")
        image_meta: dict[str, Any] = {}
        if spec.get("imageRef"):
            image = self._glance_image(spec["imageRef"], headers)
            if image is None:
                raise cinder_error(404, f"Image {spec['imageRef']} could not be found.")
            needed = max(
                -(-int(image.get("virtual_size") or image.get("size") or 0) // GiB), image.get("min_disk") or 0
            )
            if size < needed:
                raise cinder_error(
                    400,
                    f"Invalid input received: Size of specified image {needed}GB is larger than volume size {size}GB.",
                )
            image_meta = {"image_id": image["id"], "image_name": image.get("name", "")}
        volume_id = str(uuid.uuid4())
        volume = {
            "id": volume_id,
            "name": spec.get("name", ""),
            "size": size,
            "status": "creating",
            "availability_zone": zone,
            "metadata": dict(spec.get("metadata") or {}),
            "attachments": [],
            "bootable": "true" if image_meta else "false",
            "volume_image_metadata": image_meta,
            "created_at": now(),
            "volume_type": "__DEFAULT__",
            "_project": project,
        }
        self.volumes[volume_id] = volume
        return public(volume)

    def _advance_volume(self, volume: dict[str, Any]) -> None:
        if volume["status"] == "creating":
            volume["status"] = "available"

    # -- for the tests -------------------------------------------------------------------
    def state(self) -> dict[str, list[dict[str, Any]]]:
        """Copies of the servers, volumes and ports that exist now."""
        with self.lock:
            return {
                "servers": [dict(s) for s in self.servers.values()],
                "volumes": [dict(v) for v in self.volumes.values()],
                "ports": [dict(p) for p in self.ports.values()],
            }
