"""A client of the QEMU guest agent protocol (``qemu-ga``): run a command in a guest.

Used by the ``qemu`` driver over the guest agent's virtio-serial channel, which QEMU exposes as a
Unix socket on the host. The protocol is QMP-like JSON, one document per line, with no greeting;
``guest-sync`` with a random id flushes anything stale on the channel first. ``guest_exec`` (run
and wait for a command) also serves the ``kvm`` driver, whose channel libvirt owns.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from lifeboat.targets.base import ExecResult, TargetError


class GuestAgent:
    """One connection to a guest agent socket."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise TargetError(f"guest agent socket {path}: {e}") from None
        self._buf = b""

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, execute: str, arguments: dict[str, Any] | None = None) -> None:
        doc: dict[str, Any] = {"execute": execute}
        if arguments:
            doc["arguments"] = arguments
        self.sock.sendall(json.dumps(doc).encode() + b"\n")

    def _recv(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise TargetError(
                    "the guest agent did not answer (is qemu-guest-agent running in the guest?)"
                ) from None
            if not data:
                raise TargetError("the guest agent closed the connection")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        doc: dict[str, Any] = json.loads(line.lstrip(b"\xff").decode() or "{}")
        return doc

    def call(self, execute: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one agent command and return its ``return`` value."""
        self._send(execute, arguments)
        doc = self._recv()
        if "error" in doc:
            raise TargetError(f"guest agent {execute}: {doc['error'].get('desc', doc['error'])}")
        return doc.get("return")

    def sync(self) -> None:
        """Discard stale replies: send ``guest-sync`` and read until its id comes back."""
        token = secrets.randbelow(2**31)
        self._send("guest-sync", {"id": token})
        while True:
            if self._recv().get("return") == token:
                return

    def exec(self, argv: list[str], timeout: float) -> ExecResult:
        """Run ``argv`` in the guest and wait for it (``guest-exec`` + ``guest-exec-status``)."""
        self.sync()
        return guest_exec(self.call, argv, timeout)


def guest_exec(call: Callable[[str, dict[str, Any]], Any], argv: list[str], timeout: float) -> ExecResult:
    """Run ``argv`` in the guest with ``guest-exec`` and poll ``guest-exec-status`` until it exits;
    ``call(execute, arguments)`` runs one agent command and returns its ``return`` value."""
    pid = call("guest-exec", {"path": argv[0], "arg": argv[1:], "capture-output": True})["pid"]
    deadline = time.monotonic() + timeout
    while True:
        status = call("guest-exec-status", {"pid": pid})
        if status.get("exited"):
            out = base64.b64decode(status.get("out-data", "")) + base64.b64decode(status.get("err-data", ""))
            return ExecResult(int(status.get("exitcode", -1)), out.decode("utf-8", errors="replace"))
        if time.monotonic() > deadline:
            raise TargetError(f"command {argv!r} in the guest did not finish in {timeout:.0f} s")
        time.sleep(0.2)
