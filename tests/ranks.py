"""Two spawned processes as the ranks of a gloo group on the CPU, for the distributed tests."""
import contextlib
import os
import time

import pytest
import torch
import torch.multiprocessing as mp


def run_ranks(worker, *args, timeout: float = 120.0) -> None:
    """worker(rank, 2, port, *args) in two processes; ranks that wait on each other fail the test.
    This process serves their rendezvous store on `port`, as torchrun's agent does: it holds the port
    from the start (a free port looked up for the ranks to bind could be taken in between)."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    context = mp.start_processes(worker, args=(2, store.port, *args), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {timeout} s")


@contextlib.contextmanager
def rank_of_two(rank: int, world_size: int, port: int):
    """This spawned process as rank `rank` of the run_ranks group, left when the block ends."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
