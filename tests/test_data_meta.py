"""The sidecar of probed video infos (vitaclip/data/meta.py): when a row holds, and an unwritable folder."""
import dataclasses
import os
import shutil

import pytest

pytest.importorskip("av")

from vitaclip.data import meta
from vitaclip.data.lists import read_video_list
from vitaclip.data.meta import meta_path, read_meta, video_infos, write_meta


def one_video(vp9_dataset, tmp_path):
    root, rows = vp9_dataset
    shutil.copy(root / rows[0][0], tmp_path / "v.webm")
    lst = tmp_path / "list.csv"
    lst.write_text("v.webm,0\n")
    return str(lst), rows[0][2]


def test_a_sidecar_row_of_a_file_of_the_same_size_but_another_time_is_probed_again(vp9_dataset, tmp_path):
    """A row holds while its file keeps its size AND modification time: a video rewritten in place at the
    same size (re-encoded with fixed-size frames, a copy without -a) is another video."""
    lst, frames = one_video(vp9_dataset, tmp_path)
    entries = read_video_list(lst, str(tmp_path))
    (info,) = video_infos(entries, lst, str(tmp_path), workers=1)
    assert info.frames == frames
    size, mtime_ns = info.stamp
    # the row of the file as it was before: the same size, an earlier time, another frame count
    earlier = dataclasses.replace(info, frames=frames + 7, stamp=(size, mtime_ns - 10**9))
    write_meta(meta_path(lst), [("v.webm", earlier)])
    (again,) = video_infos(entries, lst, str(tmp_path), workers=1)
    assert (again.frames, again.stamp) == (frames, (size, mtime_ns))
    assert read_meta(meta_path(lst))["v.webm"].frames == frames  # recorded anew


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_video_listed_twice_is_named_at_each_of_its_lines(vp9_dataset, tmp_path, workers):
    """A video listed twice is one key: its failure named the last line for both entries."""
    lst, _ = one_video(vp9_dataset, tmp_path)
    (tmp_path / "empty.webm").write_bytes(b"")
    with open(lst, "a") as f:
        f.write("empty.webm,0\nmissing.webm,1\nempty.webm,1\nv.webm,1\nmissing.webm,0\n")
    infos = video_infos(read_video_list(lst, str(tmp_path)), lst, str(tmp_path), workers=workers)
    assert infos[0].frames == infos[4].frames
    named = [str(infos[i]) for i in (1, 2, 3, 5)]
    assert [n.split(" ")[0] for n in named] == [f"{lst}:{line}" for line in (2, 3, 4, 6)]
    assert ["empty file" in n for n in named] == [True, False, True, False]


def test_an_unstamped_row_of_a_video_gone_since_is_not_taken_for_it(vp9_dataset, tmp_path):
    """A row recorded without a stamp (another node probed a copy this node lacks) never holds: with the
    video gone here, its missing stamp must not pass for the row's (none either), and probing names it."""
    from vitaclip.data import VideoDecodeError

    lst, _ = one_video(vp9_dataset, tmp_path)
    entries = read_video_list(lst, str(tmp_path))
    (info,) = video_infos(entries, lst, str(tmp_path), workers=1)
    write_meta(meta_path(lst), [("v.webm", dataclasses.replace(info, stamp=None))])
    os.remove(tmp_path / "v.webm")
    (gone,) = video_infos(entries, lst, str(tmp_path), workers=1)
    assert isinstance(gone, VideoDecodeError) and "list.csv:1" in str(gone) and "file not found" in str(gone)


def test_a_row_whose_file_cannot_be_stated_is_probed_again_not_an_error(vp9_dataset, tmp_path):
    """A video's folder replaced by a file (stat fails with ENOTDIR, not ENOENT): its row does not hold, and
    probing names the line, as for a video gone."""
    from vitaclip.data import VideoDecodeError

    root, rows = vp9_dataset
    (tmp_path / "sub").mkdir()
    shutil.copy(root / rows[0][0], tmp_path / "sub" / "v.webm")
    lst = str(tmp_path / "list.csv")
    (tmp_path / "list.csv").write_text("sub/v.webm,0\n")
    entries = read_video_list(lst, str(tmp_path))
    assert video_infos(entries, lst, str(tmp_path), workers=1)[0].frames == rows[0][2]  # recorded
    shutil.rmtree(tmp_path / "sub")
    (tmp_path / "sub").write_text("not a folder")
    (gone,) = video_infos(entries, lst, str(tmp_path), workers=1)
    assert isinstance(gone, VideoDecodeError) and "list.csv:1" in str(gone)


