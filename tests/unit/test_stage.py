"""Staging tree, atomic swap, last-known-good and restore, on real files in tmp_path."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from lbsync import fileio
from lbsync.errors import StageError
from lbsync.stage import swap
from lbsync.stage import tree as staging

# --- helpers -----------------------------------------------------------------------------


def _live_tree(tmp_path: Path) -> Path:
    """A small /etc/nginx look-alike; returns its root."""
    root = tmp_path / "etc" / "nginx"
    (root / "conf.d").mkdir(parents=True)
    (root / "mime.types").write_text("types { text/html html; }\n")
    (root / "conf.d" / "old.conf").write_text("# old fragment\n")
    (root / "nginx.conf").write_text(
        f"events {{}}\nhttp {{\n    include mime.types;\n    include {root}/conf.d/*.conf;\n}}\n"
    )
    return root


def _target(config: Path | None, name: str = "web") -> SimpleNamespace:
    return SimpleNamespace(name=name, config=config)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def _in(dir_fd: int | None, name: str) -> Path:
    """The path ``name`` names relative to ``dir_fd`` (the cwd for None)."""
    return Path(os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else ".") / name


def _fail_replace_for(
    monkeypatch: pytest.MonkeyPatch, victim: Path, code: int
) -> Callable[..., None]:
    """Renames onto ``victim`` (by name, in its directory's descriptor) fail with ``code``."""
    real = os.rename

    def fake(src: str, dst: str, **dir_fds: int | None) -> None:
        if _in(dir_fds.get("dst_dir_fd"), dst) == victim:
            raise OSError(code, os.strerror(code), dst)
        real(src, dst, **dir_fds)

    monkeypatch.setattr(fileio.os, "rename", fake)
    return fake


# --- staging -----------------------------------------------------------------------------


def test_stage_rewrites_absolute_include_to_the_staged_tree(tmp_path: Path) -> None:
    root = _live_tree(tmp_path)
    dest = root / "conf.d" / "upstreams.conf"

    tree = staging.stage_files(_target(root / "nginx.conf"), {dest: b"new\n"}, tmp_path / "work")

    assert tree.main == tree.root / "nginx.conf"
    assert tree.files == {dest: tree.root / "conf.d" / "upstreams.conf"}
    main = tree.main.read_text()
    assert f"include {tree.root}/conf.d/*.conf;" in main
    assert str(root) not in main
    assert "include mime.types;" in main
    assert (tree.root / "conf.d" / "upstreams.conf").read_bytes() == b"new\n"
    assert (tree.root / "conf.d" / "old.conf").read_text() == "# old fragment\n"
    assert not dest.exists(), "staging must not touch the live tree"


def test_stage_never_writes_into_live_files(tmp_path: Path) -> None:
    """Unchanged live files may be hard-linked into the stage: replacing must not leak."""
    root = _live_tree(tmp_path)
    dest = root / "conf.d" / "old.conf"
    live = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    with staging.staged(_target(root / "nginx.conf"), {dest: b"# new\n"}, tmp_path / "w") as tree:
        assert tree.files[dest].read_bytes() == b"# new\n"
        assert (tree.root / "mime.types").read_bytes() == live[root / "mime.types"]

    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == live


def test_stage_leaves_lookalike_paths_and_urls_alone(tmp_path: Path) -> None:
    root = _live_tree(tmp_path)
    text = (
        f"# {root}-extra/x.conf and http://mirror{root}/y stay\n"
        f'include "{root}/conf.d/quoted.conf";\n'
        f"root {root}-extra/html;\n"
        f"alias {root}/html/;\n"
    )
    (root / "conf.d" / "paths.conf").write_text(text)

    tree = staging.stage_files(_target(root / "nginx.conf"), {}, tmp_path / "work")

    staged = (tree.root / "conf.d" / "paths.conf").read_text()
    assert f"{root}-extra/x.conf" in staged
    assert f"http://mirror{root}/y" in staged
    assert f'include "{tree.root}/conf.d/quoted.conf";' in staged
    assert f"root {root}-extra/html;" in staged
    assert f"alias {tree.root}/html/;" in staged  # trailing slash kept


def test_stage_puts_outside_dest_under_external_and_rewrites_it(tmp_path: Path) -> None:
    root = _live_tree(tmp_path)
    outside = tmp_path / "srv" / "lb" / "upstreams.conf"
    conf = root / "nginx.conf"
    conf.write_text(conf.read_text().replace("http {", f"http {{\n    include {outside};"))

    tree = staging.stage_files(_target(conf), {outside: b"up\n"}, tmp_path / "work")

    staged_out = tree.root / ".lbsync-external" / str(outside).lstrip("/")
    assert tree.files[outside] == staged_out
    assert staged_out.read_bytes() == b"up\n"
    assert f"include {staged_out};" in tree.main.read_text()  # type: ignore[union-attr]
    assert not outside.exists()


def test_stage_mirrors_an_outside_glob_that_matches_a_dest(tmp_path: Path) -> None:
    root = _live_tree(tmp_path)
    lb_dir = tmp_path / "srv" / "lb"
    lb_dir.mkdir(parents=True)
    (lb_dir / "static.conf").write_text("# operator's own fragment\n")
    conf = root / "nginx.conf"
    conf.write_text(conf.read_text().replace("http {", f"http {{\n    include {lb_dir}/*.conf;"))

    tree = staging.stage_files(_target(conf), {lb_dir / "gen.conf": b"gen\n"}, tmp_path / "work")

    mirror = tree.root / ".lbsync-external" / str(lb_dir).lstrip("/")
    assert f"include {mirror}/*.conf;" in tree.main.read_text()  # type: ignore[union-attr]
    assert sorted(p.name for p in mirror.iterdir()) == ["gen.conf", "static.conf"]
    assert sorted(p.name for p in lb_dir.iterdir()) == ["static.conf"]


def test_stage_repoints_absolute_symlinks_and_writes_through_linked_dest(
    tmp_path: Path,
) -> None:
    root = _live_tree(tmp_path)
    (root / "sites-available").mkdir()
    (root / "sites-enabled").mkdir()
    (root / "sites-available" / "app").write_text("# old site\n")
    (root / "sites-enabled" / "app").symlink_to(root / "sites-available" / "app")
    dest = root / "sites-enabled" / "app"

    tree = staging.stage_files(
        _target(root / "nginx.conf"), {dest: b"# new site\n"}, tmp_path / "w"
    )

    link = tree.root / "sites-enabled" / "app"
    assert link.is_symlink()
    assert os.readlink(link) == str(tree.root / "sites-available" / "app")
    assert link.read_bytes() == b"# new site\n"
    assert (root / "sites-available" / "app").read_text() == "# old site\n"


def test_stage_of_a_rendered_main_config_rewrites_it_too(tmp_path: Path) -> None:
    root = _live_tree(tmp_path)
    main = root / "nginx.conf"
    new_main = f"events {{}}\nhttp {{ include {root}/conf.d/*.conf; }}\n".encode()

    tree = staging.stage_files(_target(main), {main: new_main}, tmp_path / "work")

    assert tree.main == tree.files[main]
    assert tree.main.read_text() == f"events {{}}\nhttp {{ include {tree.root}/conf.d/*.conf; }}\n"
    assert main.read_text().startswith("events {}\nhttp {\n    include mime.types;")


def test_stage_without_config_holds_only_the_rendered_files(tmp_path: Path) -> None:
    dest = tmp_path / "etc" / "lb" / "backends.json"

    tree = staging.stage_files(_target(None), {dest: b"{}"}, tmp_path / "work")

    assert tree.main is None
    assert tree.files[dest].read_bytes() == b"{}"
    assert tree.files[dest].is_relative_to(tree.root / ".lbsync-external")
    assert [p for p in tree.root.rglob("*") if p.is_file()] == [tree.files[dest]]


def test_staged_context_manager_removes_the_tree_even_on_error(tmp_path: Path) -> None:
    root = _live_tree(tmp_path)
    work = tmp_path / "work"
    seen: list[Path] = []

    def validate_and_fail() -> None:
        with staging.staged(_target(root / "nginx.conf"), {}, work) as tree:
            seen.append(tree.root)
            raise RuntimeError("validation blew up")

    with pytest.raises(RuntimeError):
        validate_and_fail()
    assert seen
    assert list(work.iterdir()) == []


def test_stage_refuses_a_workdir_inside_the_config_dir(tmp_path: Path) -> None:
    root = _live_tree(tmp_path)
    with pytest.raises(StageError, match="inside the LB's config directory") as info:
        staging.stage_files(_target(root / "nginx.conf"), {}, root / "lbsync-stage")
    assert info.value.path == str(root)
    assert list((root / "lbsync-stage").iterdir()) == []


def test_stage_of_a_missing_config_dir_is_a_stage_error_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    work = tmp_path / "work"
    with pytest.raises(StageError, match="does not exist"):
        staging.stage_files(_target(tmp_path / "nope" / "nginx.conf"), {}, work)
    assert list(work.iterdir()) == []


# --- swap / restore ----------------------------------------------------------------------


def test_swap_keeps_owner_and_mode_and_backs_up_previous(tmp_path: Path) -> None:
    dest = tmp_path / "conf.d" / "upstreams.conf"
    dest.parent.mkdir()
    dest.write_bytes(b"old\n")
    os.chmod(dest, 0o640)
    if os.geteuid() == 0:
        os.chown(dest, 1234, 4321)
    before = dest.stat()
    backups = tmp_path / "backup"

    record = swap.swap_in({dest: b"new\n"}, backups)

    after = dest.stat()
    assert dest.read_bytes() == b"new\n"
    assert stat.S_IMODE(after.st_mode) == 0o640
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert after.st_ino != before.st_ino, "expected an atomic rename, not an in-place write"
    backup = backups / str(dest).lstrip("/")
    assert backup.read_bytes() == b"old\n"
    assert record.entries[0].previous == b"old\n"
    assert record.entries[0].backup == backup
    assert sorted(p.name for p in dest.parent.iterdir()) == ["upstreams.conf"]


def test_new_file_gets_0644_and_restore_removes_it(tmp_path: Path) -> None:
    dest = tmp_path / "new.conf"
    old_umask = os.umask(0o077)
    try:
        record = swap.swap_in({dest: b"hello\n"}, tmp_path / "backup")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644
    assert record.entries[0].previous is None
    assert not (tmp_path / "backup" / str(dest).lstrip("/")).exists()

    swap.restore(record)

    assert not dest.exists()


def test_restore_puts_previous_content_back_with_its_mode(tmp_path: Path) -> None:
    dest = tmp_path / "a.conf"
    dest.write_bytes(b"good\n")
    os.chmod(dest, 0o600)
    record = swap.swap_in({dest: b"bad\n"}, tmp_path / "backup")

    swap.restore(record)

    assert dest.read_bytes() == b"good\n"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert _leftovers(tmp_path) == []


def test_template_mode_overrides_and_restore_puts_the_old_mode_back(tmp_path: Path) -> None:
    dest = tmp_path / "a.conf"
    dest.write_bytes(b"x")
    os.chmod(dest, 0o644)
    record = swap.swap_in({dest: b"y"}, tmp_path / "backup", modes={dest: 0o600})
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    swap.restore(record)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644


def test_unchanged_file_is_not_rewritten(tmp_path: Path) -> None:
    dest = tmp_path / "a.conf"
    dest.write_bytes(b"same\n")
    inode = dest.stat().st_ino

    record = swap.swap_in({dest: b"same\n"}, tmp_path / "backup")

    assert record.entries == ()
    assert dest.stat().st_ino == inode


def test_symlinked_dest_is_written_through_when_followed_and_the_link_kept(
    tmp_path: Path,
) -> None:
    (tmp_path / "available").mkdir()
    real = tmp_path / "available" / "app.conf"
    real.write_bytes(b"old\n")
    os.chmod(real, 0o640)
    inode = real.stat().st_ino
    link = tmp_path / "enabled.conf"
    link.symlink_to(real)

    record = swap.swap_in({link: b"new\n"}, tmp_path / "backup", follow_symlinks={link})

    assert link.is_symlink()
    assert os.readlink(link) == str(real)
    assert real.read_bytes() == b"new\n"
    assert real.stat().st_ino != inode, "replaced by a rename in its own directory"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert _leftovers(real.parent) == []
    assert _leftovers(tmp_path) == []
    assert record.paths == (real,)
    swap.restore(record)
    assert real.read_bytes() == b"old\n"
    assert link.is_symlink()


def _root_only_file(tmp_path: Path) -> tuple[Path, tuple[int, int, int, bytes]]:
    """An unrelated file lbsync must never touch, and what it is now."""
    victim = tmp_path / "elsewhere" / "shadow"
    victim.parent.mkdir()
    victim.write_bytes(b"root:secret\n")
    os.chmod(victim, 0o600)
    os.chown(victim, 0, 0)
    return victim, _file_facts(victim)


def _file_facts(path: Path) -> tuple[int, int, int, bytes]:
    info = os.lstat(path)
    return info.st_uid, stat.S_IMODE(info.st_mode), info.st_ino, path.read_bytes()


@pytest.mark.parametrize("settle_later", [False, True])
def test_symlinked_dest_is_refused_and_its_target_untouched(
    tmp_path: Path, settle_later: bool
) -> None:
    victim, before = _root_only_file(tmp_path)
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    ok, planted = conf_d / "a.conf", conf_d / "upstreams.conf"
    ok.write_bytes(b"old a\n")
    os.chown(conf_d, 12345, 12345)  # a directory another user can write to
    planted.symlink_to(victim)

    with pytest.raises(StageError, match="is a symlink") as info:
        swap.swap_in(
            {ok: b"new a\n", planted: b"rendered\n"},
            tmp_path / "backup",
            settle_later=settle_later,
        )

    assert info.value.path == str(planted)
    assert str(victim) in str(info.value), "the message names where the link leads"
    assert _file_facts(victim) == before
    assert planted.is_symlink()
    assert ok.read_bytes() == b"old a\n", "all or nothing: the other file was put back"
    assert _leftovers(conf_d) == []


def test_current_bytes_refuses_a_symlink_unless_followed(tmp_path: Path) -> None:
    victim, _ = _root_only_file(tmp_path)
    link = tmp_path / "upstreams.conf"
    link.symlink_to(victim)

    with pytest.raises(StageError, match=f"is a symlink \\(to '{victim}'\\)"):
        swap.current_bytes(link)
    assert swap.current_bytes(link, follow_symlinks=True) == b"root:secret\n"


def test_a_symlink_planted_at_a_temp_name_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim, before = _root_only_file(tmp_path)
    dest = tmp_path / "upstreams.conf"
    dest.write_bytes(b"old\n")
    names = iter(["guessed", "guessed", "fresh"])
    monkeypatch.setattr(fileio.secrets, "token_hex", lambda _n: next(names))
    planted = tmp_path / ".upstreams.conf.lbsync-guessed.tmp"
    planted.symlink_to(victim)

    swap.swap_in({dest: b"new\n"}, tmp_path / "backup")

    assert dest.read_bytes() == b"new\n"
    assert not dest.is_symlink()
    assert _file_facts(victim) == before
    assert planted.is_symlink(), "skipped, not removed or followed"


def test_a_symlink_planted_at_the_backup_names_is_not_followed(tmp_path: Path) -> None:
    victim, before = _root_only_file(tmp_path)
    dest = tmp_path / "live" / "upstreams.conf"
    dest.parent.mkdir()
    dest.write_bytes(b"old\n")
    backups = tmp_path / "backup"
    backup = backups / str(dest).lstrip("/")
    backup.parent.mkdir(parents=True)
    backup.symlink_to(victim)
    previous_link = backup.with_name(f".{backup.name}.lbsync-previous")
    previous_link.symlink_to(victim)

    swap.settle(swap.swap_in({dest: b"new\n"}, backups, settle_later=True))
    assert backup.read_bytes() == b"old\n"
    assert not backup.is_symlink()
    backup.unlink()
    backup.symlink_to(victim)
    swap.swap_in({dest: b"newer\n"}, backups)  # the copying path

    assert backup.read_bytes() == b"new\n"
    assert not backup.is_symlink()
    assert _file_facts(victim) == before


def test_in_place_write_does_not_follow_a_symlink_planted_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim, before = _root_only_file(tmp_path)
    dest = tmp_path / "bind-mounted.conf"
    dest.write_bytes(b"old\n")
    real_rename = os.rename

    def swapped_for_a_link(src: str, dst: str, **dir_fds: int | None) -> None:
        if _in(dir_fds.get("dst_dir_fd"), dst) == dest:
            dest.unlink()
            dest.symlink_to(victim)
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), dst)
        real_rename(src, dst, **dir_fds)

    monkeypatch.setattr(fileio.os, "rename", swapped_for_a_link)

    with pytest.raises(StageError, match="is a symlink"):
        swap.swap_in({dest: b"new\n"}, tmp_path / "backup")

    assert _file_facts(victim) == before


