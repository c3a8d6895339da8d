"""Preference tuning of the LoRA tensors with DPO and ORPO, on pairs in TRL's formats, through the Trainer and fit as
they are: a batch of B pairs is one (2B, T) batch, row 2i the chosen and row 2i+1 the rejected response of pair i (each
pair on one device when the batch is split for data parallel training), and the preference loss is the Trainer's loss_fn.

DPO's reference model is the model itself with its adapters disabled (lora.disabled), run in the same step: LoRA needs
no second copy of the model. ORPO needs no reference. Both follow TRL's definitions (DPOTrainer with the sigmoid loss,
ORPOTrainer) and report TRL's metrics: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, ..."""
from __future__ import annotations
import math, os
from typing import Any, Callable
import numpy as np
from tinygrad import Tensor
from tinylora.config import is_number
from tinylora.data import Example, _check_sizes, encode_example, load_jsonl, make_batch, picks_at
from tinylora.errors import LoraError
from tinylora.lora import disabled
from tinylora.train import token_nll

Pair = tuple[Example, Example]  # (chosen, rejected): one prompt (weight 0) followed by each response (weight 1)
IGNORE = -100  # the target of a padding position in a pair batch (HF's ignore index): not a token of the sequence
LossFn = Callable[[Any, Tensor, Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]

# ---- data

def _split_conversation(row: dict) -> tuple[list, list, list]:
  """(prompt, chosen reply, rejected reply) messages of a conversational row: {"prompt": [...], "chosen": [...],
  "rejected": [...]}, or without "prompt" the messages chosen and rejected share before they differ (TRL's implicit
  prompt)."""
  chosen, rejected = row["chosen"], row["rejected"]
  for k in ("chosen", "rejected"):
    if not (isinstance(row[k], list) and all(isinstance(m, dict) and "role" in m for m in row[k])):
      raise LoraError(f"'{k}' must be a string or a list of {{role, content}} messages, found {str(row[k])[:80]!r}")
  if "prompt" in row:
    prompt = row["prompt"]
    if not (isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)):
      raise LoraError(f"'prompt' must be a list of messages when 'chosen' and 'rejected' are, found {str(prompt)[:80]!r}")
  else:
    n = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
  if chosen == rejected: raise LoraError("chosen and rejected are the same")
  if len(chosen) != 1 or len(rejected) != 1:
    raise LoraError(f"chosen and rejected must each end the conversation with one reply after the prompt, found "
                    f"{len(chosen)} and {len(rejected)} message(s)")
  return prompt, chosen, rejected

def encode_pair(row: dict, tokenizer: Any) -> Pair:
  """The (chosen, rejected) examples of a preference row, in TRL's formats: {"prompt", "chosen", "rejected"} as text
  (each response followed by EOS, as TRL adds it), the same as messages ({"prompt": [...], "chosen": [one reply],
  "rejected": [one reply]}, with the row's "tools" passed to the chat template), or {"chosen": [messages], "rejected":
  [messages]} whose shared leading messages are the prompt. The prompt has weight 0 and the response weight 1 (a chat
  reply's span as data.encode_example finds it: through its end token)."""
  if missing := [k for k in ("chosen", "rejected") if k not in row]:
    raise LoraError(f"a preference row needs 'chosen' and 'rejected'; missing {missing} (keys: {sorted(row)})")
  if isinstance(row["chosen"], str) and isinstance(row["rejected"], str):
    if not isinstance(row.get("prompt"), str): raise LoraError(f"text 'chosen' and 'rejected' need a text 'prompt', found {row.get('prompt')!r}")
    chosen, rejected = (encode_example({"prompt": row["prompt"], "completion": row[k]}, tokenizer) for k in ("chosen", "rejected"))
  else:
    prompt, *replies = _split_conversation(row)
    tools = {"tools": row["tools"]} if row.get("tools") else {}
    chosen, rejected = (encode_example({"messages": prompt + reply, **tools}, tokenizer, "last") for reply in replies)
  if chosen[0] == rejected[0]: raise LoraError("chosen and rejected are the same tokens")
  for name, (_, weights) in (("chosen", chosen), ("rejected", rejected)):
    # the first token of a sequence is never predicted, so it cannot be scored
    if not any(weights[1:]): raise LoraError(f"the {name} response has no tokens to score")
  return chosen, rejected

