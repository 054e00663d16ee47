"""Atomic writes (vitaclip/files.py): beside the target, and nothing half-written left behind."""
import os

import pytest

from vitaclip.files import atomic_write, atomic_write_text


def test_the_temporary_file_is_written_in_the_destinations_folder(tmp_path):
    """A rename is atomic only within one file system: the temporary file must be beside the target (a
    temporary in /tmp made os.replace copy across devices, or fail, for a data set on another disk)."""
    seen = []

    def write(tmp):
        seen.append(tmp)
        with open(tmp, "w") as f:
            f.write("new")

    (tmp_path / "sub").mkdir()
    atomic_write(tmp_path / "sub" / "f.txt", write)
    assert os.path.dirname(os.path.abspath(seen[0])) == str(tmp_path / "sub")
    assert os.path.basename(seen[0]).startswith(".f.txt.")
    assert (tmp_path / "sub" / "f.txt").read_text() == "new" and os.listdir(tmp_path / "sub") == ["f.txt"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_write_that_fails_or_is_interrupted_leaves_the_old_file_and_no_temporary(tmp_path, error):
    atomic_write_text(tmp_path / "f.txt", "old")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise error

    with pytest.raises(type(error)):
        atomic_write(tmp_path / "f.txt", write)
    assert (tmp_path / "f.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]
