"""The run report: samples recorded by a tiny OPD run agree with its train step, the HTML has
every section and colours each token by its logged log-ratio, exported models carry a model
card, and a real browser (headless Chromium, where installed) draws the coloured tokens."""

import json
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from jdistill import cli
from jdistill.config import teacher_config
from jdistill.report import html as report
from jdistill.stages import opd
from jdistill.testing import wandb_file
from jdistill.testing.toy import short_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECTIONS = ("curves", "accuracy", "overlap", "samples", "experiment")


@pytest.fixture(scope="module")
def run(small_world, tmp_path_factory):
  """Two logged steps of the small toy world with its Qwen3 teacher (sampled-token loss) on
  both domains, its 4 rows recorded, exported; → (run dir, export dir, the logged records,
  the trainer)."""
  out = tmp_path_factory.mktemp("report_run")
  c = short_run_config(small_world, out / "run", steps=2, log_every=1, eval_every=0)
  c.teachers = ml_collections.ConfigDict(  # one teacher (one compile of each function)
    {"code": teacher_config(small_world["teacher_code"], "math,code", loss="sampled_token")}
  )
  c.num_devices = 2  # its 4 rows over 2 data-parallel shards
  c.train.sample_rows = c.data.slots_per_teacher
  c.train.sample_topk = 3
  c.train.wandb = "offline"  # W&B beside TensorBoard: its run is read back below
  trainer = opd.OPDTrainer(c)
  records = trainer.run()
  trainer.export(str(out / "final"))
  return str(out / "run"), str(out / "final"), records, trainer


