"""Worker pools (vitaclip/data/workers.py): progress through a crash, and timeouts in whole seconds of an alarm."""
import shutil

import pytest

pytest.importorskip("av")


def test_the_probe_progress_bar_counts_the_videos_rerun_after_a_crash(vp9_dataset, tmp_path, capsys):
    """map_in_workers calls done() as each call ends, those run again alone after a worker died too: the
    bar of a probe that crashed on one video ends at n/n."""
    from worker_faults import faulty_probe
    from vitaclip.data.lists import read_video_list
    from vitaclip.data.meta import video_infos

    root, rows = vp9_dataset
    names = ["slow0.webm", "crash.webm", "slow2.webm", "v3.webm", "v4.webm"]
    for i, name in enumerate(names):
        shutil.copy(root / rows[i % 3][0], tmp_path / name)
    lst = tmp_path / "list.csv"
    lst.write_text("".join(f"{name},0\n" for name in names))
    infos = video_infos(read_video_list(str(lst), str(tmp_path)), str(lst), str(tmp_path), workers=2,
                        probe=faulty_probe, progress=True)
    assert sum(isinstance(info, Exception) for info in infos) == 1
    bar = capsys.readouterr().err
    assert "probe" in bar and "5/5" in bar, bar


def test_a_timeout_below_a_second_or_with_a_fraction_is_rounded_up_never_down_to_none(tmp_path):
    """signal.alarm counts whole seconds and 0 cancels: a timeout of 0.5 s must still end a hung call, and
    one of 1.5 s must give a call 1.5 s (both rounded up)."""
    import time
    from concurrent.futures.process import BrokenProcessPool

    from vitaclip.data.workers import run_alone, within

    start = time.monotonic()
    hung = run_alone(within, (0.5, time.sleep, 20))  # (time.sleep: interrupted by the alarm's default action)
    assert isinstance(hung.exception(), BrokenProcessPool) and time.monotonic() - start < 10
    assert run_alone(within, (1.5, time.sleep, 1.2)).result() is None


def test_workers_that_cannot_start_are_named_so_not_taken_for_crashes_on_each_call(tmp_path):
    """A script without an `if __name__ == "__main__":` guard: each worker runs it again and dies
    starting, and every video probed was reported as one the decoder crashed on."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text("import os\nfrom vitaclip.data.workers import map_in_workers\n"
                      "print(map_in_workers([(os.getpid,), (os.getpid,)], 2))\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    assert 'worker processes cannot start: a script that makes a loader or runs `prepare` must do so under ' \
           '`if __name__ == "__main__":`' in result.stderr


def test_a_script_read_from_standard_input_is_named_as_such_not_as_unguarded(tmp_path):
    """`python - <<EOF`: the workers look for a main script file '<stdin>' and die starting, guard or
    not; the message spoke of a missing guard."""
    import subprocess
    import sys

    guarded = ("if __name__ == '__main__':\n    import os\n    from vitaclip.data.workers import map_in_workers\n"
               "    print(map_in_workers([(os.getpid,), (os.getpid,)], 2))\n")
    result = subprocess.run([sys.executable, "-"], input=guarded, capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode != 0
    assert ("worker processes cannot start: they import the main script again, and it is not a file (<stdin>): "
            "save it to a file") in result.stderr, result.stderr[-2000:]


def test_a_loader_whose_decoding_workers_cannot_start_says_so_not_that_a_video_failed(vp9_dataset, tmp_path):
    """A script without an `if __name__ == "__main__":` guard iterating over a loader whose videos are all
    in the sidecar (no probe first, whose pool would have said so): the decoding pool's workers die
    starting, and the loader blamed the videos it waited for (a VideoDecodeError) instead."""
    import subprocess
    import sys

    from vitaclip.data import VideoLoader

    root, rows = vp9_dataset
    for name, *_ in rows:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / name, tmp_path / name)
    shutil.copy(root / "list.csv", tmp_path / "list.csv")
    VideoLoader(str(tmp_path / "list.csv"), str(tmp_path), train=False, batch_size=2, num_workers=0)  # the sidecar
    script = tmp_path / "unguarded.py"
    script.write_text("from vitaclip.data import VideoLoader\n"
                      "loader = VideoLoader('list.csv', '.', train=False, batch_size=2, num_workers=1, size=32)\n"
                      "print(next(iter(loader)).video.shape)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert 'worker processes cannot start: a script that makes a loader or runs `prepare` must do so under ' \
           '`if __name__ == "__main__":`' in last, result.stderr[-3000:]


def test_a_crash_of_a_worker_recorded_after_the_pool_listed_its_workers_is_noticed(tmp_path):
    """The pool's manager thread watches the workers it listed when it last woke: one recorded later
    (on a loaded machine the recording can wait seconds), crashing on the last call in flight while
    the other worker is idle, left that call pending for ever, and the job hung."""
    from worker_faults import exits_within

    assert exits_within("""
if __name__ == "__main__":
    from worker_faults import crash_in_the_late_worker, record_second_workers_once_ended
    from vitaclip.data.workers import map_in_workers
    record_second_workers_once_ended(".")
    assert map_in_workers([(crash_in_the_late_worker, ".")] * 2, workers=2) == ["returned"] * 2
    print("done", flush=True)
""", tmp_path, timeout=60)
