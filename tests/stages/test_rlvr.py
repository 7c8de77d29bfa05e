"""RLVR (GRPO, unified with OPD): expected gradients by enumeration, the stage learns a
verifiable task, verifier failures are counted, and the pure cases reduce as documented."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill import losses
from jdistill.stages import rlvr
from jdistill.step import common
from jdistill.step import opd as ts
from jdistill.step import rlvr as step_rlvr
from jdistill.testing import toy
from jdistill.testing.toy import tiny_config

V, G = 4, 3  # vocabulary and group size of the enumeration


def _expected_gradient(settings, theta, teacher_logits, reference_logits, reward):
  """Σ over all V^G groups of one-token completions of P(group) ∇ loss(group)."""
  teacher = jax.nn.log_softmax(teacher_logits)
  reference = jax.nn.log_softmax(reference_logits)

  def loss(theta, xs, advantages):
    logq = jax.nn.log_softmax(theta)[xs][:, None]  # [G, 1]
    value, _ = step_rlvr.policy_loss(
      logq, jax.lax.stop_gradient(logq), advantages, jnp.ones((G, 1)), settings,
      teacher_logp=teacher[xs][:, None], reference_logp=reference[xs][:, None],
    )  # fmt: skip
    return value

  q = jax.nn.softmax(theta)
  total = jnp.zeros(V)
  for xs in itertools.product(range(V), repeat=G):
    xs = jnp.asarray(xs)
    advantages = losses.group_advantages(reward[xs], G, normalize_std=False)
    total = total + jnp.prod(q[xs]) * jax.grad(loss)(theta, xs, advantages)
  return total


def test_expected_gradient_is_the_documented_objective():
  """GRPO without std normalisation: −(G−1)/G ∇E_q[R]; λ term: λ∇KL(q‖p_T); k3 term:
  kl_coef ∇KL(ref‖q) (forward, as k3 used as a loss gives)."""
  rng = np.random.RandomState(0)
  theta, t_logits, r_logits = (jnp.asarray(rng.randn(V), jnp.float32) for _ in range(3))
  reward = jnp.asarray([1.0, 0.0, 0.3, 0.0])
  w_r, lam, kl_coef = 1.5, 0.7, 0.4
  settings = step_rlvr.RLSettings(
    chunk_size=None, reward_weight=w_r, kl_weight=lam, kl_coef=kl_coef
  )
  got = _expected_gradient(settings, theta, t_logits, r_logits, reward)

  def objective(theta):
    logq = jax.nn.log_softmax(theta)
    q = jnp.exp(logq)
    teacher, reference = jax.nn.log_softmax(t_logits), jax.nn.log_softmax(r_logits)
    expected_reward = jnp.sum(q * reward)
    reverse_kl = jnp.sum(q * (logq - teacher))
    forward_kl_to_reference = jnp.sum(jnp.exp(reference) * (reference - logq))
    return (
      -w_r * (G - 1) / G * expected_reward + lam * reverse_kl + kl_coef * (forward_kl_to_reference)
    )

  want = jax.grad(objective)(theta)
  np.testing.assert_allclose(got, want, atol=2e-6)
  # and each part on its own, so one cannot hide another
  for part in (dict(kl_weight=0.0, kl_coef=0.0), dict(reward_weight=0.0, kl_coef=0.0)):
    s = settings.__class__(**{**settings.__dict__, **part})
    assert not np.allclose(_expected_gradient(s, theta, t_logits, r_logits, reward), want)


def _larger_prompts(tmp_path, n_train=128):
  train = toy.write_larger_prompts(str(tmp_path / "larger.jsonl"), n_train, seed=0)
  evals = toy.write_larger_prompts(str(tmp_path / "larger_eval.jsonl"), 32, seed=1)
  return train, evals


def _rl_config(world, train, evals, out_dir, steps):
  import ml_collections

  c = tiny_config(world)
  c.stage = "rlvr"
  c.output_dir = str(out_dir)
  c.teachers = ml_collections.ConfigDict()
  c.data.train_files, c.data.eval_files = train, evals
  c.data.use_chat_template = False
  c.data.max_prompt_len = 16
  c.data.slots_per_teacher = 8
  c.sampling.prompt_buckets = (16,)
  c.sampling.max_new_tokens = 1
  c.sampling.stop_at_eos = False
  c.rl.group_size = 8
  c.rl.verifier = "jdistill.testing.toy:larger_reward"
  c.rl.eval_prompts = 32
  c.optimizer.lr = 1e-2
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = "constant"
  c.train.steps = steps
  c.train.log_every = 1
  c.train.eval_every = 0
  return c


def test_grpo_mean_reward_rises_on_a_verifiable_task(small_world, tmp_path):
  world = small_world
  train, evals = _larger_prompts(tmp_path)
  trainer = rlvr.RLVRTrainer(_rl_config(world, train, evals, tmp_path / "run", steps=40))
  before = trainer.evaluate()["larger"]["accuracy"]
  records = trainer.run()
  after = trainer.evaluate()["larger"]["accuracy"]
  rewards = [r["rewards"]["reward_mean"] for r in records]
  first, last = np.mean(rewards[:10]), np.mean(rewards[-10:])
  assert last > first + 0.1, (first, last, rewards)
  assert after > before + 0.1, (before, after)
  for r in records:  # the logged statistics are what they say
    assert 0 <= r["rewards"]["all_correct_groups"] <= 1 and r["response_length"] == 1.0
    assert set(r["rewards"]["domains"]) == {"larger"}
  assert (tmp_path / "run" / "learning_curves.png").exists()


def test_a_raising_verifier_is_counted_not_fatal(small_world, tmp_path, monkeypatch):
  """A user verifier that raises on every prompt with an odd answer: those samples score 0,
  every failure is counted in the logged `verifier_errors`, and the run goes on."""
  (tmp_path / "flaky_verifier.py").write_text(
    "def score(completion, reference):\n"
    "  if int(reference) % 2:\n"
    "    raise RuntimeError('odd')\n"
    "  return float(completion.strip() == reference)\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  world = small_world
  train, evals = _larger_prompts(tmp_path, n_train=16)
  c = _rl_config(world, train, evals, tmp_path / "run", steps=3)
  c.rl.verifier = "flaky_verifier:score"
  trainer = rlvr.RLVRTrainer(c)
  records = trainer.run()
  odd = [
    sum(
      int(trainer.batcher.records[r]["answer"]) % 2
      for r in trainer.batcher.batch(step)["record_index"]
    )
    for step in range(3)
  ]
  assert [r["verifier_errors"] for r in records] == [c.rl.group_size * n for n in odd]
  assert sum(odd) > 0 and all(np.isfinite(r["loss"]) for r in records)
  assert "RuntimeError: odd" in trainer.scorers["larger"].last_error


def test_evaluate_is_the_shared_accuracy_with_each_domains_verifier(
  small_world, tmp_path, monkeypatch
):
  """RLVR's evaluation is `eval.accuracy.accuracy` on its held-out batches: the same scores as
  greedy samples of those batches scored by hand, and each domain scored by its own
  `rl.verifiers` entry."""
  (tmp_path / "always_right.py").write_text("def score(completion, reference):\n  return 1.0\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  world = small_world
  train, evals = _larger_prompts(tmp_path, n_train=16)
  c = _rl_config(world, train, evals, tmp_path / "run", steps=1)
  c.rl.eval_prompts = 16
  trainer = rlvr.RLVRTrainer(c)
  scores = []
  for k in range(2):  # 16 prompts, 8 a batch
    prompts = trainer.eval_batcher.batch(k)
    out = trainer.sampler.generate(
      trainer.params, (prompts["prompt_tokens"], prompts["prompt_lengths"]), jax.random.key(0),
      trainer.greedy,
    )  # fmt: skip
    for i, text in enumerate(trainer.local_completions(out)):
      answer = trainer.eval_batcher.records[prompts["record_index"][i]]["answer"]
      scores.append(toy.larger_reward(text, str(answer)))
  assert trainer.evaluate() == {"larger": {"accuracy": np.mean(scores), "prompts": 16}}
  assert np.mean(scores) < 1.0  # so that the domain's own verifier below changes it
  c.rl.verifiers.larger = "always_right:score"
  assert trainer.evaluate() == {"larger": {"accuracy": 1.0, "prompts": 16}}


def test_prompts_without_answers_are_refused_by_file_and_line(small_world, tmp_path):
  world = small_world
  train, evals = _larger_prompts(tmp_path, n_train=4)
  with open(train, "a") as f:
    f.write(json.dumps({"domain": "larger", "prompt": "larger of 1 and 2 ->"}) + "\n")
  with pytest.raises(ValueError, match=rf"{train}:5: no 'answer' field"):
    rlvr.RLVRTrainer(_rl_config(world, train, evals, tmp_path / "run", steps=1))


def test_unified_objective_reduces_to_pure_opd_and_pure_grpo():
  """w_R = 0 is the OPD step's sampled-token loss (same value and gradient); λ = 0 ignores
  the teacher entirely."""
  from flax import nnx

  from jdistill.models import ModelConfig, Transformer

  cfg = ModelConfig(
    vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
    num_kv_heads=1, head_dim=8,
  )  # fmt: skip
  student_gd, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
  teacher_gd, teacher = nnx.split(Transformer(cfg, nnx.Rngs(1)))
  rng = np.random.RandomState(0)
  b, length = 4, 10
  tokens = jnp.asarray(rng.randint(0, 40, (b, length)), jnp.int32)
  mask = np.zeros((b, length), np.float32)
  mask[:, 4:] = 1
  batch = {
    "tokens": tokens,
    "completion_mask": jnp.asarray(mask),
    "logprobs": jnp.zeros((b, length)),
    "sampling_logprobs": jnp.asarray(-rng.rand(b, length) * mask, jnp.float32),
    "lengths": jnp.full((b,), length, jnp.int32),
    "advantages": jnp.asarray(rng.randn(b), jnp.float32),
  }
  opd_settings = losses.LossSettings("sampled_token", chunk_size=4)
  spec = common.TeacherSpec("t", opd_settings, 1.0, tuple(range(b)))
  structure = dict(
    student_graphdef=student_gd, teacher_graphdefs=(teacher_gd,), specs=(spec,), groups=((0,),)
  )

  def opd(p):
    return ts.distill_objective(p, teacher_states=(teacher,), batch=batch, **structure)[0]

  def rl(p, **settings):
    s = step_rlvr.RLSettings(chunk_size=4, **settings)
    return step_rlvr.rl_objective(
      p, (teacher,), None, batch, reference_graphdef=student_gd, settings=s, **structure
    )[0]

  want, want_grad = jax.value_and_grad(opd)(params)
  got, got_grad = jax.value_and_grad(lambda p: rl(p, reward_weight=0.0, kl_weight=1.0))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)

  pure = rl(params, kl_weight=0.0)
  no_teacher = step_rlvr.rl_objective(
    params, (), None, batch, student_graphdef=student_gd, teacher_graphdefs=(), specs=(),
    groups=(), reference_graphdef=student_gd, settings=step_rlvr.RLSettings(chunk_size=4),
  )[0]  # fmt: skip
  np.testing.assert_allclose(pure, no_teacher, rtol=1e-6)
  assert not np.allclose(pure, want)


def test_rlvr_resumes_exactly(small_world, tmp_path):
  """4 steps straight equal 2 steps, a new process-like trainer restoring step 2, 2 more."""
  world = small_world
  train, evals = _larger_prompts(tmp_path, n_train=32)

  def config(name):
    c = _rl_config(world, train, evals, tmp_path / name, steps=4)
    c.checkpoint.dir = str(tmp_path / name / "ckpt")
    c.checkpoint.every = 2
    c.rl.kl_coef = 0.1  # the reference must come back as the start model, not the resumed one
    return c

  straight = rlvr.RLVRTrainer(config("straight"))
  straight.run()
  first = rlvr.RLVRTrainer(config("split"))
  first.run(steps=2)
  del first
  second = rlvr.RLVRTrainer(config("split"))
  assert second.step == 2
  second.run()
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    jax.device_get(straight.params),
    jax.device_get(second.params),
  )