def _samples(run_dir):
  with open(os.path.join(run_dir, "samples.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_samples_agree_with_the_train_steps_metrics(run):
  """With every row recorded, the token means of the recorded log-probs and nucleus flags are
  the train step's own per-teacher metrics of that step (the step computed them in its compiled
  loss; the samples in a separate function)."""
  run_dir, _, records, _ = run
  samples = _samples(run_dir)
  assert sorted({(s["step"], s["teacher"]) for s in samples}) == [(1, "code"), (2, "code")]
  for record in records:
    for name, metrics in record["teachers"].items():
      tokens = [
        t for s in samples if (s["step"], s["teacher"]) == (record["step"], name)
        for t in s["tokens"]
      ]  # fmt: skip
      assert len(tokens) == metrics["tokens"]
      for key in ("teacher_logp", "student_logp"):
        np.testing.assert_allclose(np.mean([t[key] for t in tokens]), metrics[key], atol=2e-3)
      inside = 1 - np.mean([t["outside_nucleus"] for t in tokens])
      np.testing.assert_allclose(inside, metrics["in_teacher_top_p"], atol=1e-6)
      for t in tokens:
        top = [lp for _, lp in t["top"]]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert top[0] >= t["teacher_logp"] - 1e-3  # the teacher's best is at least the token


def test_offline_wandb_run_holds_the_logged_scalars_and_the_samples_table(run):
  run_dir, _, records, _ = run
  (path,) = wandb_file.run_files(run_dir)
  logged = {}  # step -> every key logged at it (scalars and the table arrive in two calls)
  for row in wandb_file.history(path):
    logged.setdefault(row["_step"], {}).update(row)
  assert sorted(logged) == [r["step"] for r in records] == [1, 2]
  for r in records:
    at = logged[r["step"]]
    for key in ("loss", "grad_norm", "tokens_per_s"):
      assert at[key] == pytest.approx(r[key]), key
    for name, metrics in r["teachers"].items():
      for key, value in metrics.items():
        assert at[f"{name}/{key}"] == pytest.approx(value), f"{name}/{key}"
  with open(os.path.join(run_dir, "wandb", "run_id")) as f:
    run_id = f.read().strip()
  meta = wandb_file.run_record(path)
  assert (meta.run_id, meta.project) == (run_id, "jdistill")
  config = {item.key: json.loads(item.value_json) for item in meta.config.update}
  assert config["train"]["wandb"] == "offline"
  for step in (1, 2):  # the table of the rollouts samples.jsonl recorded at that step
    with open(os.path.join(os.path.dirname(path), "files", logged[step]["samples/path"])) as f:
      table = json.load(f)
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    recorded = [r for r in _samples(run_dir) if r["step"] == step]
    assert len(rows) == len(recorded) == 4
    for row, sample in zip(rows, recorded):
      model = [t for t in sample["tokens"] if not t["environment"]]
      ratios = [t["student_logp"] - t["teacher_logp"] for t in model]
      assert (row["step"], row["teacher"], row["prompt"]) == (step, "code", sample["prompt"])
      assert row["completion"] == "".join(t["text"] for t in sample["tokens"])
      assert row["tokens"] == len(ratios) > 0
      assert row["mean_log_ratio"] == pytest.approx(np.mean(ratios))


def test_report_has_every_section_and_a_span_per_recorded_token(run):
  run_dir, _, _, _ = run
  cli.main(["jdistill", "report", run_dir])  # the command writes <run dir>/report.html
  with open(os.path.join(run_dir, "report.html")) as f:
    page = f.read()
  for key in SECTIONS:
    assert f'<section id="{key}">' in page, key
  assert page.count("<svg") >= 4  # loss, divergence, per-teacher curves, overlap
  spans = re.findall(r'<span class="tok[^"]*" style="background:rgb', page)
  shown = sum(len(s["tokens"]) for s in _samples(run_dir))  # 2 steps: both shown
  assert len(spans) == shown
  assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from anywhere


def test_token_colours_and_marks_match_the_logged_log_ratios():
  """A constructed rollout: the colour of each token is the one of its log p_teacher −
  log q_student (white at 0, full blue at ≥ +4 nats, full red at ≤ −4, linear between), and
  the marks and the environment turn are where the record puts them."""
  assert report.log_ratio_colour(0.0) == "rgb(255, 255, 255)"
  assert report.log_ratio_colour(9.0) == "rgb(31, 119, 180)"
  assert report.log_ratio_colour(-4.0) == "rgb(214, 39, 40)"
  assert report.log_ratio_colour(-1.0) == "rgb(245, 201, 201)"  # a quarter of the way to red

  def token(text, teacher, student, **flags):
    return {"text": text, "id": 0, "teacher_logp": teacher, "student_logp": student,
            "top": [["a", -0.1], ["b", -2.5]], **flags}  # fmt: skip

  record = {"step": 3, "teacher": "math", "row": 0, "prompt": "2+2=", "tokens": [
    token("4", -0.5, -0.5),
    token("x", -9.0, -1.0, outside_nucleus=1, icepop_masked=1),
    token("<tool>", -1.0, -2.0, environment=1),
    token("y", -2.0, -3.0, clipped=1),
  ]}  # fmt: skip
  page = report.rollout_html(record)
  spans = re.findall(
    r'<span class="(tok[^"]*)" style="background:([^"]*)"[^>]*>([^<]*)</span>', page
  )
  assert spans == [
    ("tok", "rgb(255, 255, 255)", "4"),
    ("tok nuc ice", "rgb(214, 39, 40)", "x"),
    ("tok", "rgb(199, 221, 236)", "&lt;tool&gt;"),
    ("tok clip", "rgb(199, 221, 236)", "y"),
  ]
  turns = re.findall(r'<div class="(model|env)">', page)
  assert turns == ["model", "env", "model"]
  assert "log p_teacher -9.000  log q_student -1.000" in page
  assert "teacher top: &#x27;a&#x27; -0.10, &#x27;b&#x27; -2.50" in page


def test_exported_model_carries_a_model_card(run):
  run_dir, export_dir, records, _ = run
  with open(os.path.join(export_dir, "README.md")) as f:
    card = f.read()
  for heading in ("## Recipe", "## Teachers", "## Data", "## Measured", "## Reproduce"):
    assert heading in card
  assert "for 2 steps" in card
  last = records[-1]
  assert f"Support overlap at step {last['step']}" in card
  for name, m in last["teachers"].items():  # the logged overlap, as metrics.jsonl holds it
    assert f"| {name} | {m['overlap']:.4f} | {m['nucleus_coverage']:.4f} |" in card
  assert "| code | `" in card and "| math,code | sampled_token | 1 |" in card
  assert "No held-out evaluation was logged" in card  # eval_every = 0


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="Chromium is not installed")
def test_chromium_draws_the_coloured_tokens(tmp_path):
  """tools/report_screenshot.py in headless Chromium: the screenshot holds pixels of the token
  colours of log-ratios −2 and +2 (half-way red and blue, drawn by no legend: only the tokens of
  a report of one constructed rollout have them)."""
  from PIL import Image

  run_dir = tmp_path / "run"
  run_dir.mkdir()
  tokens = [
    {"text": f" w{i}", "id": i, "teacher_logp": lp, "student_logp": 0.0, "top": []}
    for i, lp in enumerate([-2.0, 2.0] * 20)
  ]
  record = {"step": 1, "teacher": "math", "row": 0, "prompt": "p", "tokens": tokens}
  (run_dir / "samples.jsonl").write_text(json.dumps(record) + "\n")
  page = report.write_report(str(run_dir))
  png = tmp_path / "shot.png"
  script = os.path.join(ROOT, "tools", "report_screenshot.py")
  done = subprocess.run([sys.executable, script, page, str(png), "--height", "700"],
                        capture_output=True, text=True, timeout=180)  # fmt: skip
  assert done.returncode == 0, done.stderr[-2000:]
  pixels = {tuple(p) for p in np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).tolist()}
  assert report.log_ratio_colour(-2.0) == "rgb(234, 147, 148)"
  assert (234, 147, 148) in pixels and (143, 187, 218) in pixels