@pytest.mark.parametrize("code", [errno.EBUSY, errno.EXDEV])
def test_rename_impossible_falls_back_to_in_place_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    dest = tmp_path / "bind-mounted.conf"
    dest.write_bytes(b"old content, longer than the new one\n")
    os.chmod(dest, 0o640)
    inode = dest.stat().st_ino
    _fail_replace_for(monkeypatch, dest, code)

    record = swap.swap_in({dest: b"new\n"}, tmp_path / "backup")

    assert dest.read_bytes() == b"new\n"
    assert dest.stat().st_ino == inode, "in place: same inode, as a bind mount needs"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640
    assert _leftovers(tmp_path) == []

    swap.restore(record)

    assert dest.read_bytes() == b"old content, longer than the new one\n"
    assert dest.stat().st_ino == inode
    assert _leftovers(tmp_path) == []


def test_no_temp_file_possible_falls_back_to_in_place_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "a.conf"
    dest.write_bytes(b"old\n")
    inode = dest.stat().st_ino
    real_create_temp = fileio._create_temp

    def read_only_dir(dir_fd: int, name: str) -> tuple[int, str]:
        if _in(dir_fd, name) == dest:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_create_temp(dir_fd, name)

    monkeypatch.setattr(fileio, "_create_temp", read_only_dir)

    swap.swap_in({dest: b"new\n"}, tmp_path / "backup")

    assert dest.read_bytes() == b"new\n"
    assert dest.stat().st_ino == inode


