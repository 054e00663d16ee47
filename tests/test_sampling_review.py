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