def test_a_sidecar_that_cannot_be_written_is_left_as_it_is(vp9_dataset, tmp_path, monkeypatch, caplog):
    """A read-only data set's folder: the probed infos are used, and the sidecar is written another time;
    a warning says so (every run probes them again, silently before)."""
    lst, frames = one_video(vp9_dataset, tmp_path)

    def read_only(path, infos):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(meta, "write_meta", read_only)
    (info,) = video_infos(read_video_list(lst, str(tmp_path)), lst, str(tmp_path), workers=1)
    assert info.frames == frames and not os.path.exists(meta_path(lst))
    assert "the 1 videos probed are probed again next time: their sidecar cannot be written ([Errno 13] " \
           "Permission denied" in caplog.text


def probe_own_copies_as_two_ranks(rank, world_size, port, folders, keep_log=False):
    """video_infos(shared=True) of this rank's list, under its own data root (a node's own copy of the data
    set, with its own sidecar); the result pickled beside the list, and its warnings logged to
    `<list>.rank<RANK>.log` if `keep_log`."""
    import logging
    import pickle

    import torch
    from ranks import rank_of_two
    from worker_faults import recording_probe
    from vitaclip.data import meta as meta_module
    from vitaclip.data.lists import read_video_list

    root = folders[rank]
    lst = os.path.join(root, "list.csv")
    if keep_log:
        logging.getLogger("vitaclip").addHandler(logging.FileHandler(f"{lst}.rank{rank}.log"))
    with rank_of_two(rank, world_size, port):
        torch.distributed.init_process_group("gloo")
        infos = meta_module.video_infos(read_video_list(lst, root), lst, root, workers=1, probe=recording_probe,
                                        shared=True)
        with open(f"{lst}.rank{rank}.pickle", "wb") as f:
            pickle.dump(infos, f)


def node_copies(vp9_dataset, tmp_path, probe_here: bool):
    """Two nodes' own copies of the data set, made at other times (copy: a new modification time), with
    their list; each with a sidecar that describes it if `probe_here`. Their folders."""
    import time

    root, rows = vp9_dataset
    folders = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    for folder in folders:
        os.makedirs(folder)
        for i, (name, _, _, _) in enumerate(rows):
            shutil.copy(root / name, os.path.join(folder, f"v{i}.webm"))
        lst = os.path.join(folder, "list.csv")
        with open(lst, "w") as f:
            f.write("".join(f"v{i}.webm,{i}\n" for i in range(len(rows))))
        if probe_here:
            video_infos(read_video_list(lst, folder), lst, folder, workers=1)
        time.sleep(0.05)
    return folders


def probed_and_got(folder, rank):
    """(the videos rank `rank` probed in `folder`, the infos it got), and forgets what it probed."""
    import pickle

    lst = os.path.join(folder, "list.csv")
    probed = []
    if os.path.exists(f"{lst}.probed-rank{rank}"):
        with open(f"{lst}.probed-rank{rank}") as f:
            probed = f.read().split()
        os.remove(f"{lst}.probed-rank{rank}")
    with open(f"{lst}.rank{rank}.pickle", "rb") as f:
        return probed, pickle.load(f)


def assert_a_job_probes_nothing(folders, frames):
    """A job of two ranks, one per node's copy, probes nothing and gets every video's frame count."""
    from ranks import run_ranks

    run_ranks(probe_own_copies_as_two_ranks, folders)
    for rank, folder in enumerate(folders):
        probed, infos = probed_and_got(folder, rank)
        assert probed == [], "probed again"
        assert [info.frames for info in infos] == frames


