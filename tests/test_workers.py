"""DataLoader workers are capped at the CPU cores the process may use, and the cap is reported once."""
import logging
import os

import pytest

from fuselip_med.data import workers


@pytest.fixture()
def two_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(workers, "_warned", set())


def test_a_request_for_eight_on_two_cores_runs_two_and_says_so_once(two_cores, caplog):
    with caplog.at_level(logging.WARNING, logger="fuselip_med.data.workers"):
        assert workers.usable_workers(8, "data.num_workers") == 2
        assert workers.usable_workers(8, "data.num_workers") == 2
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["data.num_workers=8 asks for more workers than the 2 CPU cores this process may use; using 2."]


def test_requests_within_the_cores_are_kept(two_cores, caplog):
    with caplog.at_level(logging.WARNING):
        assert [workers.usable_workers(n) for n in (0, 1, 2)] == [0, 1, 2]
    assert not caplog.records
    with pytest.raises(ValueError, match="num_workers=-1"):
        workers.usable_workers(-1)


def test_usable_cores_follows_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert workers.usable_cores() == 1


def test_the_embedder_caps_its_workers(two_cores):
    from fuselip_med.inference.engine import Embedder

    assert Embedder(object(), num_workers=8, device="cpu").num_workers == 2
