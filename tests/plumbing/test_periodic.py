import threading

from lifeboat.plumbing.periodic import repeating


def test_the_action_repeats_while_the_block_runs_and_never_after() -> None:
    calls: list[int] = []
    three = threading.Event()

    def action() -> None:
        calls.append(1)
        if len(calls) == 3:
            three.set()

    with repeating(0.01, action, "test-repeater"):
        assert three.wait(30)
    seen = len(calls)
    assert not any(t.name == "test-repeater" for t in threading.enumerate())  # joined on the way out
    assert len(calls) == seen