def test_nodes_whose_copies_differ_in_time_only_probe_nothing_again(vp9_dataset, tmp_path):
    """Two nodes, each with its own copy of the data set (made at other times) and its own sidecar that
    describes it: the ranks agree on what the rows say of the videos, their files' stamps aside, and probe
    nothing (comparing the stamps too made every job probe the whole data set again)."""
    folders = node_copies(vp9_dataset, tmp_path, probe_here=True)
    stamps = [read_meta(meta_path(os.path.join(f, "list.csv")))["v0.webm"].stamp for f in folders]
    assert stamps[0] != stamps[1]
    assert_a_job_probes_nothing(folders, [r[2] for r in vp9_dataset[1]])


def test_a_new_data_set_probed_across_nodes_is_recorded_with_each_nodes_own_file_stamps(vp9_dataset, tmp_path):
    """A data set new to both nodes: each rank probes its share on its own copy, and each node's sidecar
    records every video with the stamp of its own file, so the next job probes nothing (rows stamped
    with the other node's copy never held: every job probed again the videos the other rank had)."""
    from ranks import run_ranks

    folders = node_copies(vp9_dataset, tmp_path, probe_here=False)
    run_ranks(probe_own_copies_as_two_ranks, folders)
    shares = [probed_and_got(folder, rank)[0] for rank, folder in enumerate(folders)]
    assert sorted(shares[0] + shares[1]) == ["v0.webm", "v1.webm", "v2.webm"] and all(shares)  # split, once each
    for folder in folders:
        rows = read_meta(meta_path(os.path.join(folder, "list.csv")))
        for name, info in rows.items():
            stat = os.stat(os.path.join(folder, name))
            assert info.stamp == (stat.st_size, stat.st_mtime_ns), (folder, name)
    assert_a_job_probes_nothing(folders, [r[2] for r in vp9_dataset[1]])


def test_a_copy_of_another_size_than_the_one_another_rank_probed_is_not_recorded(vp9_dataset, tmp_path):
    """A node whose copy of a video differs in size from the one another node probed holds another file:
    its sidecar does not record that probe as its own (so it is probed again), and the rank says so."""
    from ranks import run_ranks

    folders = node_copies(vp9_dataset, tmp_path, probe_here=False)
    with open(os.path.join(folders[1], "v0.webm"), "ab") as f:  # rank 0 probes v0 and v2 (key order, in turn)
        f.write(b"\0")
    os.remove(os.path.join(folders[1], "v2.webm"))
    run_ranks(probe_own_copies_as_two_ranks, folders, True)
    assert probed_and_got(folders[0], 0)[0] == ["v0.webm", "v2.webm"]
    with open(os.path.join(folders[1], "list.csv.rank1.log")) as f:
        logged = f.read()
    assert "1 videos of" in logged and "differ in size here from the copy another rank probed (e.g. " \
        f"{os.path.join(folders[1], 'v0.webm')})" in logged
    assert f"are missing here, unlike the copy another rank probed (e.g. {os.path.join(folders[1], 'v2.webm')})" \
        in logged
    rows = read_meta(meta_path(os.path.join(folders[1], "list.csv")))
    for name in ("v0.webm", "v2.webm"):
        assert name not in rows or rows[name].stamp is None
    assert rows["v1.webm"].stamp[0] == os.path.getsize(os.path.join(folders[1], "v1.webm"))


def test_file_stamps_are_read_a_slice_of_the_videos_per_thread_task(monkeypatch):
    """The stat of each video runs in threads, a slice of the list per task, not a task per video (whose
    pool bookkeeping cost more than the stat: seconds for a list of Kinetics' size at each start)."""
    from concurrent.futures import ThreadPoolExecutor

    from vitaclip.data.meta import threaded_map

    submitted = []
    real = ThreadPoolExecutor.submit
    monkeypatch.setattr(ThreadPoolExecutor, "submit", lambda self, *a, **k: submitted.append(1) or real(self, *a, **k))
    rows = list(range(10_000))
    assert threaded_map(lambda a, b: a * b, rows, rows[::-1], workers=4) == [a * b for a, b in zip(rows, rows[::-1])]
    assert len(submitted) <= 16
    assert threaded_map(lambda a: a, [], workers=4) == [] and threaded_map(str, [1, 2, 3], workers=16) == ["1", "2", "3"]
