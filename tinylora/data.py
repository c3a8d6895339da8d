"""Fine-tuning data in mlx-lm's JSONL formats: {"text"}, {"prompt", "completion"}, {"messages": [...], "tools": [...]},
tokenized with loss weights (what the loss sees: `LOSS_ON`), and fixed-shape batches (one example per row, or packed:
several per row) that are a pure function of (seed, step) so a resumed run sees exactly the batches the uninterrupted
one would have."""
from __future__ import annotations
import json, os, pathlib
from typing import Any, Iterable
import numpy as np
from tinylora.errors import LoraError

Example = tuple[list[int], list[int]]  # (tokens, weights): weights[j] is 1 where token j is a loss target, else 0
# what the loss sees: every assistant reply (the completion of prompt/completion rows), the last message only (mlx-lm's
# --mask-prompt), or every token
LOSS_ON = ("assistant", "last", "all")

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

def encode_example(row: dict, tokenizer: Any, loss_on: str = "assistant") -> Example:
  """Tokens for one example and their loss weights. Text: every token, then EOS. Prompt/completion: the completion
  and EOS are trained, the prompt too with loss_on="all". Chat messages: see `_chat_example`."""
  if loss_on not in LOSS_ON: raise LoraError(f"loss_on must be one of {', '.join(LOSS_ON)}, found {loss_on!r}")
  eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  if "messages" in row: return _chat_example(row, tokenizer, loss_on)
  if "prompt" in row and "completion" in row:
    prompt, completion = tokenizer.encode(_text(row, "prompt")), tokenizer.encode(_text(row, "completion")) + eos
    return prompt + completion, [int(loss_on == "all")] * len(prompt) + [1] * len(completion)
  if "text" in row:
    tokens = tokenizer.encode(_text(row, "text")) + eos
    return tokens, [1] * len(tokens)
  raise LoraError(f"unknown example format with keys {sorted(row)}: expected 'text', 'prompt'+'completion', or 'messages'")

def _chat_example(row: dict, tokenizer: Any, loss_on: str) -> Example:
  """The rendered conversation (with the row's `tools`, if any, passed to the template), trained on the spans of the
  chosen messages: every assistant message, or the last message. A message's span is found from the template's own
  renderings: it starts where the conversation before it, rendered with the generation prompt, ends, and runs to the
  end of the conversation rendered up to it (trailing whitespace after its end token left out). The text is tokenized
  piece by piece at those boundaries, so a reply follows the same tokens as in generation. A template that renders a
  turn differently once later turns follow (e.g. dropping its reasoning) cannot place that turn: its last turn is then
  found by the tokens both renderings share, and an earlier one is refused."""
  msgs, tools = row["messages"], row.get("tools")
  if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m for m in msgs)):
    raise LoraError(f"'messages' must be a non-empty list of {{role, content}} objects, found {str(msgs)[:80]!r}")
  if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
    raise LoraError(f"'tools' must be a list of tool objects, found {str(tools)[:80]!r}")
  def render(messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, **({"tools": tools} if tools else {}))
  text = render(msgs)
  if loss_on == "all":
    tokens = tokenizer.encode(text)
    return tokens, [1] * len(tokens)
  turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"] if loss_on == "assistant" else [len(msgs) - 1]
  if not turns: raise LoraError("no assistant message to train on (loss_on='assistant'); loss_on='all' trains on every token")
  spans = []
  for i in turns:
    prompt, upto = render(msgs[:i], generation_prompt=True) if i else "", render(msgs[:i + 1])
    if not (text.startswith(prompt) and text.startswith(upto)):
      if turns == [len(msgs) - 1]:  # the last turn: by the tokens the prompt and the conversation share
        tokens = tokenizer.encode(text)
        start = _common_prefix(tokens, tokenizer.encode(prompt))
        return tokens, [0] * start + [1] * (len(tokens) - start)
      raise LoraError(f"message {i}: the chat template renders this turn differently once later turns follow, so its "
                      "span cannot be found from the template's renderings; loss_on='last' trains on the last message only")
    spans.append((len(prompt), len(upto.rstrip())))
  tokens, weights, at = [], [], 0
  for i, (start, end) in zip(turns, spans):
    if end <= start: raise LoraError(f"message {i} ({msgs[i]['role']}) renders to no tokens")
    for piece, weight in ((text[at:start], 0), (text[start:end], 1)):
      ids = tokenizer.encode(piece) if piece else []
      tokens += ids
      weights += [weight] * len(ids)
    at = end
  rest = tokenizer.encode(text[at:]) if text[at:] else []
  return tokens + rest, weights + [0] * len(rest)

def load_dataset(path: str | os.PathLike, tokenizer: Any, loss_on: str = "assistant") -> list[Example]:
  rows = load_jsonl(path)
  out = []
  for n, row in enumerate(rows, 1):
    try:
      example = encode_example(row, tokenizer, loss_on)
      if len(example[0]) < 2: raise LoraError(f"{len(example[0])} token(s): an example needs at least two (an input and its next)")
    except LoraError as e: raise LoraError(f"{path}: example {n}: {e}") from None
    out.append(example)
  return out

def _check_sizes(**sizes: int) -> None:
  for name, v in sizes.items():
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1): raise LoraError(f"{name} must be an integer >= 1, found {v!r}")

