"""The watch loop's state: when a resumed watch's server is not the history followed."""

from __future__ import annotations

import pytest

from lbsync.errors import SourceUnavailable
from lbsync.source.attempts import LoopState


@pytest.mark.parametrize(
    ("revision", "cluster_id", "header_revision", "header_cluster_id", "reason"),
    [
        (40, 0xA, 3, 0xA, "etcd revision went back from 40 to 3"),
        (40, 0xA, 90, 0xB, "etcd cluster id changed from a to b"),
        (40, 0xA, 3, 0xB, "etcd cluster id changed from a to b"),
    ],
)
def test_a_revision_gone_back_or_another_cluster_id_is_a_divergence(
    revision: int, cluster_id: int, header_revision: int, header_cluster_id: int, reason: str
) -> None:
    state = LoopState(revision=revision, cluster_id=cluster_id)

    assert state.diverged(header_revision, header_cluster_id) == reason


@pytest.mark.parametrize(
    ("cluster_id", "header_revision", "header_cluster_id"),
    [
        (0xA, 40, 0xA),  # nothing written since
        (0xA, 41, 0xA),  # written since: the watch replays it
        (0xA, 41, 0),  # a proxy that does not say: the revision decides
        (0, 41, 0xB),  # no full read yet
    ],
)
def test_the_same_history_resumes(
    cluster_id: int, header_revision: int, header_cluster_id: int
) -> None:
    state = LoopState(revision=40, cluster_id=cluster_id)

    assert state.diverged(header_revision, header_cluster_id) is None


def test_the_established_and_lost_reports_carry_the_cluster_id() -> None:
    state = LoopState(revision=7, cluster_id=0xA)

    assert state.established("http://e:2379", 7).cluster_id == 0xA
    assert state.lost(SourceUnavailable("down"), "http://e:2379").cluster_id == 0xA
