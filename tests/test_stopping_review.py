"""Stop signals given twice, shielded workers and the signals the fork server ignores, signal names
of the wrong type, and the benchmark's count of timed iterations."""
import signal

import pytest

from vitaclip.engine.stopping import StopRequest, parse_signal


def test_a_signal_named_twice_gets_its_previous_handler_back():
    """`--stop-signals TERM,SIGTERM`: installed twice, the second install took the request's own handler
    for the previous one, which uninstall then put back: after the run a SIGTERM was still swallowed."""
    def previous(signum, frame):
        pass

    before = signal.signal(signal.SIGUSR1, previous)
    try:
        request = StopRequest(["SIGUSR1", "usr1"]).install()
        request.uninstall()
        assert signal.getsignal(signal.SIGUSR1) is previous
    finally:
        signal.signal(signal.SIGUSR1, before)


@pytest.mark.parametrize("name", [signal.SIGTERM, 10, None])
def test_a_signal_name_that_is_not_a_str_is_named(name):
    """A settings file's `stop_signals: [10]` or a script's signal.SIGTERM failed with AttributeError: 'int'
    object has no attribute 'strip', naming neither the setting nor the value."""
    with pytest.raises(ValueError, match=f"signal name.*got {name!r}"):
        parse_signal(name)