def make_batch(examples: Iterable[Example], seq_len: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens, targets, mask), each (batch, seq_len): targets are tokens shifted by one; mask is the target's weight (0
  for prompt and padding). Longer examples are truncated."""
  examples = list(examples)
  _check_sizes(seq_len=seq_len)
  tokens = np.full((len(examples), seq_len), pad_id, np.int32)
  targets, mask = np.zeros_like(tokens), np.zeros((len(examples), seq_len), np.float32)
  for i, (seq, weights) in enumerate(examples):
    if len(weights) != len(seq): raise LoraError(f"example {i}: {len(seq)} tokens but {len(weights)} loss weights")
    n = _positions(seq, seq_len)
    tokens[i, :n], targets[i, :n] = seq[:n], seq[1:n + 1]
    mask[i, :n] = weights[1:n + 1]  # position j predicts token j+1
  return tokens, targets, mask

def _positions(tokens: list[int], seq_len: int) -> int:
  """Positions an example takes in a row: every token but the last predicts the next one, at most seq_len of them."""
  return min(max(0, len(tokens) - 1), seq_len)

def picks_at(n: int, step: int, batch_size: int, seed: int = 0) -> list[int]:
  """Indices of the `batch_size` items (of n) in the batch for global step `step`: drawn without replacement from a
  per-epoch shuffle of (seed, epoch)."""
  if n < 1: raise LoraError("no examples to draw batches from")
  return [int(np.random.default_rng((seed, k // n)).permutation(n)[k % n]) for k in range(step * batch_size, (step + 1) * batch_size)]

def batch_at(examples: list[Example], step: int, batch_size: int, seq_len: int, seed: int = 0, pad_id: int = 0):
  """The batch for global step `step` (see `picks_at`)."""
  _check_sizes(batch_size=batch_size, seq_len=seq_len)
  return make_batch([examples[i] for i in picks_at(len(examples), step, batch_size, seed)], seq_len, pad_id)

def eval_batches(examples: list[Example], batch_size: int, seq_len: int, pad_id: int = 0, max_batches: int | None = None):
  """Fixed-shape batches covering the examples in order (the last one filled with empty, fully masked rows)."""
  _check_sizes(batch_size=batch_size, seq_len=seq_len)
  chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)][:max_batches]
  return [make_batch(c + [([pad_id], [0])] * (batch_size - len(c)), seq_len, pad_id) for c in chunks]

# ---- sequence packing: several examples per row, each attending only to itself

def pack_rows(examples: list[Example], seq_len: int, seed: int | None = 0) -> list[list[int]]:
  """The examples' indices grouped into rows of at most seq_len positions, first-fit: each example, in a (seed) shuffled
  order (None: in order), goes into the first row with room for it, or starts a new one. An example takes its
  make_batch positions (longer ones truncated to seq_len), so every example is placed exactly once."""
  _check_sizes(seq_len=seq_len)
  order = range(len(examples)) if seed is None else np.random.default_rng(seed).permutation(len(examples))
  rows: list[list[int]] = []
  free = np.full(len(examples) + 1, seq_len)  # positions left in each row; those after the open rows are empty
  for i in order:
    n = _positions(examples[i][0], seq_len)
    r = int(np.argmax(free[:len(rows) + 1] >= n))  # the first open row with room, else a new one
    if r == len(rows): rows.append([])
    rows[r].append(int(i))
    free[r] -= n
  return rows

def make_packed_batch(rows: Iterable[list[Example]], seq_len: int, pad_id: int = 0) -> tuple[np.ndarray, ...]:
  """(tokens, targets, mask, positions, segments), each (rows, seq_len): a row holds its examples one after another,
  each laid out as make_batch lays it out alone, so no target crosses from one example into the next. positions restart
  at 0 with each example; segments number a row's examples 1, 2, ... (0 at padding)."""
  rows = list(rows)
  _check_sizes(seq_len=seq_len)
  tokens, targets, mask = (np.full((len(rows), seq_len), pad_id, np.int32), np.zeros((len(rows), seq_len), np.int32),
                           np.zeros((len(rows), seq_len), np.float32))
  positions, segments = np.zeros_like(targets), np.zeros_like(targets)
  for r, row in enumerate(rows):
    if not row: continue
    lengths = np.array([_positions(seq, seq_len) for seq, _ in row])
    if (n := int(lengths.sum())) > seq_len:
      raise LoraError(f"row {r}: its examples take {n} positions, more than seq_len={seq_len}")
    alone = make_batch(row, seq_len, pad_id)
    example, at = np.nonzero(np.arange(seq_len) < lengths[:, None])  # each example's positions, in order
    for out, a in zip((tokens, targets, mask), alone): out[r, :n] = a[example, at]
    positions[r, :n], segments[r, :n] = at, example + 1
  return tokens, targets, mask, positions, segments

def packed_batch_at(examples: list[Example], step: int, batch_size: int, seq_len: int, seed: int = 0, pad_id: int = 0,
                    rows: list[list[int]] | None = None) -> tuple[np.ndarray, ...]:
  """The packed batch for global step `step`: `batch_size` rows of pack_rows(examples, seq_len, seed) (pass them as
  `rows` to skip packing again), drawn from a per-epoch shuffle of the rows as picks_at draws examples; one epoch
  covers every example once."""
  _check_sizes(batch_size=batch_size, seq_len=seq_len)
  rows = pack_rows(examples, seq_len, seed) if rows is None else rows
  picks = picks_at(len(rows), step, batch_size, seed)
  return make_packed_batch([[examples[i] for i in rows[k]] for k in picks], seq_len, pad_id)

def packed_eval_batches(examples: list[Example], batch_size: int, seq_len: int, pad_id: int = 0, max_batches: int | None = None):
  """Fixed-shape packed batches covering the examples in order (the last one filled with empty rows)."""
  _check_sizes(batch_size=batch_size, seq_len=seq_len)
  rows = [[examples[i] for i in row] for row in pack_rows(examples, seq_len, seed=None)]
  chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)][:max_batches]
  return [make_packed_batch(c + [[]] * (batch_size - len(c)), seq_len, pad_id) for c in chunks]
