"""Two spawned processes as the ranks of a gloo group on the CPU, for the distributed tests."""
import contextlib
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, *args, timeout: float = 120.0) -> None:
    """worker(rank, 2, port, *args) in two processes; ranks that wait on each other fail the test."""
    context = mp.start_processes(worker, args=(2, free_port(), *args), nprocs=2, join=False, start_method="spawn")
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
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
