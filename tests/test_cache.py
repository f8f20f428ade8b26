"""The one helper of the content-addressed caches (trainable/cache.py): a complete entry is a hit and the builder
does not run; a builder that fails leaves neither the entry nor a temporary; a folder without its marker is built
again; processes that build the same entry at the same moment all get it whole."""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from trainable.cache import cached

FILES = 20  # a folder entry of a few files, so that building it takes a moment


def _fill(tmp: Path, tag: str) -> str:
    for i in range(FILES):
        (tmp / f"part{i}.txt").write_text(tag)
    (tmp / "done.json").write_text(tag)
    return tag


def _whole(folder: Path) -> bool:
    """Every part and the marker there, all from one builder."""
    tags = {(folder / f"part{i}.txt").read_text() for i in range(FILES)} | {(folder / "done.json").read_text()}
    return len(tags) == 1 and sorted(p.name for p in folder.iterdir()) == sorted(
        [f"part{i}.txt" for i in range(FILES)] + ["done.json"])


def _never(tmp: Path):
    raise AssertionError("the builder ran on a hit")


def test_a_complete_entry_is_a_hit_and_the_builder_does_not_run(tmp_path):
    msgs = []
    def make(tmp: Path) -> int:
        tmp.write_text("made")
        return 7

    first = cached(tmp_path, "things", "thing-abc.txt", make, what="thing", log=msgs.append)
    assert not first.hit and first.built == 7 and first.path == tmp_path / "things" / "thing-abc.txt"
    assert first.path.read_text() == "made" and not msgs
    again = cached(tmp_path, "things", "thing-abc.txt", _never, what="thing", log=msgs.append)
    assert again.hit and again.path == first.path and again.built is None
    assert msgs == [f"thing: cache hit {first.path}"]

    folder = cached(tmp_path, "boxes", "k1", lambda tmp: _fill(tmp, "a"), marker="done.json")
    msgs.clear()
    hit = cached(tmp_path, "boxes", "k1", _never, marker="done.json", what="box", log=msgs.append,
                 note=lambda p: f"tag {(p / 'done.json').read_text()}")
    assert hit.hit and hit.path == folder.path and _whole(hit.path)
    assert msgs == [f"box: cache hit {folder.path} (tag a)"]
    assert not cached(tmp_path, "things", "thing-abc.txt", lambda tmp: tmp.write_text("new"), stale=True).hit
    assert first.path.read_text() == "new"  # its owner found it stale: built again over it


@pytest.mark.parametrize("marker", [None, "done.json"])
def test_a_builder_that_raises_leaves_no_entry_and_no_temporary(tmp_path, marker):
    def half(tmp: Path):
        if marker is None:
            tmp.write_text("half a file")
        else:
            (tmp / "part0.txt").write_text("half a folder")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="mid-build"):
        cached(tmp_path, "kind", "key1", half, marker=marker)
    assert list((tmp_path / "kind").iterdir()) == []
    built = cached(tmp_path, "kind", "key1", (lambda tmp: tmp.write_text("whole")) if marker is None
                   else (lambda tmp: _fill(tmp, "b")), marker=marker)
    assert not built.hit and (built.path.read_text() == "whole" if marker is None else _whole(built.path))
    assert [p.name for p in (tmp_path / "kind").iterdir()] == ["key1"]


def test_a_folder_without_its_marker_is_built_again(tmp_path):
    stale = tmp_path / "teachers" / "k2"
    stale.mkdir(parents=True)
    (stale / "part0.txt").write_text("from a writer that did not finish")
    msgs = []
    entry = cached(tmp_path, "teachers", "k2", lambda tmp: _fill(tmp, "c"), marker="done.json", what="box",
                   log=msgs.append)
    assert not entry.hit and entry.built == "c" and _whole(entry.path) and not msgs
    assert [p.name for p in (tmp_path / "teachers").iterdir()] == ["k2"]  # the old contents went with the swap


def test_a_builder_that_forgets_the_marker_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="wrote no done.json"):
        cached(tmp_path, "boxes", "k3", lambda tmp: (tmp / "part0.txt").write_text("x"), marker="done.json")
    assert list((tmp_path / "boxes").iterdir()) == []


def _build_at_once(root: str, marker: str | None, tag: str, barrier, out) -> None:
    """One of several processes building the same entry: all start building together and finish together."""
    def build(tmp: Path) -> str:
        barrier.wait(timeout=60)  # every process is inside its builder: none found the entry
        if marker is None:
            tmp.write_text(tag * 10_000)
        else:
            _fill(tmp, tag)
        barrier.wait(timeout=60)  # and all rename at the same moment
        return tag

    try:
        entry = cached(root, "shared", "key-xyz", build, marker=marker)
        barrier.wait(timeout=60)  # read once every rename is done: a folder replaced while being read can mix
        path = entry.path
        text = path.read_text() if marker is None else ("whole" if _whole(path) else "torn")
        out.put((tag, entry.hit, entry.built, str(path), text))
    except BaseException as e:  # noqa: BLE001 - the parent reports it
        out.put((tag, None, None, None, repr(e)))


@pytest.mark.parametrize("marker", [None, "done.json"])
def test_processes_building_the_same_entry_at_once_all_get_it_whole(tmp_path, marker):
    ctx = mp.get_context("spawn")  # no inherited state: each child imports the helper as a new process would
    n, rounds = 4, 5
    for r in range(rounds):
        root = tmp_path / f"round{r}"
        barrier, out = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_build_at_once, args=(str(root), marker, chr(ord("a") + i), barrier, out))
                 for i in range(n)]
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert all(p.exitcode == 0 for p in procs)
        for tag, hit, built, path, text in results:
            assert hit is False and built == tag, (tag, text)  # every one built it, none failed
            assert path == str(root / "shared" / "key-xyz")
            if marker is None:
                assert len(text) == 10_000 and len(set(text)) == 1, text[:50]  # one writer's whole file
            else:
                assert text == "whole"
        entry = root / "shared" / "key-xyz"
        assert (entry.read_text() if marker is None else _whole(entry))  # the last rename's, whole
        assert [p.name for p in (root / "shared").iterdir()] == ["key-xyz"]


def test_a_folder_renamed_in_by_another_process_after_the_look_is_replaced(tmp_path, monkeypatch):
    """The moment the concurrent test can only hit now and then, made certain: another builder renames its whole
    folder in after this one looked (nothing there) and before it renames its own (a rename will not replace a full
    folder). This one's goes in by the swap, and both were whole."""
    import os

    target = tmp_path / "teachers" / "k4"
    real_lexists, raced = os.path.lexists, []

    def lexists(p):
        if Path(p) == target and not raced:
            raced.append(True)
            other = tmp_path / "teachers" / "other-writer"
            other.mkdir()
            _fill(other, "z")
            os.rename(other, target)
            return False  # what the look saw, a moment before
        return real_lexists(p)

    monkeypatch.setattr(os.path, "lexists", lexists)
    entry = cached(tmp_path, "teachers", "k4", lambda tmp: _fill(tmp, "y"), marker="done.json")
    assert raced and not entry.hit and _whole(entry.path) and (entry.path / "done.json").read_text() == "y"
    assert [p.name for p in (tmp_path / "teachers").iterdir()] == ["k4"]
