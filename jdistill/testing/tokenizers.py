"""Two byte-level BPE tokenizers of different families for the cross-tokenizer tests, built
in memory with the `tokenizers` library (no hub): a "Llama-3-like" one (tiktoken-style split
regex, `<|begin_of_text|>` / `<|eot_id|>` specials, Llama-3's header chat template) and a
"Qwen-like" one (Qwen2's split regex, `<|endoftext|>` / `<|im_start|>` / `<|im_end|>`,
ChatML), trained on the same small corpus to different vocabulary sizes so their merges, and
hence their token boundaries, differ."""

from __future__ import annotations

import functools

import tokenizers
import transformers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

# The split regexes of the released tokenizers (tiktoken cl100k / Llama 3, and Qwen2).
LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA3_TEMPLATE = (
  "{{ '<|begin_of_text|>' }}"
  "{% for message in messages %}"
  "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content']"
  " + '<|eot_id|>' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
  "{% endif %}"
)
CHATML_TEMPLATE = (
  "{% for message in messages %}"
  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
  "The student samples and the teacher grades every token of the rollout.",
  "def merge(a, b):\n    return sorted(a + b)\n\n",
  "compute 12 + 345 = 357, then 6789 * 2 = 13578.",
  "Grüße aus München: naïve café, déjà vu, 東京の天気は晴れです。",
  "emoji 🙂🚀 and tabs\t\tand   spaces   everywhere.",
  "I'm sure they'll say it's fine; we've seen what you'd do.",
]


def _build(split, specials, vocab_size, template, eos, pad):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(split), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(specials),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(CORPUS * 4, trainer=trainer)
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok,
    eos_token=eos,
    pad_token=pad,
    additional_special_tokens=[s for s in specials if s not in (eos, pad)],
  )
  fast.chat_template = template
  return fast


@functools.cache
def llama3_like() -> transformers.PreTrainedTokenizerFast:
  """Byte-level BPE of the Llama-3 kind, 360 tokens; EOS (end of a turn) is `<|eot_id|>`."""
  specials = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
  )
  return _build(LLAMA3_SPLIT, specials, 360, LLAMA3_TEMPLATE, "<|eot_id|>", "<|end_of_text|>")


@functools.cache
def qwen_like() -> transformers.PreTrainedTokenizerFast:
  """Byte-level BPE of the Qwen kind, 300 tokens; EOS (end of a turn) is `<|im_end|>`."""
  specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
  return _build(QWEN_SPLIT, specials, 300, CHATML_TEMPLATE, "<|im_end|>", "<|endoftext|>")


def _plain_bpe(tokens: list[str], merges: list[tuple[str, str]]):
  """A BPE over the characters of `tokens` with `merges` in rank order, no pre-tokenizer."""
  tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def ab_pair():
  """A toy pair over the alphabet {a, b} for exact enumeration: the student has `a`, `b`,
  `ab`; the teacher `a`, `b`, `bb`, `ba` (merged in that order, so its tokenisation of a text
  never changes a finished span when more text follows)."""
  student = _plain_bpe(["a", "b", "ab"], [("a", "b")])
  teacher = _plain_bpe(["b", "a", "bb", "ba"], [("b", "b"), ("b", "a")])
  return student, teacher