def test_failure_mid_way_restores_the_files_already_swapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = (tmp_path / f"{n}.conf" for n in "abc")
    for path in (a, b, c):
        path.write_bytes(b"old " + path.name.encode())
    _fail_replace_for(monkeypatch, b, errno.EIO)

    with pytest.raises(StageError) as info:
        swap.swap_in({a: b"new a", b: b"new b", c: b"new c"}, tmp_path / "backup")

    assert info.value.path == str(b)
    assert isinstance(info.value.__cause__, OSError)
    assert [p.read_bytes() for p in (a, b, c)] == [b"old a.conf", b"old b.conf", b"old c.conf"]
    assert _leftovers(tmp_path) == []


def test_failure_mid_way_removes_a_file_that_was_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    new, broken = tmp_path / "a-new.conf", tmp_path / "b.conf"
    broken.write_bytes(b"old")
    _fail_replace_for(monkeypatch, broken, errno.ENOSPC)

    with pytest.raises(StageError, match="cannot replace"):
        swap.swap_in({new: b"n", broken: b"b"}, tmp_path / "backup")

    assert not new.exists()
    assert broken.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_current_bytes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    assert swap.current_bytes(path) is None
    path.write_bytes(b"x")
    assert swap.current_bytes(path) == b"x"
    with pytest.raises(StageError) as info:
        swap.current_bytes(tmp_path)
    assert info.value.path == str(tmp_path)
    assert isinstance(info.value.__cause__, OSError)


