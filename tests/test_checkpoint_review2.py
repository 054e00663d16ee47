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
