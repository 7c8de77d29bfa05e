"""PNG plots written next to the numbers (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def learning_curves(history: list[dict], path: str) -> str:
  """Loss and per-teacher reverse KL / teacher log-prob against step."""
  steps = [r["step"] for r in history]
  names = list(history[0]["teachers"])
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  axes[0].plot(steps, [r["loss"] for r in history], color="black")
  axes[0].set_title("objective (a surrogate for sampled terms)")
  for name in names:
    axes[1].plot(steps, [r["teachers"][name]["reverse_kl"] for r in history], label=name)
    axes[2].plot(steps, [r["teachers"][name]["teacher_logp"] for r in history], label=name)
  axes[1].set_title("full-vocab reverse KL (student ‖ teacher)")
  axes[2].set_title("teacher log-prob of sampled tokens")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def sft_curve(history: list[dict], path: str) -> str:
  """Completion cross-entropy against step."""
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([r["step"] for r in history], [r["loss"] for r in history], color="black")
  ax.set_title("warmup SFT: completion cross-entropy")
  ax.set_xlabel("step")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def rl_curve(history: list[dict], path: str) -> str:
  """Mean reward per domain and response length against step."""
  steps = [r["step"] for r in history]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name in history[-1]["rewards"]["domains"]:
    values = [r["rewards"]["domains"].get(name, {}).get("reward_mean") for r in history]
    axes[0].plot(steps, values, label=name)
  axes[0].plot(steps, [r["rewards"]["reward_mean"] for r in history], color="black", label="all")
  axes[0].set_title("RLVR: mean verifier reward")
  axes[0].legend()
  axes[1].plot(steps, [r["response_length"] for r in history], color="black")
  axes[1].set_title("response length (tokens)")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
