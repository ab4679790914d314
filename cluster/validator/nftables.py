"""The admitted-only firewall with nftables (``firewall = "nftables"``): one table of its own,
``inet <firewall_table>``, rebuilt whole on every sync in a single ``nft -f`` transaction:

    table inet rayhorde {
        set admitted4 { type ipv4_addr; elements = { ... } }
        set admitted6 { type ipv6_addr; elements = { ... } }
        chain ray_ports {
            type filter hook input priority -10; policy accept;
            iifname "lo" accept
            ip saddr @admitted4 accept
            ip6 saddr @admitted6 accept
            tcp dport <ray_port_base>-<+63> drop
        }
    }

No connection-tracking exception: a removed address loses its established connections too.
validator-core needs CAP_NET_ADMIN for ``nft`` (root, or ``AmbientCapabilities=CAP_NET_ADMIN``).
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess
from collections.abc import Iterable

from cluster.errors import ConfigError, ExternalError
from cluster.validator.firewall import Firewall, FirewallFeature

log = logging.getLogger("rayhorde.validator")


class NftablesFirewall(Firewall):
    features = frozenset({FirewallFeature.FILTERS})

    def __init__(self, ports: range, *, table: str = "rayhorde", nft: str | None = None) -> None:
        self.nft = nft or shutil.which("nft")
        if not self.nft:
            raise ConfigError('firewall = "nftables" but the nft command is not installed: apt install nftables '
                              '(or set firewall = "none" and filter the Ray ports some other way)')
        if ports.step != 1 or not ports:
            raise ValueError(f"protected ports must be a contiguous, non-empty range, not {ports}")
        self.ports = ports
        self.table = table

    def script(self, addresses: Iterable[str]) -> str:
        v4: list[str] = []
        v6: list[str] = []
        for a in sorted(set(addresses)):
            ip = ipaddress.ip_address(a)  # refuses anything but an address: it goes into a script
            if ip.version == 6 and ip.ipv4_mapped:  # ::ffff:a.b.c.d from a dual-stack socket
                ip = ip.ipv4_mapped
            (v4 if ip.version == 4 else v6).append(str(ip))

        def elements(xs: list[str]) -> str:
            return f" elements = {{ {', '.join(xs)} }};" if xs else ""

        t = f"inet {self.table}"
        return (f"table {t} {{}}\ndelete table {t}\n"
                f"table {t} {{\n"
                f"  set admitted4 {{ type ipv4_addr;{elements(v4)} }}\n"
                f"  set admitted6 {{ type ipv6_addr;{elements(v6)} }}\n"
                f"  chain ray_ports {{\n"
                f"    type filter hook input priority -10; policy accept;\n"
                f"    iifname \"lo\" accept\n"
                f"    ip saddr @admitted4 accept\n"
                f"    ip6 saddr @admitted6 accept\n"
                f"    tcp dport {self.ports.start}-{self.ports.stop - 1} drop\n"
                f"  }}\n}}\n")

    def sync(self, addresses: Iterable[str]) -> None:
        script = self.script(addresses)
        out = subprocess.run([self.nft, "-f", "-"], input=script, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise ExternalError(f"nft refused the firewall rules ({out.stderr.strip()[:300]}); validator-core needs "
                                "CAP_NET_ADMIN")
        log.info("firewall: Ray ports %d-%d open to %s", self.ports.start, self.ports.stop - 1,
                 sorted(set(addresses)) or "loopback only")
