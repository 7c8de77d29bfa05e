"""W&B off is nothing of W&B (`train.wandb=""`: not imported, nothing written), and its config
fields refuse an unknown mode or a mode without `wandb` installed. The offline run itself is
read back in tests/report/test_report.py (the tiny OPD run that records samples)."""

import os
import sys

import pytest

from jdistill import config as config_lib
from jdistill.config import training
from jdistill.runtime import run_log, wandb_log
from jdistill.testing import wandb_file


def test_off_imports_and_writes_nothing_of_wandb(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises
  monkeypatch.setattr(run_log, "_tensorboard", lambda path: None)  # its import: 2.5 s
  c = config_lib.base_config()
  assert c.train.wandb == ""
  log = run_log.RunLog(str(tmp_path), wandb=wandb_log.options(c, "0123456789abcdef"))
  log.write({"step": 1, "loss": 0.5, "teachers": {"math": {"reverse_kl": 0.1}}})
  log.write_samples(1, [{"step": 1, "teacher": "math", "row": 0, "prompt": "", "tokens": []}])
  log.write_eval(1, {"math": {"reverse_kl": 0.2}})
  log.close()
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


@pytest.mark.parametrize(
  ("mode", "blocked", "message"),
  [
    ("offlne", False, r"config.train.wandb='offlne' is invalid; allowed: \['', 'offline'"),
    ("offline", True, r"config.train.wandb='offline' is invalid; .*wandb is not installed"),
  ],
)
def test_a_bad_mode_names_the_field(mode, blocked, message, monkeypatch):
  if blocked:
    monkeypatch.setitem(sys.modules, "wandb", None)
  c = config_lib.base_config()
  c.train.wandb = mode
  with pytest.raises(ValueError, match=message):
    training.validate(c)


def test_evals_go_to_wandb_under_the_stored_run_id(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setattr(run_log, "_tensorboard", lambda path: None)
  c = config_lib.base_config()
  c.train.wandb = "offline"
  log = run_log.RunLog(str(tmp_path), wandb=wandb_log.options(c, "0123456789abcdef"))
  log.write_eval(3, {"math": {"reverse_kl": 0.375}, "note": "text is not a scalar"})
  log.close()
  (path,) = wandb_file.run_files(str(tmp_path))
  (row,) = wandb_file.history(path)
  assert {k: v for k, v in row.items() if not k.startswith("_")} == {"eval/math/reverse_kl": 0.375}
  assert row["_step"] == 3
  run_id = wandb_file.run_record(path).run_id
  assert run_id.startswith("01234567-")
  # a resumed session, even with a changed config (`run_mode=resume`), continues the same run
  assert wandb_log.run_id(str(tmp_path), "fedcba9876543210") == run_id
