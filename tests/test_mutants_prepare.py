"""Behaviour of `prepare` and the list readers that mutation testing found unpinned by the other tests."""
import os

import pytest

from vitaclip.data.lists import read_class_names, read_video_list

pytest.importorskip("av")

from vitaclip.data import pyav  # noqa: E402
from vitaclip.data.prepare import EncodeSettings, output_name, output_size, prepare  # noqa: E402


@pytest.mark.parametrize("text, names", [
    ("index,class\n0,run\n1,jump\n", ["run", "jump"]),
    ("label,name\n1,ApplyEyeMakeup\n2,BrushHair\n", ["apply eye makeup", "brush hair"]),
])
def test_a_csv_header_above_numbered_rows_is_not_read_as_a_class(tmp_path, text, names):
    path = tmp_path / "classes.csv"
    path.write_text(text)
    assert read_class_names(str(path)) == names


@pytest.mark.parametrize("fields", [{"short_side": 2}, {"gop": 1}, {"crf": 0}, {"crf": 51}])
def test_encoder_settings_at_the_ends_of_their_ranges_are_accepted(fields):
    assert getattr(EncodeSettings(**fields), next(iter(fields))) == next(iter(fields.values()))


@pytest.mark.parametrize("fields, problem", [({"short_side": 1}, "short_side must be >= 2, got 1"),
                                             ({"gop": 0}, "gop must be >= 1, got 0"),
                                             ({"crf": -1}, r"crf must be in \[0, 51\]"),
                                             ({"crf": 52}, r"crf must be in \[0, 51\]")])
def test_encoder_settings_just_outside_their_ranges_are_refused(fields, problem):
    with pytest.raises(ValueError, match=problem):
        EncodeSettings(**fields)


def test_prepared_videos_keep_their_orientation_the_short_side_scaled(vp9_dataset, tmp_path):
    root, rows = vp9_dataset
    short_side = 48
    result = prepare(str(root / "list.csv"), str(tmp_path / "out"), str(root), EncodeSettings(short_side=short_side),
                     workers=1, progress=False)
    assert result.failed == []
    entries = read_video_list(result.list_file, str(tmp_path / "out"))
    assert len(entries) == len(rows)
    for entry, (name, _, _, _) in zip(entries, rows):
        source, prepared = pyav.probe(os.path.join(root, name)), pyav.probe(entry.path)
        assert source.width != source.height  # (else orientation says nothing)
        assert (prepared.height, prepared.width) == output_size(source.height, source.width, short_side)
        assert (prepared.width > prepared.height) == (source.width > source.height)


def test_an_absolute_source_without_a_data_root_goes_under_videos_not_next_to_itself(tmp_path):
    source = str(tmp_path / "data" / "a" / "x.avi")
    name = output_name(source, "")
    assert not os.path.isabs(name)
    assert name == os.path.join("videos", source.lstrip(os.sep)[:-len(".avi")] + ".mp4")
    assert os.path.join(str(tmp_path / "out"), name).startswith(str(tmp_path / "out") + os.sep)
