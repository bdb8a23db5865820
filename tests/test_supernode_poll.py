"""A deployed SuperNode polls the SuperLink soon after a message, and as Flower does when idle.

Flower 1.42's SuperNode loop sleeps 3 s after every pull that brings nothing; in a SecAgg+
round the device that replied last to a stage has always just found nothing, so each stage
waited about 3 s on it (docs/scale.md, "Deployments"). ``client/supernode_poll.py`` changes
those waits, and the 0.5 s polls of the SuperNode's own state, in Flower's loop module only.
"""

from __future__ import annotations

import subprocess
import sys
import time
import types

import pytest

from fedpgen.client import supernode_poll


def fake_loop_module(pulls: list[int | None]) -> types.SimpleNamespace:
    """A module shaped as ``flwr.supernode.start_client_internal``: ``time`` and the pull."""
    answers = iter(pulls)
    return types.SimpleNamespace(time=time, _pull_and_store_message=lambda *a, **k: next(answers))


def test_waits_after_empty_pulls_start_short_grow_to_flowers_and_restart_after_a_message() -> None:
    slept: list[float] = []
    module = fake_loop_module([None] * 11 + [7, None, None])
    assert supernode_poll.install(module, sleep=slept.append) is not None
    # Flower's loop: pull; nothing -> time.sleep(3); a message -> wait for the reply (0.5 s
    # polls of its state), push, pull again
    for _ in range(14):
        if module._pull_and_store_message(None) is None:
            module.time.sleep(3)
        else:
            module.time.sleep(0.5)
    growing = [0.1 * 1.5 ** k for k in range(10)]  # 0.1 ... 3.84
    assert slept == pytest.approx([*growing[:9], 3.0, 3.0, 0.1, 0.1, 0.15])
    module.time.sleep(0.01)  # any other wait is left as it is
    assert slept[-1] == 0.01
    assert module.time.monotonic is time.monotonic


def test_a_loop_of_another_shape_is_left_unchanged() -> None:
    without_pull = types.SimpleNamespace(time=time)
    assert supernode_poll.install(without_pull) is None and without_pull.time is time
    other_clock = types.SimpleNamespace(time=types.SimpleNamespace(sleep=time.sleep),
                                        _pull_and_store_message=lambda: None)
    before = other_clock._pull_and_store_message
    assert supernode_poll.install(other_clock) is None and other_clock._pull_and_store_message is before


def test_the_installed_flowers_supernode_loop_is_the_shape_it_patches() -> None:
    # In a fresh process (the patch is for the SuperNode's process only): a Flower whose loop
    # changed shape would make this fail, rather than leave deployments at 3 s silently.
    code = ("from fedpgen.client import supernode_poll\n"
            "from flwr.supernode import start_client_internal as m\n"
            "assert supernode_poll.install() is not None\n"
            "assert isinstance(m.time, supernode_poll._Clock)\n"
            "assert m._pull_and_store_message.__name__ == 'pull_and_note'\n"
            "import inspect\n"
            "src = inspect.getsource(m.start_client_internal)\n"
            "assert 'time.sleep(3)' in src and '_pull_and_store_message(' in src\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