# --- a staged tree kept between rounds -----------------------------------------------------


def _staged_root(area: staging.StagingArea, rendered: dict[Path, bytes]) -> Path:
    with area.staged(rendered) as tree:
        for dest, data in rendered.items():
            assert tree.files[dest].read_bytes() == data
        # what the driver is handed instead of reading the staged files back
        assert {p: p.read_bytes() for p in tree.files.values()} == tree.contents
        return tree.root


def test_staging_area_reuses_its_tree_while_only_rendered_files_change(tmp_path: Path) -> None:
    root = _live_tree(tmp_path)
    dest = root / "conf.d" / "upstreams.conf"
    area = staging.StagingArea(_target(root / "nginx.conf"), tmp_path / "work")

    first = _staged_root(area, {dest: b"one\n"})
    swap.swap_in({dest: b"one\n"}, tmp_path / "backup")  # the live dest changes each round
    assert _staged_root(area, {dest: b"two\n"}) == first
    assert _staged_root(area, {dest: b"two\n"}) == first
    assert dest.read_bytes() == b"one\n", "staging must not touch the live tree"
    assert f"include {first}/conf.d/*.conf;" in (first / "nginx.conf").read_text()

    area.close()
    assert not first.exists()


@pytest.mark.parametrize("change", ["edit", "add", "replace", "remove"])
def test_staging_area_rebuilds_when_the_live_tree_changes(tmp_path: Path, change: str) -> None:
    root = _live_tree(tmp_path)
    dest = root / "conf.d" / "upstreams.conf"
    area = staging.StagingArea(_target(root / "nginx.conf"), tmp_path / "work")
    first = _staged_root(area, {dest: b"up\n"})

    old = root / "conf.d" / "old.conf"
    if change == "edit":
        with old.open("a") as handle:  # in place: same inode
            handle.write("# more\n")
    elif change == "add":
        (root / "conf.d" / "new.conf").write_text("# new\n")
    elif change == "replace":
        tmp = root / "conf.d" / ".old.tmp"
        tmp.write_text("# old fragment\n")
        os.replace(tmp, old)
    else:
        old.unlink()

    second = _staged_root(area, {dest: b"up\n"})
    assert second != first
    assert not first.exists()
    live = sorted(p.relative_to(root) for p in root.rglob("*") if p != dest)
    assert (
        sorted(
            p.relative_to(second) for p in second.rglob("*") if p != second / dest.relative_to(root)
        )
        == live
    )
    if change == "edit":
        assert (second / "conf.d" / "old.conf").read_text().endswith("# more\n")


