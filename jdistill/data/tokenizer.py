"""Tokenizers: load a local Hugging Face tokenizer, or train a tiny one.

Nothing here touches the network: ``load_tokenizer`` reads a directory written by
``save_pretrained`` (``tokenizer.json`` / ``tokenizer_config.json`` …) and
``train_tiny_tokenizer`` builds such a directory from a few texts, so tests and
the CPU demo have real tokenizer artifacts without a hub.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

# Special tokens of the tiny tokenizer, in id order (``<pad>`` is id 0).
PAD, BOS, EOS, IM_START, IM_END = "<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END)

# ChatML: one block per message, then (optionally) the opening of the
# assistant's turn, which is where the student starts generating.
CHATML_TEMPLATE = (
  "{% for message in messages %}"
  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Files of which at least one must exist for a directory to hold a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
  """Loads the tokenizer saved in the local directory ``path`` (never downloads).

  Raises:
    FileNotFoundError: ``path`` is not a directory.
    ValueError: the directory holds no tokenizer files.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory not found: {path!r}")
  if not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
    raise ValueError(
      f"no tokenizer files in {path!r} (expected one of {', '.join(_TOKENIZER_FILES)})"
    )
  return transformers.AutoTokenizer.from_pretrained(
    path, local_files_only=True, trust_remote_code=False
  )


def train_tiny_tokenizer(
  out_dir: str, texts: Iterable[str], vocab_size: int = 512
) -> transformers.PreTrainedTokenizerFast:
  """Trains a byte-level BPE tokenizer on ``texts`` and saves it to ``out_dir``.

  The vocabulary is: the special tokens ``<pad>`` (id 0), ``<bos>`` (1), ``<eos>`` (2),
  ``<|im_start|>`` (3), ``<|im_end|>`` (4); the 256 byte symbols (so any text
  encodes, nothing is ever unknown); then BPE merges up to ``vocab_size`` tokens.
  Hence ``vocab_size`` must be at least 261, and the result may be smaller than
  ``vocab_size`` when the texts allow fewer merges — use ``len(tokenizer)``.

  The tokenizer carries a ChatML ``chat_template`` (``<|im_start|>{role}\\n{content}
  <|im_end|>\\n`` per message, ``<|im_start|>assistant\\n`` as generation prompt). Plain
  ``encode`` adds no special tokens.

  Returns:
    The ``PreTrainedTokenizerFast``; ``load_tokenizer(out_dir)`` gives an equal one.
  """
  min_size = len(SPECIAL_TOKENS) + 256
  if vocab_size < min_size:
    raise ValueError(f"vocab_size={vocab_size} < {min_size} (5 special tokens + 256 bytes)")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(list(texts), trainer=trainer)
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok,
    pad_token=PAD,
    bos_token=BOS,
    eos_token=EOS,
    additional_special_tokens=[IM_START, IM_END],
  )
  fast.chat_template = CHATML_TEMPLATE
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(out_dir)
  return fast
