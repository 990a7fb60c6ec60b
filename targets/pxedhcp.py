"""Proxy DHCP for a real network: lifeboat's own dnsmasq tells PXE clients where to boot from
while the site's DHCP server keeps handing out the addresses (nothing to change on it).

With the pxe settings' ``dhcp: {mode: proxy, subnet: ..., interface: ...}`` the driver runs
``dnsmasq --port=0`` (no DNS) with ``dhcp-range=SUBNET,proxy``: it answers only the PXE part of a
DHCP exchange, on that subnet. A client whose ROM is iPXE (it sends user class ``iPXE`` / option
175) is given lifeboat's ``HTTP_URL/boot.ipxe`` as its boot file; with ``first_stage`` (an iPXE
built for chainloading, e.g. Debian ``ipxe``'s ``/usr/lib/ipxe/undionly.kpxe``) a plain PXE ROM is
first given that file over dnsmasq's TFTP, which then asks again as iPXE and gets the script.
``bind-interfaces`` lets it share port 67 with another DHCP server on the same host (the tests' libvirt
network's dnsmasq gives the addresses there). One process per run, recorded before it starts,
stopped with the run (and once the restore is written).

A proxy offer can lose: a PXE ROM takes the first offer with an address once it has waited long
enough for proxy offers (Debian's iPXE: 2 s from its first DHCPDISCOVER), and a site's DHCP server
answers a client whose lease it knows at once. A switch port that drops the server's frames for a
few seconds after each link-up (spanning tree without portfast / edge port: the ROM's first
requests are lost) uses those 2 s up, and the site's offer, arriving first, wins every time: the
server gets its address and nothing to boot. ``missed_offers`` tells that case apart in the error.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
from pathlib import Path
from typing import Any

DNSMASQ = "/usr/sbin/dnsmasq"
FIRST_STAGE = "undionly.kpxe"  # its name under the TFTP root
MENU = "lifeboat recovery environment"


def dnsmasq_config(dhcp: dict[str, Any], boot_url: str, folder: Path) -> str:
    """dnsmasq's configuration file for ``dhcp`` (the pxe settings' ``dhcp``, mode ``proxy``):
    PXE answers on ``dhcp['subnet']`` pointing iPXE at ``boot_url``; TFTP from ``folder/tftp``
    when a ``first_stage`` is given; its log in ``folder``."""
    lines = [
        "port=0",
        f"interface={dhcp['interface']}",
        "bind-interfaces",
        f"dhcp-range={dhcp['subnet']},proxy",
        "dhcp-userclass=set:ipxe,iPXE",
        "dhcp-match=set:ipxe,175",
        f"dhcp-boot=tag:ipxe,{boot_url}",
        f'pxe-service=tag:ipxe,x86PC,"{MENU}",{boot_url}',
        "log-dhcp",
        f"log-facility={folder / 'dnsmasq.log'}",
        f"user={pwd.getpwuid(os.getuid()).pw_name}",  # it reads the TFTP root as the driver does
    ]
    if dhcp.get("first_stage"):
        lines += [
            "enable-tftp",
            f"tftp-root={folder / 'tftp'}",
            f'pxe-service=tag:!ipxe,x86PC,"{MENU}",{FIRST_STAGE}',
        ]
    return "".join(line + "\n" for line in lines)


def dnsmasq_command(config: Path) -> list[str]:
    """The command line: in the foreground (its pid is the process's), only ``config`` read."""
    return [DNSMASQ, "--keep-in-foreground", f"--conf-file={config}", f"--pid-file={config.with_suffix('.pid')}"]


def write_files(dhcp: dict[str, Any], boot_url: str, folder: Path, name: str) -> Path:
    """The configuration file ``folder/name`` and the TFTP root with the first stage; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    if dhcp.get("first_stage"):
        (folder / "tftp").mkdir(exist_ok=True)
        shutil.copyfile(dhcp["first_stage"], folder / "tftp" / FIRST_STAGE)
    config = folder / name
    config.write_text(dnsmasq_config(dhcp, boot_url, folder))
    return config


def missed_offers(folder: Path, mac: str | None) -> str:
    """Why a server that never fetched its script may not have, from dnsmasq's log in ``folder``:
    how many proxy offers went to ``mac`` (to any PXE client without one), and what that means."""
    try:
        text = (folder / "dnsmasq.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""
    pattern = r" PXE\([^)]*\) (\S+) proxy$"
    offers = [m for m in re.findall(pattern, text, re.MULTILINE) if not mac or m.lower() == mac.lower()]
    who = mac or "any PXE client"
    if not offers:
        return f"; lifeboat's proxy DHCP never heard a PXE request from {who} (check dhcp.interface and dhcp.subnet)"
    return (
        f"; lifeboat's proxy DHCP answered {who} {len(offers)} time(s), yet its PXE ROM never asked for the boot "
        "file: it took the site's DHCP offer without waiting for lifeboat's (iPXE waits 2 s from its first "
        "request; a switch port that drops frames after link-up, spanning tree without portfast/edge port, "
        "uses them up)"
    )