def load_pairs(path: str | os.PathLike, tokenizer: Any) -> list[Pair]:
  """The preference pairs of a JSONL file (see `encode_pair`); a bad row is an error naming it."""
  out = []
  for n, row in enumerate(load_jsonl(path), 1):
    try: out.append(encode_pair(row, tokenizer))
    except LoraError as e: raise LoraError(f"{path}: example {n}: {e}") from None
  return out

def make_pair_batch(pairs: list[Pair], seq_len: int, pad_id: int = 0, numbers: list[int] | None = None) -> tuple[np.ndarray, ...]:
  """(tokens, targets, mask), each (2 * pairs, seq_len): rows 2i and 2i+1 are pair i's chosen and rejected sequences as
  data.make_batch lays them out, with target IGNORE at padding. A pair whose response is cut off entirely by seq_len is
  an error naming it by `numbers[i]` (default: its 1-based place in `pairs`)."""
  rows = [example for pair in pairs for example in pair]
  tokens, targets, mask = make_batch(rows, seq_len, pad_id)
  lengths = np.array([min(len(seq), seq_len + 1) - 1 for seq, _ in rows])
  targets[np.arange(seq_len) >= lengths[:, None]] = IGNORE
  for i, scored in enumerate(mask.reshape(len(pairs), 2, seq_len).sum(-1)):
    if not scored.all():
      raise LoraError(f"example {(numbers or range(1, len(pairs) + 1))[i]}: its {'chosen' if scored[0] == 0 else 'rejected'} "
                      f"response starts after seq_len={seq_len} tokens; use a longer seq_len or a shorter prompt")
  return tokens, targets, mask

def pair_batch_at(pairs: list[Pair], step: int, batch_size: int, seq_len: int, seed: int = 0, pad_id: int = 0) -> tuple[np.ndarray, ...]:
  """The batch of `batch_size` pairs (2 * batch_size rows) for global step `step`, drawn as data.batch_at draws examples."""
  _check_sizes(batch_size=batch_size, seq_len=seq_len)
  picks = picks_at(len(pairs), step, batch_size, seed)
  return make_pair_batch([pairs[i] for i in picks], seq_len, pad_id, [i + 1 for i in picks])

def pair_eval_batches(pairs: list[Pair], batch_size: int, seq_len: int, pad_id: int = 0,
                      max_batches: int | None = None) -> list[tuple[np.ndarray, ...]]:
  """Fixed-shape batches of `batch_size` pairs covering `pairs` in order; the last is filled up with empty pairs, which
  the preference losses leave out."""
  _check_sizes(batch_size=batch_size, seq_len=seq_len)
  out = []
  for start in range(0, len(pairs), batch_size)[:max_batches]:
    chunk = pairs[start:start + batch_size]
    tokens, targets, mask = make_pair_batch(chunk, seq_len, pad_id, list(range(start + 1, start + len(chunk) + 1)))
    fill = 2 * (batch_size - len(chunk))
    out.append((np.concatenate([tokens, np.full((fill, seq_len), pad_id, np.int32)]),
                np.concatenate([targets, np.full((fill, seq_len), IGNORE, np.int32)]),
                np.concatenate([mask, np.zeros((fill, seq_len), np.float32)])))
  return out

# ---- losses

def _pairs(x: Tensor) -> tuple[Tensor, Tensor]:
  """A per-row tensor (2B, ...) as its chosen and rejected rows, each (B, ...)."""
  x = x.reshape(-1, 2, *x.shape[1:])
  return x[:, 0], x[:, 1]

def _mean(x: Tensor, real: Tensor) -> Tensor:
  """Mean of a per-pair x over the real pairs (the filler of eval batches left out)."""
  return (real.where(x, 0)).sum() / real.sum().maximum(1)

