"""An emulated, rate-limited interconnect between local ranks (Linux network namespaces + tc).

On a small CPU box compute is about a thousand times slower than on an H100 while loopback
moves hundreds of MB/s, so raw CPU timings hide communication. :class:`EmulatedLink` slows
the network down instead: every rank becomes its own "host" in a network namespace, joined to
the others through a bridge, and each host's uplink is rate-limited with a token bucket
(``tc qdisc ... tbf``). :mod:`dsp.bench.calibrate` picks the rate so that the CPU's
compute-to-bandwidth ratio matches a target machine.

Topology (``P`` = ``prefix-<pid>-<seq>``, one per link; ``i`` = rank)::

    namespace P-hub          bridge "br0", ports "p0" .. "p{N-1}" (no addresses)
    namespace P-r{i}         "lo" up, veth "veth{i}" = 10.213.0.{i+1}/24 (default subnet),
                             egress qdisc "tbf rate R burst B limit 256mb";
                             its peer "p{i}" is a port of the hub's bridge

Every interface is created directly inside the namespaces made here (``ip -n NS link add
... peer ... netns HUB``), so nothing ever appears in, or routes from, the root namespace, and
the only traffic on the subnet is between these namespaces. Two links alive at the same time
(even with the same subnet) cannot see each other: each has its own bridge.

Rate limiting is on the egress of the rank-side veth, so each rank's *sent* bytes (all its
peers together) are limited to ``R``; received bytes are limited by the senders' buckets.
The queue limit must be large: a short queue makes tbf drop, TCP stalls on retransmission
timeouts and gloo reports a timed-out connection. The bucket ``B`` defaults to
:func:`auto_burst` (2 ms at the rate, at least 64 KiB); a 1 MB bucket also works but lets the
first megabyte of every transfer after a pause pass at full speed, so small messages would see
a faster link than large ones. The achieved all-to-all bandwidth is below the configured rate
(gloo's all-to-all is largely half-duplex per pair of ranks on a slow link: a receiver's
"ready" message waits behind its own outgoing data; plus TCP/IP headers), so
:mod:`dsp.bench.calibrate` measures it and corrects the rate.

Cleanup: on exit from the ``with`` block, on an exception, on Ctrl-C (SIGINT) and on SIGTERM
(handlers installed for the lifetime of the block and restored afterwards), and at
interpreter exit (``atexit``) every namespace of the link is deleted, which destroys the
veths and the bridge with it. When the owner dies without any of that (``SIGKILL``), a
watchdog process it started (in its own session, reading a pipe only the owner holds) sees
the pipe close, kills any process still inside the namespaces and deletes them. At start,
namespaces named ``prefix-<pid>-...`` whose process ``pid`` no longer exists (left by a
killed earlier run), or named ``prefix-...`` without a process id, are deleted, and the
processes still inside them are killed first. Links owned by live processes are left alone
(a dead run's pid reused by a live process would keep its namespaces until that process
ends; they are inert).

Requires root (``CAP_NET_ADMIN`` and ``CAP_SYS_ADMIN``) and the ``ip``/``tc`` tools of
iproute2; :func:`netns_available` says whether this works here and why not.
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
import warnings
from typing import Callable, List, Optional, Tuple, Union

__all__ = [
    "EmulatedLink",
    "LinkError",
    "netns_available",
    "list_namespaces",
    "tbf_rate",
    "auto_burst",
    "format_rate",
]

#: Directory where ``ip netns`` keeps the namespace handles (bind mounts).
NETNS_DIR = "/run/netns" if os.path.isdir("/run/netns") else "/var/run/netns"

_seq = itertools.count()
_probe_cache: Optional[Tuple[bool, str]] = None


class LinkError(RuntimeError):
    """An ``ip``/``tc`` command failed while building or changing an emulated link."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run one iproute2 command; raise :class:`LinkError` with its stderr when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise LinkError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def list_namespaces() -> List[str]:
    """Names of all named network namespaces (``ip netns list``), or ``[]`` without ``ip``."""
    if shutil.which("ip") is None:
        return []
    out = _run("ip", "netns", "list", check=False).stdout
    # lines look like "name" or "name (id: 3)"
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_available() -> Tuple[bool, str]:
    """Whether :class:`EmulatedLink` can work here, and if not, why (one line).

    Checks that we are root, that ``ip`` and ``tc`` exist, and that a throwaway namespace
    with a veth pair and a ``tbf`` qdisc can really be created and deleted. The answer is
    cached for the process (a positive one only: a failure is re-checked next time).
    """
    global _probe_cache
    if _probe_cache is not None:
        return _probe_cache
    if not hasattr(os, "geteuid") or os.name != "posix":
        return False, "network namespaces need Linux"
    if os.geteuid() != 0:
        return False, f"not root (euid {os.geteuid()}); network namespaces and tc need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` (iproute2) is not installed"
    ns = f"dspprobe-{os.getpid()}-{next(_seq)}"
    try:
        _run("ip", "netns", "add", ns)
        try:
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "add", "name", "pa", "type", "veth", "peer", "name", "pb")
            _run("tc", "-n", ns, "qdisc", "add", "dev", "pa", "root", "tbf", "rate", "8mbit",
                 "burst", "1mb", "limit", "256mb")  # fmt: skip
        finally:
            _run("ip", "netns", "del", ns, check=False)
    except (LinkError, OSError, subprocess.SubprocessError) as e:
        return False, f"cannot create a network namespace with a veth and tbf: {e}"
    _probe_cache = (True, "ok")
    return _probe_cache


