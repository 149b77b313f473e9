"""The soak's fault table: each fault breaks one thing the way the world does, then puts the
world back (the "supervisor" restarts what it killed). A fault never waits for lbsync: the
soak's convergence check after it does.

``needs_reconciler``: lbsync today acts on etcd events only, so after these faults the LB
can stay out of step until the next etcd change (issue 12's reconciler fixes that). The
soak's default check ("after the next change following the fault") converges anyway;
``--no-churn-after-fault`` shows the difference.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from bench import env

if TYPE_CHECKING:
    from bench.soak import Soak

BURST_SIZE = 300
BURST_WRITERS = 8
# etcd pings each client every second and drops one that has not answered within a
# second: a frozen lbsync loses its watch, as it would behind a real network timeout.
ETCD_KEEPALIVE = ("--grpc-keepalive-interval=1s", "--grpc-keepalive-timeout=1s")


@dataclass(frozen=True)
class Fault:
    name: str
    what: str
    inject: Callable[[Soak], None]
    needs_reconciler: bool = False


def etcd_kill(soak: Soak) -> None:
    etcd = soak.world.etcd
    assert etcd.process is not None
    etcd.process.kill()
    etcd.process.wait()
    soak.forget_client()
    etcd.start()  # same data dir, same ports


def etcd_pause(soak: Soak) -> None:
    etcd = soak.world.etcd
    assert etcd.process is not None
    os.kill(etcd.process.pid, signal.SIGSTOP)
    try:
        time.sleep(soak.rng.uniform(1.0, 4.0))  # the fault's length, not a wait for a state
    finally:
        os.kill(etcd.process.pid, signal.SIGCONT)


def compact_while_lbsync_paused(soak: Soak) -> None:
    """lbsync frozen while the keys change and etcd compacts past lbsync's revision.

    Over gRPC (full reads, and the watch with ``transport = "grpc"``) etcd drops the
    frozen process's connections (the soak's etcd pings clients every second, see
    ``ETCD_KEEPALIVE``): on SIGCONT lbsync must resync, not resume its watch. A watch on
    etcd's JSON gateway is plain HTTP, which etcd never drops for silence: lbsync reads
    on after SIGCONT what the watch had sent, and must converge all the same. So the
    fault waits for gRPC connections only, up to ``_PAUSED_DROP`` for that.
    """
    with soak.lbsync_window():
        pid = soak.lbsync.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + _PAUSED_DROP
            while _connected(pid, soak.world.etcd.port) and time.monotonic() < deadline:
                time.sleep(0.05)
            for _ in range(soak.rng.randrange(5, 20)):
                soak.write(soak.churn.next())
            soak.client().compact(soak.world.etcd.writer_revision())
        finally:
            os.kill(pid, signal.SIGCONT)


_PAUSED_DROP = 5.0  # etcd drops a frozen gRPC client in ~2 s with ETCD_KEEPALIVE


def _connected(pid: int, port: int) -> bool:
    """Whether ``pid`` has an established TCP connection to ``port`` on loopback."""
    connections = psutil.Process(pid).net_connections(kind="tcp")
    return any(
        c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
        for c in connections
    )


def nginx_reloaded_by_someone_else(soak: Soak) -> None:
    master = soak.world.front.master()
    if master is not None:
        master.send_signal(signal.SIGHUP)


def nginx_killed_restarted_on_older_files(soak: Soak) -> None:
    """SIGKILL the master and its workers (a supervisor kills the whole group), put back
    an older upstream file (as a restore would), start nginx again."""
    front = soak.world.front
    with soak.nginx_window():
        master = front.master()
        procs = [] if master is None else [master, *master.children()]
        for proc in procs:
            proc.kill()
        _gone, alive = psutil.wait_procs(procs, timeout=10)
        if alive:
            raise env.BenchError(f"nginx did not die on SIGKILL: {alive}")
        front.pid_file.unlink(missing_ok=True)
        soak.put_back_older_upstreams()
        front.start()


def upstream_file_edited_by_hand(soak: Soak) -> None:
    """Someone puts back an older upstream file and reloads nginx."""
    soak.put_back_older_upstreams()
    nginx_reloaded_by_someone_else(soak)


def lbsync_hup(soak: Soak) -> None:
    os.kill(soak.lbsync.pid, signal.SIGHUP)


def lbsync_kill(soak: Soak) -> None:
    with soak.lbsync_window():
        process = soak.lbsync.process
        assert process is not None
        process.kill()
        process.wait()
        soak.lbsync.start()


def burst(soak: Soak) -> None:
    """Hundreds of puts and deletes from parallel writers, as fast as etcd takes them."""
    changes = [soak.churn.next() for _ in range(BURST_SIZE)]
    with ThreadPoolExecutor(BURST_WRITERS) as pool:
        list(pool.map(soak.write, changes))


FAULTS = (
    Fault("etcd SIGKILL + restart", "etcd killed, started again on its data dir", etcd_kill),
    Fault("etcd SIGSTOP/SIGCONT", "etcd frozen for 1-4 s", etcd_pause),
    Fault(
        "compaction while lbsync paused",
        "lbsync SIGSTOPped until etcd drops it, 5-20 changes, etcd compacted, SIGCONT",
        compact_while_lbsync_paused,
    ),
    Fault("nginx reloaded by someone else", "SIGHUP to the master", nginx_reloaded_by_someone_else),
    Fault(
        "nginx SIGKILL + restart on older files",
        "master and workers killed, an older upstream file put back, nginx started",
        nginx_killed_restarted_on_older_files,
        needs_reconciler=True,
    ),
    Fault(
        "upstream file edited by hand",
        "an older upstream file put back, nginx reloaded",
        upstream_file_edited_by_hand,
        needs_reconciler=True,
    ),
    Fault("lbsync SIGHUP", "re-read its config and templates", lbsync_hup),
    Fault("lbsync SIGKILL + restart", "killed, started again on its state dir", lbsync_kill),
    Fault("burst", f"{BURST_SIZE} changes by {BURST_WRITERS} writers", burst),
)
