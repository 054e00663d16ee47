"""Behaviour of the video-info sidecar (vitaclip/data/meta.py: the probe, the cached `<list>.meta` rows, the
ranks' sharing of probes, the display read off old rows) that mutation testing found unpinned by the other
tests. The ranks' tests run two threads of this process as the ranks of a default group, with the workers'
reads done in-process, so they need neither PyAV nor spawned processes."""
import os
import pickle
import threading
from fractions import Fraction

import pytest
import torch

from vitaclip.data import meta
from vitaclip.data.lists import read_video_list
from vitaclip.data.meta import meta_path, read_meta, write_meta
from vitaclip.data.pyav import VideoDecodeError, VideoInfo, stamp_or_none


class ThreadRanks:
    """Threads of this process as the ranks of torch.distributed's default group: the calls meta.py (and
    engine.distributed.gathered_on_every_rank) make, answered in-process, each object sent through
    pickle as gloo sends it. A rank that raises breaks the others' wait instead of leaving them waiting."""

    def __init__(self, monkeypatch, world: int = 2):
        self.world, self.local = world, threading.local()
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots = [None] * world
        dist = torch.distributed
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: self.local.rank)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
        monkeypatch.setattr(dist, "all_gather_object", self.all_gather_object)

    def all_gather_object(self, out, obj, group=None):
        self.slots[self.local.rank] = pickle.dumps(obj)
        self.barrier.wait()
        out[:] = [pickle.loads(sent) for sent in self.slots]
        self.barrier.wait()

    def run(self, work):
        """[work(rank) for each rank], run at once; the first rank's error (not a broken wait) raised."""
        outcomes = [None] * self.world

        def one(rank):
            self.local.rank = rank
            try:
                outcomes[rank] = (True, work(rank))
            except BaseException as error:  # noqa: BLE001 - handed to the test's thread
                outcomes[rank] = (False, error)
                self.barrier.abort()

        threads = [threading.Thread(target=one, args=(rank,)) for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        errors = [value for done, value in outcomes if not done]
        if errors:
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return [value for _, value in outcomes]


def display_of(path):
    """A made-up display per file (matrix, quarter turns, pixel shape), from its size."""
    size = os.path.getsize(path)
    return "bt709", size % 4, Fraction(size, 3)


def probe_by_size(entry):
    """A made-up probe: frames from the file's size ("bad" in its name: a video that cannot be read)."""
    if "bad" in os.path.basename(entry.path):
        return VideoDecodeError(f"{entry.where()}: cannot read video")
    return VideoInfo(os.path.getsize(entry.path), 2, 4, "vp9", stamp_or_none(entry.path), *display_of(entry.path))


def read_in_process(reads: list):
    """meta._read_in_workers in this process (each rank's thread), recording (rank, probed, displays read)."""
    def read(probe, to_probe, to_show, workers, timeout, progress):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        reads.append((rank, sorted(os.path.basename(e.path) for e in to_probe),
                      sorted(os.path.basename(e.path) for e in to_show)))
        return [probe(e) for e in to_probe], [display_of(e.path) for e in to_show]
    return read


def node_folders(tmp_path, names, world=2):
    """Each rank's own copy of the videos (files of 1..n bytes), with the list of them: their folders."""
    folders = []
    for rank in range(world):
        folder = tmp_path / f"node{rank}"
        folder.mkdir()
        for i, name in enumerate(names):
            (folder / name).write_bytes(b"x" * (i + 1))
        (folder / "list.csv").write_text("".join(f"{name},0\n" for name in names))
        folders.append(str(folder))
    return folders


@pytest.fixture
def ranks(monkeypatch):
    """(ThreadRanks of two, the in-process reads they made)."""
    reads = []
    monkeypatch.setattr(meta, "_read_in_workers", read_in_process(reads))
    monkeypatch.setattr(meta.pyav, "available", lambda: True)
    return ThreadRanks(monkeypatch), reads


def shared_infos(folders, rank):
    lst = os.path.join(folders[rank], "list.csv")
    return meta.video_infos(read_video_list(lst, folders[rank]), lst, folders[rank], workers=1,
                            probe=probe_by_size, shared=True)


def test_a_sidecar_with_blank_lines_is_read_row_by_row(tmp_path):
    """Blank lines (a sidecar edited or put together by hand) are skipped, as in the lists; taken for rows,
    they failed as bad JSON and the whole list could not be loaded."""
    info = VideoInfo(5, 2, 4, "vp9", (10, 20), "bt709", 1, Fraction(3, 2))
    write_meta(str(tmp_path / "a.meta"), [("a.webm", info), ("b.webm", info)])
    first, second = open(tmp_path / "a.meta").read().splitlines()
    (tmp_path / "b.meta").write_text(f"\n{first}\n\n  \n{second}\n\n")
    assert read_meta(str(tmp_path / "b.meta")) == {"a.webm": info, "b.webm": info}


def test_probing_new_videos_leaves_the_sidecars_other_rows_in_it(tmp_path, monkeypatch):
    """A video added to a list: its probe is added to the sidecar, whose rows of the others stay (written
    alone, the next run found every other video missing from it and probed them all again)."""
    monkeypatch.setattr(meta.pyav, "available", lambda: True)
    monkeypatch.setattr(meta, "_read_in_workers", read_in_process([]))
    folder = node_folders(tmp_path, ["a.webm", "b.webm"], world=1)[0]
    lst = os.path.join(folder, "list.csv")
    meta.video_infos(read_video_list(lst, folder), lst, folder, workers=1, probe=probe_by_size)
    (tmp_path / "node0" / "c.webm").write_bytes(b"abc")
    with open(lst, "a") as f:
        f.write("c.webm,1\n")
    infos = meta.video_infos(read_video_list(lst, folder), lst, folder, workers=1, probe=probe_by_size)
    assert sorted(read_meta(meta_path(lst))) == ["a.webm", "b.webm", "c.webm"]
    assert [read_meta(meta_path(lst))[name] for name in ("a.webm", "b.webm", "c.webm")] == infos


def test_ranks_split_the_reading_of_displays_of_old_rows_and_all_get_every_one(tmp_path, ranks):
    """Sidecar rows written before the display was recorded, alike on both ranks: each rank reads the
    display of its share of the videos, once each, and every rank gets all of them."""
    threads, reads = ranks
    names = [f"v{i}.webm" for i in range(5)]
    folders = node_folders(tmp_path, names)
    for folder in folders:
        rows = [(name, VideoInfo(i + 1, 2, 4, "vp9", stamp_or_none(os.path.join(folder, name)), None, None, None))
                for i, name in enumerate(names)]
        write_meta(meta_path(os.path.join(folder, "list.csv")), rows)
    got = threads.run(lambda rank: shared_infos(folders, rank))
    assert all(probed == [] for _, probed, _ in reads)
    shares = [shown for _, _, shown in sorted(reads)]
    assert len(shares) == 2 and all(shares) and sorted(shares[0] + shares[1]) == names
    for rank, infos in enumerate(got):
        want = [display_of(os.path.join(folders[rank], name)) for name in names]
        assert [(i.matrix, i.turns, i.pixel_aspect) for i in infos] == want
        assert [i.frames for i in infos] == [1, 2, 3, 4, 5]


def test_a_video_that_fails_its_probe_on_one_rank_fails_on_every_rank(tmp_path, ranks):
    """New videos probed across ranks, one unreadable: every rank gets its error (named at its line) and
    the others' infos; its failure is not taken for an info to stamp with this rank's file."""
    threads, reads = ranks
    names = ["a.webm", "bad.webm", "c.webm", "d.webm"]
    folders = node_folders(tmp_path, names)
    got = threads.run(lambda rank: shared_infos(folders, rank))
    assert sorted(name for _, probed, _ in reads for name in probed) == sorted(names)  # once each
    for rank, infos in enumerate(got):
        assert isinstance(infos[1], VideoDecodeError) and "list.csv:2" in str(infos[1])
        assert [i.frames for i in infos[:1] + infos[2:]] == [1, 3, 4]
        assert "bad.webm" not in read_meta(meta_path(os.path.join(folders[rank], "list.csv")))


def test_file_stamps_are_read_in_more_slices_than_threads(monkeypatch):
    """A few slices of the list per thread, not one: a thread stuck on a slow region of the disk (or of a
    network file system) would otherwise hold up a whole quarter of the list alone."""
    from concurrent.futures import ThreadPoolExecutor

    submitted = []
    real = ThreadPoolExecutor.submit
    monkeypatch.setattr(ThreadPoolExecutor, "submit", lambda self, *a, **k: submitted.append(1) or real(self, *a, **k))
    rows = list(range(1000))
    assert meta.threaded_map(lambda a: -a, rows, workers=4) == [-a for a in rows]
    assert len(submitted) > 4


def test_a_one_byte_file_is_no_video_not_an_empty_file(tmp_path):
    """Only a file of 0 bytes is "empty" (what the probe says without opening it); a file of one byte is a
    damaged video, which PyAV fails to open, named at its list line as the other failures are."""
    pytest.importorskip("av")
    (tmp_path / "v.webm").write_bytes(b"x")
    lst = str(tmp_path / "list.csv")
    (tmp_path / "list.csv").write_text("v.webm,0\n")
    (entry,) = read_video_list(lst, str(tmp_path))
    error = meta._probe(entry)  # what a probing worker runs for each new video
    assert isinstance(error, VideoDecodeError)
    assert str(error).startswith(f"{lst}:1: ") and "empty file" not in str(error)
