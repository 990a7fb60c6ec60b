"""The pxe target's proxy DHCP (``targets/pxedhcp.py``) without a network: the dnsmasq configuration
it generates (checked by dnsmasq itself with ``--test``), the settings the schema refuses, and a
dnsmasq that cannot start (an interface the host lacks). That
it really answers a PXE client is proved by the driver suite's pxe lifecycle, whose libvirt network
gives only addresses (``tests/targets/pxeserver.py``)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from lifeboat.plumbing.proc import process_matches
from lifeboat.targets import TARGETS, pxedhcp
from lifeboat.targets.base import Disk, Guest, MemoryLog, NetworkSpec, TargetContext, TargetError
from tests.targets.pxeserver import free_port

URL = "http://10.0.1.5:8080/boot.ipxe"
BASE: dict[str, Any] = {"bmc": {"address": "https://10.0.9.30"}, "http_url": "http://10.0.1.5:8080"}


def lines(text: str) -> list[str]:
    return text.splitlines()


def dnsmasq_accepts(config: Path) -> subprocess.CompletedProcess[str]:
    """dnsmasq's own syntax check of the file, as the driver would start it."""
    return subprocess.run([*pxedhcp.dnsmasq_command(config), "--test"], capture_output=True, text=True)


def test_proxy_dhcp_points_ipxe_at_the_script_and_answers_only_pxe_on_the_interface(tmp_path: Path) -> None:
    dhcp = {"mode": "proxy", "interface": "eth1", "subnet": "10.0.1.0"}
    config = pxedhcp.write_files(dhcp, URL, tmp_path, "dnsmasq-TOKEN.conf")
    got = lines(config.read_text())
    for line in (
        "port=0",  # no DNS
        "interface=eth1",
        "bind-interfaces",  # port 67 shared with a DHCP server on the same host
        "dhcp-range=10.0.1.0,proxy",  # PXE answers only: the site's DHCP gives the addresses
        "dhcp-userclass=set:ipxe,iPXE",
        "dhcp-match=set:ipxe,175",
        f"dhcp-boot=tag:ipxe,{URL}",
        f"log-facility={tmp_path / 'dnsmasq.log'}",
    ):
        assert line in got, line
    assert not any(line.startswith(("enable-tftp", "tftp-root", "dhcp-range=10.0.1.0,10")) for line in got)
    assert not (tmp_path / "tftp").exists()
    cmd = pxedhcp.dnsmasq_command(config)
    assert cmd[0] == pxedhcp.DNSMASQ and "--keep-in-foreground" in cmd and f"--conf-file={config}" in cmd
    assert "TOKEN" in " ".join(cmd)  # teardown recognises the process by the run's token
    done = dnsmasq_accepts(config)
    assert done.returncode == 0, done.stderr


def test_a_first_stage_is_served_over_tftp_to_a_rom_that_is_not_ipxe(tmp_path: Path) -> None:
    first = tmp_path / "undionly.kpxe"
    first.write_bytes(b"\x00" * 512)
    dhcp = {"mode": "proxy", "interface": "eth1", "subnet": "10.0.1.0", "first_stage": str(first)}
    config = pxedhcp.write_files(dhcp, URL, tmp_path / "dhcp", "dnsmasq-TOKEN.conf")
    got = lines(config.read_text())
    assert "enable-tftp" in got and f"tftp-root={tmp_path / 'dhcp' / 'tftp'}" in got
    assert f'pxe-service=tag:!ipxe,x86PC,"{pxedhcp.MENU}",undionly.kpxe' in got
    assert f"dhcp-boot=tag:ipxe,{URL}" in got  # the first stage, now iPXE, asks again and gets the script
    assert (tmp_path / "dhcp" / "tftp" / "undionly.kpxe").read_bytes() == first.read_bytes()
    done = dnsmasq_accepts(config)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("dhcp", "words"),
    [
        ({"mode": "proxy", "subnet": "10.0.1.0"}, "interface"),
        ({"mode": "proxy", "interface": "eth1"}, "subnet"),
        ({"mode": "proxy", "interface": "eth1", "subnet": "10.0.1.0/24"}, "10.0.1.0/24"),
        ({"mode": "proxy", "interface": "eth1", "subnet": "300.0.1.0"}, "300.0.1.0"),
        ({"mode": "proxy", "interface": "eth1; reboot", "subnet": "10.0.1.0"}, "eth1; reboot"),
        ({"mode": "proxy", "interface": "eth1", "subnet": "10.0.1.0", "first_stage": "undionly.kpxe"}, "undionly"),
        ({"mode": "dhcp"}, "dhcp"),
        ({"mode": "none", "subnet": "10.0.1.0"}, "dhcp"),
        ({"mode": "proxy", "interface": "eth1", "subnet": "10.0.1.0", "range": "x"}, "range"),
        ("proxy", "proxy"),
    ],
)
def test_bad_dhcp_settings_are_refused_by_the_schema(dhcp: Any, words: str) -> None:
    with pytest.raises(TargetError, match="dhcp") as e:
        TARGETS.get("pxe")({**BASE, "dhcp": dhcp}, TargetContext())
    assert words in str(e.value)