def tbf_rate(rate_bytes_per_s: float) -> str:
    """A rate in bytes/s as a ``tc`` rate argument in bits (``"8000000bit"``).

    ``tc`` reads ``bit`` as bits per second (its ``bps`` would be bytes per second, a
    classic trap); integers in bits are exact from ~1 kB/s to beyond 10 GB/s (tc and the
    kernel use 64-bit rates).
    """
    if not rate_bytes_per_s > 0:
        raise ValueError(f"EmulatedLink: rate must be > 0 bytes/s, got {rate_bytes_per_s}")
    return f"{max(8, int(round(rate_bytes_per_s * 8)))}bit"


def format_rate(rate_bytes_per_s: Optional[float]) -> str:
    """Human-readable bytes/s (``"25.0 MB/s"``); decimal units; ``"-"`` for ``None``."""
    if rate_bytes_per_s is None:
        return "-"
    for unit, f in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if rate_bytes_per_s >= f:
            return f"{rate_bytes_per_s / f:.1f} {unit}"
    return f"{rate_bytes_per_s:.0f} B/s"


def auto_burst(rate_bytes_per_s: float) -> int:
    """Default tbf bucket in bytes: 2 ms at the rate, at least 64 KiB.

    A transfer of ``M`` bytes after an idle pause takes about ``(M - burst) / rate``: the
    bucket is a head start of ``burst / rate``, 2 ms (16 ms at 4 MB/s, where the floor
    applies), small next to the transfers a benchmark times, so the emulated bandwidth hardly
    depends on the message size. The floor keeps the kernel from waking up for every packet.
    Tested without stalls from 1 MB/s to 1 GB/s with 2 and 4 ranks; a 1 MB bucket, by
    contrast, lets a 2 MB all-to-all at 2 MB/s finish in half the time it should take.
    """
    return int(max(64 * 1024, rate_bytes_per_s * 2e-3))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(name: str, prefix: str) -> bool:
    """Whether namespace ``name`` belongs to ``prefix`` and to no live process."""
    if not name.startswith(prefix + "-"):
        return False
    field = name[len(prefix) + 1 :].split("-", 1)[0]
    if not field.isdigit():
        return True
    pid = int(field)
    return pid != os.getpid() and not _pid_alive(pid)


def _kill_inside(name: str) -> List[int]:
    """``SIGKILL`` every process inside namespace ``name`` (``ip netns pids``); their pids."""
    out = _run("ip", "netns", "pids", name, check=False).stdout.split()
    killed = []
    for pid in (int(p) for p in out if p.isdigit()):
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return killed


#: The watchdog: blocks on its stdin (a pipe whose write end only the owner holds); at EOF,
#: i.e. when the owner closes it or dies however it dies, it empties and deletes the
#: namespaces named on its command line (ranks first, the hub last). Nothing to do if the
#: owner already deleted them.
_WATCHDOG = r"""
import os, signal, subprocess, sys
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
sys.stdin.buffer.read()
for name in sys.argv[1:]:
    if not os.path.exists(os.path.join(os.environ["DSP_NETNS_DIR"], name)):
        continue
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    for pid in pids.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ValueError, OSError):
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
"""


def _delete(name: str) -> None:
    """``ip netns del name``, retried once; warn (never raise) if the name survives."""
    for attempt in range(2):
        proc = _run("ip", "netns", "del", name, check=False)
        if not os.path.exists(os.path.join(NETNS_DIR, name)):
            return
        time.sleep(0.1 * (attempt + 1))
    warnings.warn(
        f"EmulatedLink: could not delete network namespace {name!r}: {proc.stderr.strip()} "
        f"(remove it with `ip netns del {name}`)",
        RuntimeWarning,
        stacklevel=3,
    )


def _size(v: Union[int, str]) -> str:
    """A tc size argument: ints are bytes, strings go through (``"1mb"``)."""
    return f"{int(v)}b" if isinstance(v, int) else str(v)