def _check_beta(beta: float) -> float:
  if not (is_number(beta) and beta > 0): raise LoraError(f"beta = {beta!r}: expected a finite number > 0")
  return float(beta)

def dpo_loss(beta: float = 0.1) -> LossFn:
  """DPO's sigmoid loss as a Trainer loss_fn, TRL's DPOTrainer(loss_type="sigmoid"): with logp the summed
  log-probability of a response, the mean over pairs of -logsigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r))),
  where the reference log-probabilities come from the same model with its adapters disabled, in the same step and
  without gradient. Metrics as TRL's: rewards beta * (logp - ref) of chosen and rejected, their margin and the fraction
  of pairs where the chosen reward is higher (accuracies), and logps of chosen and rejected."""
  beta = _check_beta(beta)
  def loss_fn(model: Any, tokens: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    logps = _pairs((-token_nll(model(tokens), targets) * mask).sum(-1))
    with disabled(model): ref = _pairs((-token_nll(model(tokens), targets) * mask).sum(-1).detach())
    chosen, rejected = (beta * (lp - r) for lp, r in zip(logps, ref))
    real = _pairs(mask.sum(-1))[0] > 0
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
               "rewards/accuracies": (chosen > rejected).float(), "logps/chosen": logps[0], "logps/rejected": logps[1]}
    return _mean(-(chosen - rejected).logsigmoid(), real), {k: _mean(v, real) for k, v in metrics.items()}
  return loss_fn

def _expm1(x: Tensor) -> Tensor:
  """exp(x) - 1, by its series where |x| < 0.1 (where exp(x) - 1 loses digits to cancellation)."""
  return (x.abs() < 0.1).where(x * (1 + x / 2 * (1 + x / 3 * (1 + x / 4 * (1 + x / 5)))), x.exp() - 1)

def log1mexp(x: Tensor) -> Tensor:
  """log(1 - exp(x)) for x < 0, branching at -ln 2 as TRL's ORPO does."""
  return (x < -math.log(2)).where((1 - x.exp()).log(), (-_expm1(x)).log())

def orpo_loss(beta: float = 0.1) -> LossFn:
  """ORPO's loss as a Trainer loss_fn, TRL's ORPOTrainer: the chosen sequences' mean next-token cross-entropy over
  every token, prompt included (TRL's choice), minus beta (the paper's lambda) times the mean over pairs of
  logsigmoid(log_odds), where log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r)) for the average per-token
  log-probabilities a of the responses. No reference model. Metrics as TRL's: rewards beta * a of chosen and rejected,
  their margin and accuracies, logps (a) of chosen and rejected, nll_loss, log_odds_ratio (the mean logsigmoid) and
  log_odds_chosen (the mean log_odds)."""
  beta = _check_beta(beta)
  def loss_fn(model: Any, tokens: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    tok = -token_nll(model(tokens), targets)
    sums, counts = _pairs((tok * mask).sum(-1)), _pairs(mask.sum(-1))
    real = counts[0] > 0
    # filler pairs get a harmless average: they are left out of every mean below
    avg_c, avg_r = (real.where(s / n.maximum(1), -1.0) for s, n in zip(sums, counts))
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    ratio = log_odds.logsigmoid()
    seen = _pairs(targets != IGNORE)[0]
    nll = -(_pairs(tok)[0] * seen).sum() / seen.sum().maximum(1)
    chosen, rejected = beta * avg_c, beta * avg_r
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
               "rewards/accuracies": (chosen > rejected).float(), "logps/chosen": avg_c, "logps/rejected": avg_r,
               "log_odds_ratio": ratio, "log_odds_chosen": log_odds}
    return nll - beta * _mean(ratio, real), {**{k: _mean(v, real) for k, v in metrics.items()}, "nll_loss": nll}
  return loss_fn

LOSSES: dict[str, Callable[[float], LossFn]] = {"dpo": dpo_loss, "orpo": orpo_loss}
