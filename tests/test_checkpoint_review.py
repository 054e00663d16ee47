"""Review of how checkpoints are written, found, loaded and pruned (vitaclip/engine/checkpoint.py,
vitaclip/files.py): the cases a run on a cluster meets."""
import errno
import os

import pytest
import torch

from vitaclip import files
from vitaclip.engine import checkpoint as ckpt


def test_a_full_disk_reported_only_when_the_written_data_is_synced_names_the_checkpoint(tmp_path, monkeypatch):
    """NFS and Lustre cache writes and report a full disk or a quota when the data is flushed: at the
    fsync before the rename. That OSError named no file ('[Errno 122] Disk quota exceeded'), unlike
    the same failure while writing; the previous checkpoint is kept and no temporary file is left."""
    previous = ckpt.save_checkpoint(tmp_path, 1, {"w": torch.zeros(3)})
    fsync = os.fsync

    def quota_at_flush(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".checkpoint-"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return fsync(fd)

    monkeypatch.setattr(files.os, "fsync", quota_at_flush)
    with pytest.raises(OSError, match=f"Disk quota exceeded: writing checkpoint {tmp_path / 'checkpoint-00000002.pt'}$"
                       ) as raised:
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.ones(3)}, keep=1)
    assert raised.value.errno == errno.EDQUOT
    assert sorted(os.listdir(tmp_path)) == [previous.name]
    assert torch.equal(ckpt.load_checkpoint(previous)["w"], torch.zeros(3))
