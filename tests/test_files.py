"""Atomic writes (vitaclip/files.py): beside the target, and nothing half-written left behind."""
import errno
import os

import pytest

from vitaclip.files import atomic_write, atomic_write_text, sole_writer


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


def test_a_second_sole_writer_of_a_lock_is_refused_until_the_first_leaves(tmp_path):
    """Both writers take the lock through sole_writer (the callers' tests hold it with their own exclusive
    flock, which refuses a shared lock too): two shared holders would both write the folder."""
    lock = tmp_path / "out.lock"
    with sole_writer(lock, "out is being written"):
        with pytest.raises(ValueError, match=r"^out is being written \(it holds .*out\.lock\)$"):
            with sole_writer(lock, "out is being written"):
                pass
    with sole_writer(lock, "out is being written"):  # released when the first left
        pass


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_file_system_that_cannot_lock_files_warns_and_lets_the_writer_go_on(tmp_path, monkeypatch, code):
    """Lustre mounted without flock (ENOSYS), some NFS set-ups (ENOLCK): every run there failed at its start
    with a bare OSError; another error of flock is still raised."""
    from vitaclip import files

    def no_locks(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    ran = False
    with pytest.warns(UserWarning, match=r"out\.lock cannot be locked on this file system .*a second process writing "
                                         r"the same folder would not be refused"):
        with sole_writer(tmp_path / "out.lock", "out is being written"):
            ran = True
    assert ran

    def bad_file(fd, operation):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(files.fcntl, "flock", bad_file)
    with pytest.raises(OSError, match="Bad file descriptor"):
        with sole_writer(tmp_path / "out.lock", "out is being written"):
            pass


def test_a_write_the_system_refuses_is_named_with_its_file(tmp_path):
    """A full disk or a quota (here a file size limit) makes Python's writes raise an OSError naming no
    file, and safetensors a SafetensorError quoting it: each is raised as that OSError, naming the file."""
    import resource
    import subprocess
    import sys

    code = ("import sys, torch\nfrom vitaclip.files import atomic_write_text, save_safetensors\n"
            "for write in (lambda: atomic_write_text(sys.argv[1] + '/config.json', 'x' * 200_000),\n"
            "              lambda: save_safetensors({'w': torch.zeros(100_000)}, sys.argv[1] + '/w.safetensors', {})):\n"
            "    try:\n        write()\n    except OSError as err:\n        print(err.errno, err)")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # noqa: E731
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, preexec_fn=limit)
    assert run.stdout.splitlines() == [f"27 [Errno 27] File too large: writing {tmp_path / name}"
                                       for name in ("config.json", "w.safetensors")], run.stderr
    assert list(tmp_path.iterdir()) == []  # nor half a file
