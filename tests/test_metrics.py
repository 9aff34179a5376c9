import io
import json

import pytest

from train.cli import main as mmpt
from train.metrics import MetricsLogger, read_metrics


def test_logger_writes_jsonl_console_and_tensorboard(tmp_path):
    out = io.StringIO()
    log = MetricsLogger(tmp_path, total_steps=3, stream=out)
    for step in (1, 2, 3):
        log.log(step, {"loss": 5.0 - step, "lr": 1e-3, "tok_s": 1234.5, "expert_load_max_mean": 1.2})
    log.event("checkpoint saved at step 3")
    log.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] == 2.0
    text = out.getvalue()
    assert "step 3/3" in text and "loss 2.0000" in text and "eta" in text and "checkpoint saved" in text
    assert any((tmp_path / "tensorboard").iterdir())


def test_resumed_run_replaces_re_run_steps_and_tolerates_a_torn_last_line(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("\n".join(json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3)) + "\n"
                 + json.dumps({"step": 3, "loss": 30.0}) + "\n" + '{"step": 4, "lo')
    records = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_corrupt_middle_line_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(tmp_path)


def test_plot_command_writes_png(tmp_path):
    log = MetricsLogger(tmp_path, total_steps=5, tensorboard=False, stream=io.StringIO())
    for step in range(1, 6):
        log.log(step, {"loss": 1.0 / step, "tok_s": 100.0 * step, "expert_load_max_mean": 1.1})
    log.close()
    assert mmpt(["plot", str(tmp_path)]) == 0
    png = tmp_path / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_missing_run_dir_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory"):
        mmpt(["plot", str(tmp_path / "nope")])
