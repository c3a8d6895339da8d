"""Fine-tuning data in mlx-lm's JSONL formats: {"text"}, {"prompt", "completion"}, {"messages": [...]}, tokenized with
the prompt masked out of the loss, and fixed-shape batches that are a pure function of (seed, step) so a resumed run
sees exactly the batches the uninterrupted one would have."""
from __future__ import annotations
import json, os, pathlib
from typing import Any, Iterable
import numpy as np
from tinylora.errors import LoraError

Example = tuple[list[int], int]  # (tokens, how many leading tokens are prompt and get no loss)

def load_jsonl(path: str | os.PathLike) -> list[dict]:
  path, rows = pathlib.Path(path), []
  try: text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e: raise LoraError(f"{path}: not UTF-8 text ({e})") from None
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip(): continue
    try: row = json.loads(line)
    except (ValueError, RecursionError) as e: raise LoraError(f"{path}:{n}: invalid JSON ({e})") from None
    if not isinstance(row, dict): raise LoraError(f"{path}:{n}: expected a JSON object, found {type(row).__name__}")
    rows.append(row)
  if not rows: raise LoraError(f"{path}: no examples")
  return rows

def _text(row: dict, key: str) -> str:
  if not isinstance(row[key], str): raise LoraError(f"'{key}' must be a string, found {type(row[key]).__name__}")
  return row[key]

def _common_prefix(a: list[int], b: list[int]) -> int:
  return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

def encode_example(row: dict, tokenizer: Any, mask_prompt: bool = True) -> Example:
  """Tokens for one example (ending in EOS) and the length of its prompt part (0 when not masked).
  Chat messages: the rendered conversation, as the prompt's tokens (everything before the last message, with the
  generation prompt) followed by the last message's, so training sees the reply after the same tokens generation
  does. A template whose conversation does not begin with its prompt's text is tokenized whole, and the prompt is the
  tokens both renderings share."""
  eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  if "messages" in row:
    msgs = row["messages"]
    if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)):
      raise LoraError(f"'messages' must be a non-empty list of {{role, content}} objects, found {str(msgs)[:80]!r}")
    text = tokenizer.apply_chat_template(msgs)
    if not (mask_prompt and len(msgs) > 1): return tokenizer.encode(text), 0
    prompt_text = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True)
    prompt = tokenizer.encode(prompt_text)
    if text.startswith(prompt_text): return prompt + tokenizer.encode(text[len(prompt_text):]), len(prompt)
    tokens = tokenizer.encode(text)
    return tokens, _common_prefix(tokens, prompt)
  if "prompt" in row and "completion" in row:
    prompt, completion = tokenizer.encode(_text(row, "prompt")), tokenizer.encode(_text(row, "completion"))
    return prompt + completion + eos, len(prompt) if mask_prompt else 0
  if "text" in row: return tokenizer.encode(_text(row, "text")) + eos, 0
  raise LoraError(f"unknown example format with keys {sorted(row)}: expected 'text', 'prompt'+'completion', or 'messages'")

def load_dataset(path: str | os.PathLike, tokenizer: Any, mask_prompt: bool = True) -> list[Example]:
  rows = load_jsonl(path)
  out = []
  for n, row in enumerate(rows, 1):
    try:
      example = encode_example(row, tokenizer, mask_prompt)
      if len(example[0]) < 2: raise LoraError(f"{len(example[0])} token(s): an example needs at least two (an input and its next)")
    except LoraError as e: raise LoraError(f"{path}: example {n}: {e}") from None
    out.append(example)
  return out

def _check_sizes(**sizes: int) -> None:
  for name, v in sizes.items():
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1): raise LoraError(f"{name} must be an integer >= 1, found {v!r}")

def make_batch(examples: Iterable[Example], seq_len: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens, targets, mask), each (batch, seq_len): targets are tokens shifted by one; mask is 1 where the target
  is a completion token (not prompt, not padding). Longer examples are truncated."""
  examples = list(examples)
  _check_sizes(seq_len=seq_len)
  tokens = np.full((len(examples), seq_len), pad_id, np.int32)
  targets, mask = np.zeros_like(tokens), np.zeros((len(examples), seq_len), np.float32)
  for i, (seq, prompt_len) in enumerate(examples):
    seq = seq[:seq_len + 1]
    n = max(0, len(seq) - 1)
    tokens[i, :n], targets[i, :n] = seq[:-1], seq[1:]
    mask[i, max(0, prompt_len - 1):n] = 1  # position j predicts token j+1
  return tokens, targets, mask

def batch_at(examples: list[Example], step: int, batch_size: int, seq_len: int, seed: int = 0, pad_id: int = 0):
  """The batch for global step `step`: examples drawn without replacement from a per-epoch shuffle of (seed, epoch)."""
  _check_sizes(batch_size=batch_size, seq_len=seq_len)
  if not examples: raise LoraError("no examples to draw batches from")
  n, picked = len(examples), []
  for k in range(step * batch_size, (step + 1) * batch_size):
    epoch, i = divmod(k, n)
    picked.append(examples[np.random.default_rng((seed, epoch)).permutation(n)[i]])
  return make_batch(picked, seq_len, pad_id)

def eval_batches(examples: list[Example], batch_size: int, seq_len: int, pad_id: int = 0, max_batches: int | None = None):
  """Fixed-shape batches covering the examples in order (the last one filled with empty, fully masked rows)."""
  _check_sizes(batch_size=batch_size, seq_len=seq_len)
  chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)][:max_batches]
  return [make_batch(c + [([pad_id], 0)] * (batch_size - len(c)), seq_len, pad_id) for c in chunks]
