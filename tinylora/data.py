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
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip(): continue
    try: row = json.loads(line)
    except json.JSONDecodeError as e: raise LoraError(f"{path}:{n}: invalid JSON ({e})") from None
    if not isinstance(row, dict): raise LoraError(f"{path}:{n}: expected a JSON object, found {type(row).__name__}")
    rows.append(row)
  if not rows: raise LoraError(f"{path}: no examples")
  return rows

def encode_example(row: dict, tokenizer: Any, mask_prompt: bool = True) -> Example:
  """Tokens for one example (ending in EOS) and the length of its prompt part (0 when not masked)."""
  eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  if "messages" in row:
    msgs = row["messages"]
    if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)):
      raise LoraError(f"'messages' must be a non-empty list of {{role, content}} objects, found {str(msgs)[:80]!r}")
    tokens = tokenizer.encode(tokenizer.apply_chat_template(msgs))
    prompt = tokenizer.encode(tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True)) if mask_prompt and len(msgs) > 1 else []
    return tokens, len(prompt)
  if "prompt" in row and "completion" in row:
    prompt, completion = tokenizer.encode(str(row["prompt"])), tokenizer.encode(str(row["completion"]))
    return prompt + completion + eos, len(prompt) if mask_prompt else 0
  if "text" in row: return tokenizer.encode(str(row["text"])) + eos, 0
  raise LoraError(f"unknown example format with keys {sorted(row)}: expected 'text', 'prompt'+'completion', or 'messages'")

def load_dataset(path: str | os.PathLike, tokenizer: Any, mask_prompt: bool = True) -> list[Example]:
  rows = load_jsonl(path)
  out = []
  for n, row in enumerate(rows, 1):
    try: out.append(encode_example(row, tokenizer, mask_prompt))
    except LoraError as e: raise LoraError(f"{path}: example {n}: {e}") from None
  return out

def make_batch(examples: Iterable[Example], seq_len: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens, targets, mask), each (batch, seq_len): targets are tokens shifted by one; mask is 1 where the target
  is a completion token (not prompt, not padding). Longer examples are truncated."""
  examples = list(examples)
  tokens = np.full((len(examples), seq_len), pad_id, np.int32)
  targets, mask = np.zeros_like(tokens), np.zeros((len(examples), seq_len), np.float32)
  for i, (seq, prompt_len) in enumerate(examples):
    seq = seq[:seq_len + 1]
    n = len(seq) - 1
    tokens[i, :n], targets[i, :n] = seq[:-1], seq[1:]
    mask[i, max(0, prompt_len - 1):n] = 1  # position j predicts token j+1
  return tokens, targets, mask

def batch_at(examples: list[Example], step: int, batch_size: int, seq_len: int, seed: int = 0, pad_id: int = 0):
  """The batch for global step `step`: examples drawn without replacement from a per-epoch shuffle of (seed, epoch)."""
  n, picked = len(examples), []
  for k in range(step * batch_size, (step + 1) * batch_size):
    epoch, i = divmod(k, n)
    picked.append(examples[np.random.default_rng((seed, epoch)).permutation(n)[i]])
  return make_batch(picked, seq_len, pad_id)

def eval_batches(examples: list[Example], batch_size: int, seq_len: int, pad_id: int = 0, max_batches: int | None = None):
  """Fixed-shape batches covering the examples in order (the last one filled with empty, fully masked rows)."""
  chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)][:max_batches]
  return [make_batch(c + [([pad_id], 0)] * (batch_size - len(c)), seq_len, pad_id) for c in chunks]
