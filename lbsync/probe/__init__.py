"""``lbsync probe``: active health checks whose verdicts are written to etcd.

- ``checks``: one HTTP or TCP check of one instance (libcurl; never a hand-written client);
- ``curl``: libcurl's multi interface driven by the asyncio loop;
- ``engine``: which instances to check (the catalog, through the daemon's etcd watch), the
  per-instance loop with jitter and HAProxy's rise/fall, the transitions it reports;
- ``writer``: the verdict keys, all under one lease of the prober's, kept alive;
- ``metrics``: the prober's own /metrics registry.

The daemon side (quorum, panic threshold) is ``lbsync.probes``.
"""
