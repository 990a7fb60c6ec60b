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
"""

from __future__ import annotations

import os
import pwd
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