def test_staging_area_rebuilds_a_tree_removed_under_it(tmp_path: Path) -> None:
    root = _live_tree(tmp_path)
    dest = root / "conf.d" / "upstreams.conf"
    area = staging.StagingArea(_target(root / "nginx.conf"), tmp_path / "work")
    first = _staged_root(area, {dest: b"up\n"})
    for path in sorted(first.rglob("*"), reverse=True):
        path.unlink() if not path.is_dir() or path.is_symlink() else path.rmdir()
    first.rmdir()
    second = _staged_root(area, {dest: b"up\n"})
    assert (second / "nginx.conf").exists()


def test_staging_area_always_rebuilds_for_an_outside_dest(tmp_path: Path) -> None:
    root = _live_tree(tmp_path)
    outside = tmp_path / "srv" / "lb" / "upstreams.conf"
    area = staging.StagingArea(_target(root / "nginx.conf"), tmp_path / "work")
    first = _staged_root(area, {outside: b"up\n"})
    assert _staged_root(area, {outside: b"up\n"}) != first
    assert not first.exists()


# --- backups and directory fsync after the reload signal ------------------------------------


def test_settle_later_writes_the_backup_and_syncs_the_dir_in_settle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "conf.d" / "upstreams.conf"
    dest.parent.mkdir()
    dest.write_bytes(b"old\n")
    old_inode = dest.stat().st_ino
    new = tmp_path / "conf.d" / "new.conf"
    backups = tmp_path / "backup"
    synced: list[Path] = []
    real_fsync_dir = swap.fsync_dir

    def fsync_dir(dir_fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{dir_fd}")))
        real_fsync_dir(dir_fd)

    monkeypatch.setattr(swap, "fsync_dir", fsync_dir)

    record = swap.swap_in({dest: b"new\n", new: b"n\n"}, backups, settle_later=True)

    assert dest.read_bytes() == b"new\n"
    assert new.read_bytes() == b"n\n"
    backup = backups / str(dest).lstrip("/")
    assert {e.path: e.backup for e in record.entries} == {dest: backup, new: None}
    assert not backup.exists()
    assert synced == []
    swap.settle(record)
    assert backup.read_bytes() == b"old\n"
    assert backup.stat().st_ino == old_inode, "the replaced file itself, linked: no copy"
    assert [p.name for p in backup.parent.iterdir()] == [backup.name]
    assert synced == [new.parent, dest.parent]
    swap.settle(record)  # once only
    assert len(synced) == 2
    swap.restore(record)  # restore works from the record, settled or not
    assert dest.read_bytes() == b"old\n"
    assert not new.exists()


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every fsync from now on, as ("file" or "dir", inode)."""
    calls: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        facts = os.fstat(fd)
        calls.append(("dir" if stat.S_ISDIR(facts.st_mode) else "file", facts.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


@pytest.mark.parametrize("existed", [True, False])
def test_settle_later_fsyncs_the_new_file_after_the_rename_then_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existed: bool
) -> None:
    dest = tmp_path / "upstreams.conf"
    if existed:
        dest.write_bytes(b"old\n")
    calls = _record_fsyncs(monkeypatch)

    record = swap.swap_in({dest: b"new\n"}, tmp_path / "backup", settle_later=True)

    assert dest.read_bytes() == b"new\n"  # in place, complete, for any reader
    assert calls == [], "no fsync between the render and the LB's signal"
    swap.settle(record)
    assert calls == [("file", dest.stat().st_ino), ("dir", tmp_path.stat().st_ino)]


def test_without_settle_later_the_file_is_fsynced_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "upstreams.conf"
    dest.write_bytes(b"old\n")
    calls = _record_fsyncs(monkeypatch)

    swap.swap_in({dest: b"new\n"}, tmp_path / "backup")

    assert calls == [("file", dest.stat().st_ino), ("dir", tmp_path.stat().st_ino)]


def test_settle_fsyncs_no_file_a_symlink_planted_meanwhile_leads_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "upstreams.conf"
    dest.write_bytes(b"old\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"someone else's\n")
    record = swap.swap_in({dest: b"new\n"}, tmp_path / "backup", settle_later=True)
    dest.unlink()
    dest.symlink_to(elsewhere)
    calls = _record_fsyncs(monkeypatch)

    swap.settle(record)  # logged (stage.settle_failed), not raised

    assert ("file", elsewhere.stat().st_ino) not in calls
    assert record.unsettled == []


@pytest.mark.parametrize("why", ["in place", "no link"])
def test_settle_later_copies_the_backup_when_it_cannot_keep_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    dest = tmp_path / "upstreams.conf"
    dest.write_bytes(b"old\n")
    if why == "in place":  # a bind-mounted file: the old inode gets the new bytes
        _fail_replace_for(monkeypatch, dest, errno.EBUSY)
    else:  # state_dir on another filesystem

        def cross_device(*_args: object, **_kwargs: object) -> None:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

        monkeypatch.setattr(swap.os, "link", cross_device)

    record = swap.swap_in({dest: b"new\n"}, tmp_path / "backup", settle_later=True)
    swap.settle(record)

    backup = tmp_path / "backup" / str(dest).lstrip("/")
    assert dest.read_bytes() == b"new\n"
    assert backup.read_bytes() == b"old\n"
    assert [p.name for p in backup.parent.iterdir()] == [backup.name]


def test_settle_logs_a_failed_backup_instead_of_raising(tmp_path: Path) -> None:
    dest = tmp_path / "upstreams.conf"
    dest.write_bytes(b"old\n")
    blocker = tmp_path / "backup"
    blocker.write_text("a file where the backup directory should be")

    record = swap.swap_in({dest: b"new\n"}, blocker, settle_later=True)
    swap.settle(record)

    assert dest.read_bytes() == b"new\n"
    assert record.unsettled == []


def test_staging_area_overwrites_only_its_own_inode(tmp_path: Path) -> None:
    root = _live_tree(tmp_path)
    dest = root / "conf.d" / "upstreams.conf"
    dest.write_bytes(b"live\n")
    area = staging.StagingArea(_target(root / "nginx.conf"), tmp_path / "work")
    with area.staged({dest: b"one\n"}) as tree:
        staged = tree.files[dest]
        inode = staged.stat().st_ino
    with area.staged({dest: b"two\n"}):
        assert staged.stat().st_ino == inode  # rewritten in place: no new inode per round
        assert staged.read_bytes() == b"two\n"
    with area.staged({dest: b"a longer one\n"}):
        assert staged.read_bytes() == b"a longer one\n"
    with area.staged({dest: b"2\n"}):
        assert staged.read_bytes() == b"2\n"  # shorter: the tail is cut
    staged.unlink()
    os.link(dest, staged)  # as if shared with the live file: must be replaced, not written
    with area.staged({dest: b"three\n"}):
        assert staged.read_bytes() == b"three\n"
    assert dest.read_bytes() == b"live\n"
    # A staged directory swapped for a link to the live one (renamed away, so the live
    # files it hard-links keep their ctimes and the tree is reused): the file found at
    # the staged path is not the inode staging created, and the path is refused.
    staged.parent.rename(staged.parent.with_name("moved"))
    staged.parent.symlink_to(dest.parent)
    with (
        pytest.raises(StageError, match="leads out of the staging directory"),
        area.staged({dest: b"four\n"}),
    ):
        pass
    assert dest.read_bytes() == b"live\n"


# --- the bytes the round already read ------------------------------------------------------


def test_swap_reuses_the_bytes_read_when_the_file_is_still_that_version(tmp_path: Path) -> None:
    dest = tmp_path / "upstreams.conf"
    dest.write_bytes(b"old\n")
    seen = swap.current_file(dest)
    assert seen is not None
    assert seen.data == b"old\n"
    # Same version on disk: its bytes are taken as read (a marker object proves no re-read).
    marker = swap.Seen(b"as read by plan\n", seen.version)

    record = swap.swap_in({dest: b"new\n"}, tmp_path / "backup", seen={dest: marker})

    assert record.entries[0].previous is marker.data
    assert dest.read_bytes() == b"new\n"


@pytest.mark.parametrize("how", ["renamed", "in_place_same_size"])
def test_swap_reads_again_a_file_that_moved_since_it_was_read(tmp_path: Path, how: str) -> None:
    dest = tmp_path / "upstreams.conf"
    dest.write_bytes(b"old\n")
    seen = swap.current_file(dest)
    assert seen is not None
    if how == "renamed":
        (tmp_path / "other").write_bytes(b"edit\n")
        os.replace(tmp_path / "other", dest)
    else:
        info = dest.stat()
        dest.write_bytes(b"OLD\n")  # same size, same inode: the times tell
        os.utime(dest, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))

    record = swap.swap_in({dest: b"new\n"}, tmp_path / "backup", seen={dest: seen})

    assert dest.read_bytes() == b"new\n"
    expected = b"edit\n" if how == "renamed" else b"OLD\n"
    assert record.entries[0].previous == expected, "what is put back is what was replaced"
    swap.restore(record)
    assert dest.read_bytes() == expected


def test_swap_with_seen_bytes_still_refuses_a_symlink_planted_since(tmp_path: Path) -> None:
    victim, before = _root_only_file(tmp_path)
    dest = tmp_path / "upstreams.conf"
    dest.write_bytes(b"old\n")
    seen = swap.current_file(dest)
    dest.unlink()
    dest.symlink_to(victim)

    with pytest.raises(StageError, match="is a symlink"):
        swap.swap_in({dest: b"new\n"}, tmp_path / "backup", seen={dest: seen})

    assert _file_facts(victim) == before
    assert dest.is_symlink()


def test_current_file_reads_through_a_followed_symlink_only(tmp_path: Path) -> None:
    victim, _ = _root_only_file(tmp_path)
    link = tmp_path / "upstreams.conf"
    link.symlink_to(victim)

    assert swap.current_file(tmp_path / "missing") is None
    with pytest.raises(StageError, match="is a symlink"):
        swap.current_file(link)
    seen = swap.current_file(link, follow_symlinks=True)
    assert seen is not None
    assert seen.data == b"root:secret\n"
    assert seen.version[1] == victim.stat().st_ino
