"""runtime/outputs/watch.py and `runtime.infer --watch`: frames a camera saves into a folder, taken as they arrive."""
import csv
import shutil
import threading
import time
from pathlib import Path

import pytest

from runtime import infer
from runtime.outputs.watch import FolderWatch

MTD = Path(__file__).resolve().parent / "data" / "mtd-mini"
FRAMES = sorted(MTD.glob("*/Imgs/*.jpg"))


class Script:
    """A fake clock and sleep: each poll's sleep runs the next step (a camera writing files)."""

    def __init__(self, steps):
        self.now, self.steps, self.polls = 0.0, list(steps), 0

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds
        self.polls += 1
        if self.steps:
            self.steps.pop(0)()


def test_only_new_files_are_taken_and_only_once_written(tmp_path):
    (tmp_path / "old.jpg").write_bytes(FRAMES[0].read_bytes())
    data = FRAMES[1].read_bytes()
    steps = [
        lambda: (tmp_path / "new.jpg").write_bytes(data[:100]),  # the camera starts writing
        lambda: (tmp_path / "new.jpg").write_bytes(data),  # ... and finishes
        lambda: (tmp_path / "empty.jpg").write_bytes(b""),  # never written: never taken
        lambda: None,
    ]
    script = Script(steps)
    watch = FolderWatch(tmp_path, poll_s=0.5, idle_s=3.0, clock=script.clock, sleep=script.sleep)
    assert watch.existing == {tmp_path / "old.jpg"}
    taken = []
    for path in watch:
        taken.append((path, script.polls))
    assert [p.name for p, _ in taken] == ["new.jpg"]
    assert taken[0][1] == 3  # seen at poll 2 with its final size, taken at poll 3 when it had not changed
    assert script.now >= 3.0 and watch.taken == 1  # ended by the idle limit


def test_the_watch_ends_after_its_count(tmp_path):
    script = Script([lambda i=i: shutil.copy(FRAMES[i], tmp_path / f"f{i}.jpg") for i in range(3)] + [lambda: None] * 5)
    watch = FolderWatch(tmp_path, poll_s=0.5, stop_after=2, clock=script.clock, sleep=script.sleep)
    assert [p.name for p in watch] == ["f0.jpg", "f1.jpg"]


def test_infer_watch_takes_frames_as_a_camera_saves_them(lite_engine_dir, tmp_path, capsys):
    folder, out = tmp_path / "camera", tmp_path / "out"
    (folder / "day1").mkdir(parents=True)
    shutil.copy(FRAMES[0], folder / "before.jpg")  # there before the watch: left alone

    def camera():
        time.sleep(1.0)
        shutil.copy(FRAMES[1], folder / "part_0001.jpg")
        shutil.copy(FRAMES[2], folder / "day1" / "part_0001.jpg")  # the same name in a subfolder

    writer = threading.Thread(target=camera)
    writer.start()
    code = infer.main(["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd", "--no-progress",
                       "--watch", "--watch-count", "2", "--watch-idle", "30", str(folder), "--out", str(out)])
    writer.join()
    err = capsys.readouterr().err
    assert code == 0 and "1 there already are left alone" in err and "2 of 2 images written" in err
    assert "warmed up in" in err  # before the first frame from the line
    # the same name twice: the first taken keeps its stem, the second gets its folder's name too
    assert sorted(p.name for p in out.glob("*_map.npy")) in (
        ["camera_part_0001_jpg_map.npy", "part_0001_map.npy"], ["day1_part_0001_jpg_map.npy", "part_0001_map.npy"])
    assert not (out / "before_map.npy").exists()
    with open(out / "summary.csv", newline="") as table:
        assert len(list(csv.DictReader(table))) == 2
    assert (out / "index.html").read_text().count("<img ") == 2


@pytest.mark.parametrize("args, message", [
    (["--watch", "a.jpg"], "--watch takes one folder to watch"),
    (["--watch-count", "3", "FOLDER"], "need --watch"),
    (["--watch", "--watch-idle", "0", "FOLDER"], "--watch-idle must be > 0"),
])
def test_bad_watch_requests_are_refused_before_any_work(lite_engine_dir, tmp_path, capsys, args, message):
    args = [str(tmp_path) if a == "FOLDER" else a for a in args]
    with pytest.raises(SystemExit):
        infer.main(["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd", *args,
                    "--out", str(tmp_path / "out")])
    assert message in capsys.readouterr().err
