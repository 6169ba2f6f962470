"""The training history: rows on disk, a resumed run's rows kept, summaries and curves."""

import json

from PIL import Image

from diffdis.train.history import History, steps_to_minutes


def _fill(h: History, with_clock: bool) -> None:
    for i in range(1, 4):
        h.add(100 * i, {"train/loss_ig": 0.1 / i, "train/loss_ita": 1.0 / i})
        h.add(100 * i, {"eval/zeroshot_shape": 0.3 * i, "eval/seconds": 2.0, **({"eval/train_seconds": 40.0 * i} if with_clock else {})})


def test_rows_summary_and_resume(tmp_path):
    h = History(tmp_path / "h.jsonl")
    _fill(h, with_clock=True)
    rows = [json.loads(line) for line in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[1] == {"step": 100, "eval/zeroshot_shape": 0.3, "eval/seconds": 2.0, "eval/train_seconds": 40.0}
    assert h.summary()["eval/train_seconds"] == {"first_step": 100, "first": 40.0, "last_step": 300, "last": 120.0}
    resumed = History(tmp_path / "h.jsonl", resume_step=200)  # a run resumed from step 200 drops what came after it
    assert [r["step"] for r in resumed.rows] == [100, 100, 200, 200]


def test_curves_with_and_without_the_training_clock(tmp_path):
    for with_clock in (True, False):
        h = History(tmp_path / f"h{with_clock}.jsonl")
        _fill(h, with_clock)
        png = h.plot(tmp_path / f"c{with_clock}.png")
        assert Image.open(png).size[0] > 1000  # three panels: the two losses and the evaluation
    assert History(tmp_path / "empty.jsonl").plot(tmp_path / "none.png") is None


def test_minutes_axis_maps_one_to_one_past_the_last_evaluation():
    """The top axis of the evaluation panel: exact at the evaluations, linear between, and still increasing past the
    last one (a clamped mapping put every tick of the margin, e.g. 12 and 14 minutes, on the last step)."""
    forward, inverse = steps_to_minutes([(400, 60.0), (800, 180.0)])
    assert forward(400) == 1.0 and forward(800) == 3.0 and forward(600) == 2.0
    assert forward(1000) > forward(800) and forward(-50) < 0  # past both ends, at the mean rate (3 min / 800 steps)
    assert abs(forward(1600) - 6.0) < 1e-9
    for minutes in (0.5, 2.5, 3.5, 5.0):  # the inverse goes back to the step, also in the margin
        assert abs(forward(inverse(minutes)) - minutes) < 1e-9
    assert inverse(3.5) != inverse(4.0)