def test_token_table_flags_on_a_multi_turn_batch(run):
  """A constructed episode row scored by the run's student and teacher: a model turn
  with behaviour log-probs of −50 (q/π ≫ 1), an environment turn (sampling log-prob 0, as
  episodes write it), a model turn with behaviour log-probs 0 (q/π = q < 1/2). IcePop (c = 2)
  masks every model token; the PPO clip (0.2) is active where the advantage log p − log q is
  positive in the first turn and negative in the second; no environment token is flagged."""
  import jax.numpy as jnp

  from jdistill.losses import LossSettings

  trainer = run[3]
  recorder = trainer.samples
  graphdef, state = trainer.teachers.member(0)
  completion = np.zeros((1, 12), np.float32)
  completion[:, 3:12] = 1
  model = completion.copy()
  model[:, 6:9] = 0  # the environment's turn
  vocab = trainer.model_cfg.vocab_size
  batch = {
    "tokens": jnp.asarray(np.random.RandomState(0).randint(3, vocab, (1, 12)), jnp.int32),
    "completion_mask": jnp.asarray(completion),
    "model_mask": jnp.asarray(model),
    "sampling_logprobs": jnp.asarray(np.where(np.arange(12) < 6, -50.0, 0.0)[None], jnp.float32),
    "lengths": jnp.asarray([12], jnp.int32),
  }
  table = recorder._table(
    student_graphdef=trainer.graphdef, params=trainer.params, teacher_graphdef=graphdef,
    teacher_state=state, batch=batch, rows=np.asarray([0], np.int32),
    settings=LossSettings(loss="sampled_token", clip_eps=0.2, icepop_c=2.0), top_p=0.9, topk=3,
  )  # fmt: skip
  table = {k: np.asarray(v)[0] for k, v in table.items()}
  env = (model[0, 1:] == 0) & (completion[0, 1:] > 0)
  target = (model * completion)[0, 1:] > 0
  np.testing.assert_array_equal(table["environment"], env.astype(np.float32))
  np.testing.assert_array_equal(table["icepop_masked"], target.astype(np.float32))
  assert np.all(table["student_logp"][target] < np.log(0.5))  # q/π leaves [1/2, 2] everywhere
  positive = table["teacher_logp"] > table["student_logp"]
  first_turn = np.arange(1, 12) < 6
  clipped = target & np.where(first_turn, positive, ~positive)
  np.testing.assert_array_equal(table["clipped"], clipped.astype(np.float32))
  assert 0 < clipped.sum() < target.sum()  # the case holds clipped and unclipped tokens
