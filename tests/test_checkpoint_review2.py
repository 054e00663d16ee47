"""Second review of how checkpoints are written (vitaclip/engine/checkpoint.py, vitaclip/files.py): a
researcher's run on a shared cluster file system."""
import errno
import os
import struct

import pytest
import torch

from vitaclip.engine import checkpoint as ckpt


def set_default_acl(folder, user: int, group: int, other: int) -> None:
    """A POSIX default ACL on `folder` (as `setfacl -d -m g::rw,o::-`), written as its extended attribute."""
    entries = [(0x01, user), (0x04, group), (0x10, user | group), (0x20, other)]  # user, group, mask, other
    value = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in entries)
    try:
        os.setxattr(folder, "system.posix_acl_default", value)
    except OSError as error:
        if error.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            pytest.skip(f"no POSIX ACLs here ({error})")
        raise


def test_a_checkpoint_gets_the_permissions_a_plain_open_gives_in_a_folder_with_a_default_acl(tmp_path):
    """Shared project folders grant the group through a default ACL, which the kernel applies instead
    of the umask. atomic_write created its temporary file 0600 (mkstemp) and then set 0666 less the
    umask: the ACL's mask came out of that, so under umask 077 the group could not read the run's
    checkpoints that a plain open() gives it (0660)."""
    set_default_acl(tmp_path, user=6, group=6, other=0)
    before = os.umask(0o077)
    try:
        with open(tmp_path / "plain", "w"):
            pass
        path = ckpt.save_checkpoint(tmp_path, 1, {"w": torch.zeros(3)})
    finally:
        os.umask(before)
    assert oct((tmp_path / "plain").stat().st_mode & 0o777) == "0o660"
    assert oct(path.stat().st_mode & 0o777) == "0o660"


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """Pruning kept the highest steps: with a higher one already there (another run's, in a folder
    that cannot be locked), the checkpoint just written was deleted at once."""
    ckpt.save_checkpoint(tmp_path, 9, {"step": 9})
    written = ckpt.save_checkpoint(tmp_path, 3, {"step": 3}, keep=1)
    assert written.exists() and [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "checkpoint-00000003.pt", "checkpoint-00000009.pt"]


def test_an_old_checkpoint_that_cannot_be_deleted_is_warned_of(tmp_path, monkeypatch):
    """An old checkpoint that could not be deleted (another user's, in a sticky scratch folder) stopped
    the run right after a good checkpoint was written, and again after every resume."""
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1})
    removed = ckpt.remove_checkpoint

    def refused(path):
        if path.name == "checkpoint-00000001.pt":
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        removed(path)

    monkeypatch.setattr(ckpt, "remove_checkpoint", refused)
    with pytest.warns(UserWarning, match="could not delete the old checkpoint .*checkpoint-00000001.pt"):
        written = ckpt.save_checkpoint(tmp_path, 2, {"step": 2}, keep=1)
    assert written.exists()


def test_a_step_set_aside_twice_keeps_both_unreadable_copies(tmp_path):
    """The second checkpoint of a step found unreadable replaced the first one set aside, which the
    docstring says is kept."""
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1})
    for damage in (b"first damage", b"second damage"):
        ckpt.checkpoint_path(tmp_path, 2).write_bytes(damage)
        with pytest.warns(UserWarning, match="cannot be read"):
            path, _ = ckpt.load_latest_checkpoint(tmp_path)
        assert path.name == "checkpoint-00000001.pt"
    assert (tmp_path / "checkpoint-00000002.pt.unreadable").read_bytes() == b"first damage"
    assert (tmp_path / "checkpoint-00000002.pt.unreadable.1").read_bytes() == b"second damage"


def test_steps_past_eight_digits_are_listed_in_order(tmp_path):
    """checkpoint-100000000.pt (nine digits) was not a checkpoint to the listing: resume went back to
    step 99,999,999, and pruning never removed it."""
    for step in (99_999_999, 100_000_000):
        ckpt.save_checkpoint(tmp_path, step, {"step": step})
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == [99_999_999, 100_000_000]
    assert ckpt.load_latest_checkpoint(tmp_path)[1]["step"] == 100_000_000


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_load_model_refuses_a_file_of_a_saved_model_folder_naming_the_folder(tmp_path, name):
    """Its weights file was read as the authors' checkpoint (asking for heads, then scoring without the saved
    config and training settings); only the command line refused it."""
    from engine_helpers import tiny_model

    tiny_model().save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=f"is a file of the saved model {tmp_path / 'model'}: load the folder"):
        ckpt.load_model(tmp_path / "model" / name, ["a", "b"])
    assert ckpt.load_model(tmp_path / "model").config == tiny_model().config
