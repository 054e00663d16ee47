"""Review of `vitaclip prepare`: a rerun after a first run stopped early, and outputs damaged since
they were finished. Each test here failed before its fix."""
import json
import os
import shutil

import pytest

pytest.importorskip("av")

from vitaclip.data import VideoDecodeError, pyav
from vitaclip.data.prepare import EncodeSettings, SOURCES_FILE, prepare


def run(lst, out, root, short_side, **kw):
    return prepare(str(lst), str(out), str(root), EncodeSettings(short_side=short_side), workers=1,
                   progress=False, **kw)


def test_other_settings_may_follow_a_run_stopped_before_its_first_video_was_finished(vp9_dataset, tmp_path):
    """A first run stopped while its first videos were being encoded (Ctrl-C, or a bad video in raise
    mode) had recorded their sources, but finished none: a second run with other settings was refused
    as one that would mix with 'videos prepared with' the first's."""
    root, rows = vp9_dataset
    (tmp_path / "bad.webm").write_bytes(b"not a video")
    shutil.copy(root / rows[0][0], tmp_path / "good.webm")
    (tmp_path / "src.csv").write_text("bad.webm,0\ngood.webm,1\n")
    out = tmp_path / "out"
    with pytest.raises(VideoDecodeError, match="src.csv:1"):
        run(tmp_path / "src.csv", out, tmp_path, 48)
    assert (out / SOURCES_FILE).read_text()  # its source recorded, its output never made
    result = run(tmp_path / "src.csv", out, tmp_path, 32, on_error="skip")
    assert (result.written, len(result.failed)) == (1, 1)
    assert json.loads((out / "prepare.json").read_text())["short_side"] == 32
    assert min(pyav.probe(str(out / "videos" / "good.mp4")).shown_size) == 32


def test_a_finished_output_that_can_no_longer_be_read_is_made_again(vp9_dataset, tmp_path):
    """An output cut short or damaged after it was finished (a copy of OUT_DIR stopped midway, a disk
    error) was reused for good: every later run failed it ('cannot read video'), in skip mode leaving
    the video out, and never made it again from its unchanged source."""
    root, rows = vp9_dataset
    (tmp_path / "src.csv").write_text(f"{rows[0][0]},0\n{rows[1][0]},1\n")
    out = tmp_path / "out"
    first = run(tmp_path / "src.csv", out, root, 32)
    damaged = out / "videos" / (os.path.splitext(rows[0][0])[0] + ".mp4")
    damaged.write_bytes(damaged.read_bytes()[:len(damaged.read_bytes()) // 3])
    again = run(tmp_path / "src.csv", out, root, 32, on_error="skip")
    assert (again.written, again.reused, again.failed) == (1, 1, [])
    assert pyav.probe(str(damaged)).frames == rows[0][2]
    assert open(again.list_file).read() == open(first.list_file).read()