def test_good_dhcp_settings_and_a_missing_first_stage(tmp_path: Path) -> None:
    cls = TARGETS.get("pxe")
    for dhcp in ({"mode": "none"}, {"mode": "proxy", "interface": "lbpxe0", "subnet": "10.214.0.0"}):
        assert cls({**BASE, "dhcp": dhcp}, TargetContext()).settings["dhcp"] == dhcp
    missing = str(tmp_path / "undionly.kpxe")
    target = cls(
        {**BASE, "dhcp": {"mode": "proxy", "interface": "eth1", "subnet": "10.0.1.0", "first_stage": missing}},
        TargetContext(),
    )
    with pytest.raises(TargetError, match=f"dhcp.first_stage {missing} is not a file"):
        target.prepare()


def test_a_dnsmasq_that_cannot_start_is_a_clear_error_and_teardown_releases_the_rest(tmp_path: Path) -> None:
    """An interface the host lacks: dnsmasq exits at once; the error names it and dnsmasq's words,
    and teardown stops the HTTP server and removes the files (the process was recorded first)."""
    image = tmp_path / "point.raw"
    with open(image, "wb") as f:
        f.truncate(4 * 1024 * 1024)
    settings = {
        **BASE,
        "http_listen": f"127.0.0.1:{free_port()}",
        "dhcp": {"mode": "proxy", "interface": "lbnosuch0", "subnet": "10.9.0.0"},
    }
    settings.pop("http_url")
    target = TARGETS.get("pxe")(settings, TargetContext())
    guest = Guest("srv", "20260101T000000-dhcpfail", tmp_path / "work", NetworkSpec("none"))
    log = MemoryLog("pxe")
    with pytest.raises(TargetError) as e:
        target.provision(guest, Disk(size=image.stat().st_size, image_path=image, image_format="raw"), log)
    assert "dnsmasq (proxy DHCP on lbnosuch0, 10.9.0.0) did not start" in str(e.value)
    assert "unknown interface lbnosuch0" in str(e.value)
    assert [r.ident for r in log.resources() if r.kind == "process"] == ["pxeserve", "dnsmasq"]
    http_pid = next(int(r.data["pid"]) for r in log.resources() if r.ident == "pxeserve")
    target.teardown(log)
    assert log.resources() == [] and not (tmp_path / "work" / "pxe").exists()
    assert not process_matches(http_pid, guest.token)


# dnsmasq's own lines (log-dhcp) for a proxy offer to an iPXE ROM, as logged on the test network
OFFER_LOG = """Nov 30 06:09:59 dnsmasq-dhcp[28899]: DHCP, proxy on subnet 10.214.0.0
Nov 30 06:10:08 dnsmasq-dhcp[28899]: 577164089 vendor class: PXEClient:Arch:00000:UNDI:002001
Nov 30 06:10:08 dnsmasq-dhcp[28899]: 577164089 user class: iPXE
Nov 30 06:10:08 dnsmasq-dhcp[28899]: 577164089 PXE(lbpxe0) 52:54:00:4c:42:01 proxy
Nov 30 06:10:08 dnsmasq-dhcp[28899]: 577164089 bootfile name: http://10.214.0.1:42973/boot.ipxe
"""


def test_a_server_that_never_netbooted_is_told_apart_by_what_the_proxy_dhcp_heard(tmp_path: Path) -> None:
    """The netboot timeout's message says whether lifeboat's proxy DHCP answered the server (its ROM
    then took the site's offer without waiting for lifeboat's) or never heard it (wrong interface
    or subnet)."""
    assert pxedhcp.missed_offers(tmp_path, "52:54:00:4c:42:01") == ""  # no dnsmasq ran
    (tmp_path / "dnsmasq.log").write_text(OFFER_LOG * 2)
    said = pxedhcp.missed_offers(tmp_path, "52:54:00:4C:42:01")
    assert "answered 52:54:00:4C:42:01 2 time(s), yet its PXE ROM never asked for the boot file" in said
    assert "spanning tree without portfast" in said
    assert "answered any PXE client 2 time(s)" in pxedhcp.missed_offers(tmp_path, None)
    said = pxedhcp.missed_offers(tmp_path, "52:54:00:00:00:99")
    assert "never heard a PXE request from 52:54:00:00:00:99 (check dhcp.interface and dhcp.subnet)" in said