class EmulatedLink:
    """``world_size`` hosts in network namespaces, joined by a bridge, each uplink rate-limited.

    Args:
        world_size: number of ranks (hosts); at most the number of host addresses in
            ``subnet`` (253 for a /24).
        rate_bytes_per_s: each rank's egress rate in bytes/s (1 MB/s .. 10 GB/s are fine).
        prefix: namespace name prefix; stale namespaces with it are removed at start. Keep it
            short and free of ``-`` inside (a name is ``prefix-<pid>-<seq>-r<i>``).
        subnet: private IPv4 subnet for the rank addresses; rank ``i`` gets host ``i+1``.
            It only exists inside these namespaces, so it cannot clash with real networks.
        burst: tbf bucket (int bytes, or a tc size string like ``"1mb"``); default
            :func:`auto_burst` of the rate, recomputed by :meth:`set_rate`.
        limit: tbf queue limit (int bytes or tc size string); keep it large (no drops).

    Attributes (valid inside the ``with`` block):
        namespaces: per rank, the namespace name (for ``RankPool(netns=...)``).
        addresses: per rank, the IPv4 address (``addresses[0]`` is the master address).
        ifnames: per rank, the interface name inside its namespace (``GLOO_SOCKET_IFNAME``).
        hub: the namespace holding the bridge.
        rate: the currently configured egress rate in bytes/s.

    Example::

        with EmulatedLink(2, 25e6) as link, RankPool(2, **link.pool_kwargs()) as pool:
            pool.run(fn)
    """

    def __init__(
        self,
        world_size: int,
        rate_bytes_per_s: float,
        *,
        prefix: str = "dspbench",
        subnet: str = "10.213.0.0/24",
        burst: Union[int, str, None] = None,
        limit: Union[int, str] = "256mb",
    ):
        if world_size < 1:
            raise ValueError(f"EmulatedLink: world_size must be >= 1, got {world_size}")
        if not prefix or "/" in prefix or not prefix.replace("_", "").isalnum():
            raise ValueError(
                f"EmulatedLink: prefix must be letters, digits and '_' only, got {prefix!r}"
            )
        tbf_rate(rate_bytes_per_s)  # validates
        net = ipaddress.ip_network(subnet)
        hosts = list(itertools.islice(net.hosts(), world_size))
        if len(hosts) < world_size:
            raise ValueError(f"EmulatedLink: subnet {subnet} has no room for {world_size} hosts")
        self.world_size = world_size
        self.rate = float(rate_bytes_per_s)
        self.prefix = prefix
        self.subnet = net
        self._burst = burst
        self.limit = _size(limit)
        base = f"{prefix}-{os.getpid()}-{next(_seq)}"
        self.hub = f"{base}-hub"
        self.namespaces = [f"{base}-r{r}" for r in range(world_size)]
        self.addresses = [str(h) for h in hosts]
        self.ifnames = [f"veth{r}" for r in range(world_size)]
        self._created: List[str] = []
        self._lock = threading.RLock()  # re-entrant: the signal handler may call close()
        self._owner = os.getpid()
        self._old_handlers: dict = {}
        self._watchdog: Optional[subprocess.Popen] = None
        self.removed_stale: List[str] = []

    # ---------------------------------------------------------------- set-up / tear-down
    def __enter__(self) -> EmulatedLink:
        ok, why = netns_available()
        if not ok:
            raise LinkError(f"EmulatedLink: network namespaces are not available: {why}")
        self._install_handlers()
        atexit.register(self.close)
        try:
            self.removed_stale = self.cleanup_stale(self.prefix)
            self._start_watchdog()
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        hub = self.hub
        self._add_ns(hub)
        _run("ip", "-n", hub, "link", "set", "lo", "up")
        _run("ip", "-n", hub, "link", "add", "name", "br0", "type", "bridge", "stp_state", "0")
        _run("ip", "-n", hub, "link", "set", "br0", "up")
        plen = self.subnet.prefixlen
        for r, (ns, addr, ifn) in enumerate(zip(self.namespaces, self.addresses, self.ifnames)):
            self._add_ns(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            # create the pair inside the rank's namespace with its peer directly in the hub
            veth = ["type", "veth", "peer", "name", f"p{r}", "netns", hub]
            _run("ip", "-n", ns, "link", "add", "name", ifn, *veth)
            _run("ip", "-n", hub, "link", "set", f"p{r}", "master", "br0")
            _run("ip", "-n", hub, "link", "set", f"p{r}", "up")
            _run("ip", "-n", ns, "addr", "add", f"{addr}/{plen}", "dev", ifn)
            _run("ip", "-n", ns, "link", "set", ifn, "up")
            self._qdisc("add", ns, ifn, self.rate)

    def _start_watchdog(self) -> None:
        """A process that deletes the namespaces if this one dies without closing the link."""
        import sys

        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, *self.namespaces, self.hub],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "DSP_NETNS_DIR": NETNS_DIR},
            start_new_session=True,  # Ctrl-C to our process group does not reach it
        )

    def _stop_watchdog(self) -> None:
        proc, self._watchdog = self._watchdog, None
        if proc is None:
            return
        try:
            proc.stdin.close()  # EOF: it checks (nothing left to delete) and exits
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        with self._lock:
            self._created.append(name)

    def burst_for(self, rate: float) -> str:
        """The tbf bucket for ``rate``: the ``burst`` given, else ``auto_burst(rate)``."""
        return _size(self._burst) if self._burst is not None else _size(auto_burst(rate))

    def _qdisc(self, verb: str, ns: str, ifn: str, rate: float) -> None:
        _run("tc", "-n", ns, "qdisc", verb, "dev", ifn, "root", "tbf", "rate", tbf_rate(rate),
             "burst", self.burst_for(rate), "limit", self.limit)  # fmt: skip

    def set_rate(self, rate_bytes_per_s: float) -> None:
        """Change every rank's egress rate in place (``tc qdisc change``); connections survive."""
        tbf_rate(rate_bytes_per_s)
        for ns, ifn in zip(self.namespaces, self.ifnames):
            self._qdisc("change", ns, ifn, rate_bytes_per_s)
        self.rate = float(rate_bytes_per_s)

    def close(self) -> None:
        """Delete every namespace this link made (idempotent); restore the signal handlers.

        Does nothing in a forked child (only the process that built the link removes it).
        Close the :class:`~dsp.launch.RankPool` on the link first (nested ``with`` blocks do).
        """
        if os.getpid() != self._owner:
            return
        old = {}
        if threading.current_thread() is threading.main_thread():
            # a second Ctrl-C must not interrupt the deletion half-way
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, signal.SIG_IGN)
        try:
            with self._lock:
                names, self._created = self._created, []
            for name in reversed(names):  # ranks first, the hub last
                _delete(name)
            self._stop_watchdog()
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
            self._restore_handlers()
            atexit.unregister(self.close)

    @staticmethod
    def cleanup_stale(prefix: str = "dspbench") -> List[str]:
        """Delete namespaces ``prefix-...`` left by dead processes; return their names."""
        gone = [n for n in list_namespaces() if _stale(n, prefix)]
        # rank namespaces before hubs, so veth peers vanish with their owners; processes
        # still inside (ranks of a killed run) first
        for name in sorted(gone, key=lambda n: n.endswith("-hub")):
            _kill_inside(name)
            _delete(name)
        return gone

    # ------------------------------------------------------------------------ signals
    def _install_handlers(self) -> None:
        """Turn SIGINT/SIGTERM into exceptions so ``__exit__`` runs (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def make(previous) -> Callable:
            def handler(signum, frame):
                # delete now (even if the exception below is swallowed), then behave like
                # ``previous`` and unwind: KeyboardInterrupt for SIGINT, SystemExit(143) for TERM
                self.close()  # also restores ``previous``
                if callable(previous):  # e.g. Python's default SIGINT handler: KeyboardInterrupt
                    previous(signum, frame)
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(128 + signum)

            return handler

        for sig in (signal.SIGINT, signal.SIGTERM):
            prev = signal.getsignal(sig)
            if prev is signal.SIG_IGN:
                continue  # an ignored signal stays ignored
            self._old_handlers[sig] = prev
            signal.signal(sig, make(prev))

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, h in self._old_handlers.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)
        self._old_handlers = {}

    # -------------------------------------------------------------------------- helpers
    def rank_env(self) -> List[dict]:
        """Per-rank environment for the workers: ``GLOO_SOCKET_IFNAME`` = the rank's veth.

        ``TORCH_CPP_LOG_LEVEL=ERROR`` hides c10d's "hostname of the client socket cannot be
        retrieved" warning, harmless here (the namespaces' addresses have no host names).
        """
        return [{"GLOO_SOCKET_IFNAME": ifn, "TORCH_CPP_LOG_LEVEL": "ERROR"} for ifn in self.ifnames]

    def pool_kwargs(self) -> dict:
        """Keyword arguments that put a :class:`dsp.launch.RankPool` on this link."""
        return {"netns": list(self.namespaces), "addr": self.addresses[0],
                "rank_env": self.rank_env()}  # fmt: skip

    def qdisc_stats(self) -> List[str]:
        """``tc -s qdisc show`` of each rank's veth (sent bytes, drops, overlimits)."""
        return [
            _run("tc", "-n", ns, "-s", "qdisc", "show", "dev", ifn, check=False).stdout
            for ns, ifn in zip(self.namespaces, self.ifnames)
        ]

    def __repr__(self) -> str:
        return (
            f"EmulatedLink(world_size={self.world_size}, rate={format_rate(self.rate)}, "
            f"namespaces={self.namespaces}, addresses={self.addresses})"
        )
