"""conftest.run_in_own_process: a child that crashes says where (a GPU run's segmentation fault left
only 'exit status -11' to go on)."""
import pytest

from conftest import run_in_own_process


def test_a_crashing_body_reports_what_it_printed_and_its_python_stack():
    with pytest.raises(AssertionError) as failure:
        run_in_own_process("""
            import ctypes
            print("first call done", flush=True)

            def crashing_call():
                ctypes.string_at(0)  # a segmentation fault

            crashing_call()
        """)
    message = str(failure.value)
    assert "exit status -11" in message
    assert "first call done" in message  # which calls ran before the crash
    assert "Fatal Python error: Segmentation fault" in message and "crashing_call" in message


def test_a_body_that_ends_normally_returns_what_it_printed():
    assert run_in_own_process('print("done")').split() == ["done"]
