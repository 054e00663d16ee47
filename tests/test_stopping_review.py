"""Stop signals given twice, shielded workers and the signals the fork server ignores, signal names
of the wrong type, and the benchmark's count of timed iterations."""
import signal

from vitaclip.engine.stopping import StopRequest


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
