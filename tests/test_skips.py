"""SkipReport: the one skip report (counts per reason, every entry named, CSV, pickling for DataLoader workers)."""
from __future__ import annotations

import collections
import csv
import pickle

from fuselip_med.data.collate import SkipCounter
from fuselip_med.data.skips import SkipReport


def test_counts_entries_summary_csv_and_pickle(tmp_path):
    report = SkipReport()
    for i in range(4):
        report.add(f"ID{i}", f"t.csv, line {i + 2}", "missing image", f"no ID{i}.jpg")
    report.add("ID9", "t.csv, line 11", "empty caption")
    report.kept = 5
    report.hint("3 row(s) of t.csv are not valid UTF-8")
    assert dict(report) == {"missing image": 4, "empty caption": 1} and report.total == 5
    assert report.summary() == ("skipped 5 of 10 rows: 4 missing image (e.g. ID0, ID1, ID2); 1 empty caption "
                                "(e.g. ID9). 3 row(s) of t.csv are not valid UTF-8")
    assert report.as_dict()["examples"] == {"missing image": ["ID0", "ID1", "ID2"], "empty caption": ["ID9"]}
    path = report.write_csv(tmp_path / "out" / "skipped.csv")
    rows = list(csv.reader(open(path, encoding="utf-8")))
    assert rows[0] == ["id", "source", "reason", "detail"] and len(rows) == 6
    assert rows[1] == ["ID0", "t.csv, line 2", "missing image", "no ID0.jpg"]
    clone = pickle.loads(pickle.dumps(report))
    assert clone.entries == report.entries and dict(clone) == dict(report) and clone.hints == report.hints


def test_merging_reports_and_plain_counters():
    a, b = SkipReport(), SkipReport()
    a.add("x", "s", "missing image")
    b.add("y", "s", "corrupt image")
    merged = SkipReport.merged([a, b, collections.Counter({"legacy reason": 2}), None])
    assert dict(merged) == {"missing image": 1, "corrupt image": 1, "legacy reason": 2}
    assert [e.id for e in merged.entries] == ["x", "y"]  # a plain Counter adds counts it cannot name
    counter = collections.Counter()
    counter.update(merged)  # the trainer adds source skips to a Counter this way
    assert counter == {"missing image": 1, "corrupt image": 1, "legacy reason": 2}


def test_skip_counter_is_a_skip_report():
    counter = SkipCounter()
    counter.update([("a.png", "missing file"), ("src/7", "empty caption")])
    assert isinstance(counter, SkipReport) and counter.total == 2
    assert [(e.id, e.reason) for e in counter.entries] == [("a.png", "missing file"), ("src/7", "empty caption")]
    assert counter.summary().startswith("skipped 2 of 2 sample draws")


def test_a_bad_sample_drawn_in_two_epochs_is_one_example_of_draws():
    """Before: training on 2 samples for 2 epochs said "skipped 2 of 4 samples: 2 corrupt image (e.g. c.jpg,
    c.jpg)": one corrupt file read as two bad samples of four."""
    counter = SkipCounter()
    for _ in range(2):  # two epochs
        counter.update([("own/c.jpg", "corrupt image")])
        counter.kept += 1
    assert counter.examples == {"corrupt image": ["own/c.jpg"]}
    assert counter.summary() == "skipped 2 of 4 sample draws: 2 corrupt image (e.g. own/c.jpg)"
