"""Long work says where it is: a line about every 30 s in logs (a bar on a terminal)."""

import io

from tests import images
from trainer import progress
from trainer import sources


def test_a_line_gives_the_count_the_rate_and_the_time_left():
    stream = io.StringIO()
    report = progress.Report("images read", 100, every=0, stream=stream)
    report.update(40)
    line = stream.getvalue().splitlines()[-1]
    assert line.startswith("images read: 40 of 100 (40%), ") and line.endswith(" left")
    report.update(100)  # the end is not a progress line
    assert len(stream.getvalue().splitlines()) == 1


def test_a_count_without_a_total_says_how_many_so_far():
    stream = io.StringIO()
    report = progress.Report("files listed", None, every=0, stream=stream)
    report.add(3)
    report.add()
    assert stream.getvalue().splitlines()[-1].startswith("files listed: 4 so far, ")


def test_the_listing_reports_every_file_it_lists(tmp_path, monkeypatch):
    root = images.folder(str(tmp_path / "data"), per_class=5, validation_per_class=2, size=16)
    counted = []
    monkeypatch.setattr(progress.Report, "done", lambda report: counted.append(report.done_count))
    sources.scan(root)
    assert counted == [2 * 5 + 2 * 2]
