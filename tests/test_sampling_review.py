"""Review of sampling, transforms and meta: each test checks one rule that the code broke."""
import pytest

from vitaclip.data.meta import read_meta

ROW = '"path": "a.webm", "frames": 3, "height": 2, "width": 2, "codec": "vp9"'


@pytest.mark.parametrize("line", ['["a.webm", 3]', '"a.webm"', '{' + ROW + ', "turns": 0, "pixel_aspect": "1/0"}'])
def test_a_sidecar_line_that_is_no_row_is_named_by_its_file_and_line(tmp_path, line):
    """A line of JSON that is not an object, or a pixel shape of zero height, came out as an AttributeError
    ('list' object has no attribute 'get') or a ZeroDivisionError ('Fraction(1, 0)'), naming neither the
    sidecar nor the line, unlike every other bad line."""
    sidecar = tmp_path / "list.csv.meta"
    sidecar.write_text("{" + ROW + "}\n" + line + "\n")
    with pytest.raises(ValueError, match=r"list\.csv\.meta:2: bad metadata line"):
        read_meta(str(sidecar))


def test_a_list_none_of_whose_videos_is_there_asks_about_the_data_root(tmp_path):
    """`vitaclip eval --list val.txt` without --data-root said only 'val.txt:1 (...): file not found';
    with no video of the list there, the data root is the likely fault, and is named."""
    from vitaclip.data.lists import read_video_list
    from vitaclip.data.meta import video_infos

    lst = tmp_path / "val.txt"
    lst.write_text("test/a.mp4,0\ntest/b.mp4,1\n")
    errors = video_infos(read_video_list(str(lst), str(tmp_path)), str(lst), str(tmp_path), workers=1)
    assert all("file not found; none of the 2 videos of" in str(e) and "(--data-root)" in str(e) for e in errors)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "a.mp4").write_bytes(b"not a video")  # one is there: the root is right
    errors = video_infos(read_video_list(str(lst), str(tmp_path)), str(lst), str(tmp_path), workers=1)
    assert "--data-root" not in str(errors[1]) and "file not found" in str(errors[1])
