"""W&B off is nothing of W&B (`train.wandb=""`: not imported, nothing written), and its config
fields refuse an unknown mode or a mode without `wandb` installed. The offline run itself is
read back in tests/report/test_report.py (the tiny OPD run that records samples)."""

import os
import sys

import pytest

from jdistill import config as config_lib
from jdistill.config import training
from jdistill.runtime import run_log, wandb_log


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
