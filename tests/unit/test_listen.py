"""Listen-address parsers (nginx, HAProxy) and the bind pre-check, on loopback sockets."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbsync.drivers.listen import ListenAddress, check_listen, haproxy_listens, parse_haproxy_bind
from lbsync.drivers.nginx.config import NginxFiles, mentions, nginx_listens, parse_nginx_listen
from lbsync.errors import ListenConflict
from tests.harness.net import free_port


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["80"], ListenAddress("0.0.0.0", 80)),
        (["*:8080", "default_server"], ListenAddress("0.0.0.0", 8080)),
        (["127.0.0.1:81", "ssl"], ListenAddress("127.0.0.1", 81)),
        (["127.0.0.1"], ListenAddress("127.0.0.1", 80)),
        (["[::]:82", "ipv6only=off"], ListenAddress("::", 82, v6only=False)),
        (["[::1]"], ListenAddress("::1", 80, v6only=True)),
        (["localhost:83"], ListenAddress("localhost", 83)),
        (["53", "udp", "reuseport"], ListenAddress("0.0.0.0", 53, "udp")),
        (["unix:/run/nginx.sock"], None),
    ],
)
def test_parse_nginx_listen(args: list[str], expected: ListenAddress | None) -> None:
    assert parse_nginx_listen(args) == expected


def test_nginx_listens_follows_includes_and_only_reads_server_blocks(tmp_path: Path) -> None:
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "a.conf").write_text("server { listen 127.0.0.1:8001; }\n")
    (tmp_path / "sites" / "b.conf").write_text(
        'server {\n  # listen 9999;\n  listen "127.0.0.1:8002" default_server;\n}\n'
    )
    (tmp_path / "stream.conf").write_text("server { listen 5353 udp; }\n")
    main = tmp_path / "nginx.conf"
    main.write_text(
        "events {}\n"
        "http {\n"
        "    map $host $x { listen 1; default 0; }\n"
        f"    include {tmp_path}/sites/*.conf;\n"
        "    server { listen 8003; location / { return 204; } }\n"
        "}\n"
        "stream { include stream.conf; }\n"  # relative: the main config's directory
        "include missing.conf;\n"
    )

    assert sorted(str(a) for a in nginx_listens(main)) == [
        "0.0.0.0:5353/udp",
        "0.0.0.0:8003",
        "127.0.0.1:8001",
        "127.0.0.1:8002",
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"include x;",
        b"listen 80;",
        b"server 10.0.0.1:80 weight=1;\n" * 1000 + b"server { listen 81; }",
        b"# lbsync, all, full, l\n" * 100 + b"include more.conf;",  # past 64 "l"s
        b"# lbsync, all, full, l\n" * 100,
        b"liste includ lis incl",
        b"xxinclude",
        b"y_by_lua_bloc; access_by_lua_block {",
    ],
)
@pytest.mark.parametrize(("word", "anchor"), [(b"listen", 0), (b"include", 3), (b"_by_lua", 2)])
def test_mentions_agrees_with_plain_search(data: bytes, word: bytes, anchor: int) -> None:
    assert mentions(data, word, anchor) is (word in data)


def _main_including_site(directory: Path, listen: str) -> tuple[Path, Path]:
    """``nginx.conf`` including ``site.conf``, which has one server on ``listen``."""
    site = directory / "site.conf"
    site.write_text(f"server {{ listen {listen}; }}\n")
    main = directory / "nginx.conf"
    main.write_text("http { include site.conf; }\n")
    return main, site


def test_nginx_files_reuse_what_is_unchanged_and_notice_any_edit(tmp_path: Path) -> None:
    files = NginxFiles()
    main, site = _main_including_site(tmp_path, "127.0.0.1:8001")
    assert [str(a) for a in nginx_listens(main, files)] == ["127.0.0.1:8001"]
    first = files.statements(site)

    assert files.statements(site) is first  # same bytes: not tokenized again
    site.write_text("server { listen 127.0.0.1:8002; }\n")  # same size, same inode
    assert [str(a) for a in nginx_listens(main, files)] == ["127.0.0.1:8002"]


def test_nginx_files_match_content_across_paths_and_sweep_what_went_unread(
    tmp_path: Path,
) -> None:
    files = NginxFiles()
    staged, live = tmp_path / "staged.conf", tmp_path / "live.conf"
    staged.write_text("server { listen 8001; }\n")
    parsed = files.statements(staged)
    files.sweep()
    live.write_bytes(staged.read_bytes())  # what was staged is live in the next round

    assert files.statements(live) is parsed
    files.sweep()
    files.sweep()  # nothing read in between: everything forgotten
    other = tmp_path / "other.conf"
    other.write_bytes(live.read_bytes())
    again = files.statements(other)
    assert again == parsed
    assert again is not parsed


def test_nginx_files_take_given_bytes_instead_of_reading(tmp_path: Path) -> None:
    files = NginxFiles()
    main, site = _main_including_site(tmp_path, "8001")

    files.given({site: b"server { listen 8002; }\n"})  # what was just written there
    assert [str(a) for a in nginx_listens(main, files)] == ["0.0.0.0:8002"]
    files.sweep()  # given only until the sweep
    assert [str(a) for a in nginx_listens(main, files)] == ["0.0.0.0:8001"]


@pytest.mark.parametrize(
    ("spec", "params", "expected"),
    [
        (":80", [], [ListenAddress("0.0.0.0", 80)]),
        ("*:81", ["ssl", "crt", "x.pem"], [ListenAddress("0.0.0.0", 81)]),
        ("127.0.0.1:82", [], [ListenAddress("127.0.0.1", 82)]),
        ("ipv6@:::83", ["v6only"], [ListenAddress("::", 83, v6only=True)]),
        ("ipv6@:84", [], [ListenAddress("::", 84)]),
        ("[::1]:85", [], [ListenAddress("::1", 85)]),
        ("quic4@:443", [], [ListenAddress("0.0.0.0", 443, "udp")]),
        (":9000-9002", [], [ListenAddress("0.0.0.0", p) for p in (9000, 9001, 9002)]),
        ("unix@/run/haproxy.sock", [], []),
        ("/run/haproxy.sock", [], []),
        ("fd@3", [], []),
        ("${ADDR}:80", [], []),
    ],
)
def test_parse_haproxy_bind(spec: str, params: list[str], expected: list[ListenAddress]) -> None:
    assert parse_haproxy_bind(spec, params) == expected


def test_haproxy_listens_reads_every_bind_line(tmp_path: Path) -> None:
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "global\n    stats socket /run/admin.sock level admin\n"
        "frontend web\n    bind :8080,127.0.0.1:8081  # two\n    # bind :9999\n"
        "listen stats\n    bind 127.0.0.1:8404\n"
    )
    assert [str(a) for a in haproxy_listens(config)] == [
        "0.0.0.0:8080",
        "127.0.0.1:8081",
        "127.0.0.1:8404",
    ]


# --- check_listen ------------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP socket this process listens on, on 127.0.0.1."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def test_free_address_passes() -> None:
    check_listen([ListenAddress("127.0.0.1", free_port())], own_pids=[], target="t")


def test_address_held_by_another_process_is_a_conflict(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with pytest.raises(ListenConflict) as info:
        check_listen([ListenAddress("127.0.0.1", port)], own_pids=[], target="web")
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    if os.geteuid() == 0:  # other processes' sockets are only attributed for root
        assert f"pid {os.getpid()}" in message
    assert info.value.target == "web"


def test_address_held_exactly_by_the_lb_itself_passes(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    check_listen([ListenAddress("127.0.0.1", port)], own_pids=[os.getpid()], target="t")


def test_overlapping_own_address_is_a_conflict_unless_reuseport(
    listener: socket.socket,
) -> None:
    wildcard = ListenAddress("0.0.0.0", listener.getsockname()[1])
    with pytest.raises(ListenConflict, match="overlaps an address this LB already listens on"):
        check_listen([wildcard], own_pids=[os.getpid()], target="t")
    check_listen([wildcard], own_pids=[os.getpid()], target="t", reuseport=True)


def _udp_socket_with_free_tcp_twin() -> socket.socket:
    """A bound UDP socket whose port is free for TCP right now (ports are picked at random)."""
    for _ in range(50):
        held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        held.bind(("127.0.0.1", 0))
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", held.getsockname()[1]))
            except OSError:
                held.close()
                continue
        return held
    raise AssertionError("no UDP port with a free TCP twin")


def test_udp_address_is_probed_as_udp() -> None:
    with _udp_socket_with_free_tcp_twin() as held:
        port = held.getsockname()[1]
        check_listen([ListenAddress("127.0.0.1", port)], own_pids=[], target="t")  # tcp: free
        with pytest.raises(ListenConflict, match=f"127.0.0.1:{port}/udp"):
            check_listen([ListenAddress("127.0.0.1", port, "udp")], own_pids=[], target="t")


def test_unresolvable_or_foreign_address_is_a_conflict() -> None:
    with pytest.raises(ListenConflict, match="does not resolve"):
        check_listen([ListenAddress("no-such-host.invalid", 80)], own_pids=[], target="t")
    with pytest.raises(ListenConflict, match="cannot be bound"):
        check_listen([ListenAddress("192.0.2.1", free_port())], own_pids=[], target="t")
