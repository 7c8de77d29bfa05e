"""The gradient-noise measurement: exact losses read 0, sampled estimators their real error."""

import dataclasses

from jdistill import losses
from jdistill.experiments import noise, question
from jdistill.experiments import task_world as tw
from jdistill.stages.opd import OPDTrainer


def test_claimed_objectives():
  spec = lambda name: noise.opd_step.TeacherSpec(  # noqa: E731
    "t", losses.settings_for(name, clip_eps=0.2 if "sampled" in name else None), 1.0, (0,)
  )
  names = ("sampled_token", "sampled_token_baseline", "topk_teacher", "forward_kl", "reverse_kl")
  claimed = noise.claimed_specs([spec(n) for n in names])
  assert [s.settings.loss for s in claimed] == [
    "reverse_kl", "reverse_kl", "reverse_kl", "forward_kl", "reverse_kl"
  ]  # fmt: skip
  assert all(s.settings.clip_eps is None and not s.settings.kl_baseline for s in claimed[:3])


def test_noise_is_zero_for_the_exact_loss_and_the_baseline_lowers_it(tmp_path):
  grid = question.Grid(slots_per_teacher=8)
  config = question.loss_grid.opd_config(
    tw.COMMITTED, "lineage", "sampled_token", f"{tw.COMMITTED}/base", str(tmp_path), 0,
    grid.loss_grid(),
  )  # fmt: skip
  trainer = OPDTrainer(config)

  def specs(name):
    return [
      dataclasses.replace(s, settings=losses.settings_for(name, chunk_size=s.settings.chunk_size))
      for s in trainer.teachers.specs
    ]

  exact = noise.gradient_noise(trainer, batches=2, specs=specs("reverse_kl"))
  assert exact["noise"] == 0.0 and abs(exact["cosine"] - 1.0) < 1e-5
  plain = noise.gradient_noise(trainer, batches=2, specs=specs("sampled_token"))
  centred = noise.gradient_noise(trainer, batches=2, specs=specs("sampled_token_baseline"))
  assert plain["noise"] > 0.5  # one batch of 24 rollouts: the estimate is mostly noise
  assert centred["noise"] < 0.8 * plain["noise"]
  assert trainer.step == 0
