"""Preference tuning: pairs in TRL's formats, DPO and ORPO losses against a numpy reference, and DPO through the Trainer
and fit raising the chosen response's log-probability margin on held-out pairs."""
import json
import numpy as np, pytest
from tinygrad import Tensor
import tinylora as tl
from tinylora import LoraConfig, LoraError
from tinylora.device_policy import captured_step
from tinylora.engine import realize
from tinylora.models.decoder import Model
from tinylora.preference import (IGNORE, dpo_loss, encode_pair, load_pairs, make_pair_batch, orpo_loss, pair_batch_at,
                                 pair_eval_batches)
from tinylora.train import Trainer, TrainConfig, fit, token_nll

CONFIG = dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, vocab_size=48, max_position_embeddings=16)

class Tok:
  eos_id = 1
  def encode(self, s): return [ord(c) for c in s]
  def apply_chat_template(self, msgs, add_generation_prompt=False, tools=None):
    return "".join(f"<{m['role']}>{m['content']}" for m in msgs) + ("<assistant>" if add_generation_prompt else "")

def text(example, weight):
  return "".join(chr(t) for t, w in zip(*example) if w == weight and t != Tok.eos_id)

def test_pairs_in_trls_formats():
  chosen, rejected = encode_pair({"prompt": "ab", "chosen": "cd", "rejected": "e"}, Tok())
  assert chosen == ([97, 98, 99, 100, 1], [0, 0, 1, 1, 1]) and rejected == ([97, 98, 101, 1], [0, 0, 1, 1])  # EOS, as TRL
  user, hi, ho = {"role": "user", "content": "q"}, {"role": "assistant", "content": "hi"}, {"role": "assistant", "content": "ho"}
  explicit = encode_pair({"prompt": [user], "chosen": [hi], "rejected": [ho]}, Tok())
  implicit = encode_pair({"chosen": [user, hi], "rejected": [user, ho]}, Tok())  # TRL: the shared messages are the prompt
  assert explicit == implicit
  assert [text(e, 0) for e in explicit] == ["<user>q<assistant>"] * 2 and [text(e, 1) for e in explicit] == ["hi", "ho"]

def test_pair_batch_layout():
  """Row 2i is pair i's chosen sequence, 2i+1 its rejected one; padding targets are IGNORE (ORPO's NLL skips them)."""
  pairs = [(([5, 6, 7, 8], [0, 0, 1, 1]), ([5, 6, 9], [0, 0, 1])), (([3, 4], [0, 1]), ([3, 2, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1]))]
  tokens, targets, mask = make_pair_batch(pairs, seq_len=4, pad_id=0)
  assert tokens.tolist() == [[5, 6, 7, 0], [5, 6, 0, 0], [3, 0, 0, 0], [3, 2, 2, 2]]
  assert targets.tolist() == [[6, 7, 8, IGNORE], [6, 9, IGNORE, IGNORE], [4] + [IGNORE] * 3, [2, 2, 2, 2]]
  assert mask.tolist() == [[0, 1, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]  # the last one truncated at seq_len
  batches = pair_eval_batches(pairs + pairs[:1], batch_size=2, seq_len=4)
  assert [b[0].shape for b in batches] == [(4, 4), (4, 4)] and batches[1][2][2:].sum() == 0  # one filler pair
  for x, y in zip(pair_batch_at(pairs, 3, 2, 4, seed=1), pair_batch_at(pairs, 3, 2, 4, seed=1)): np.testing.assert_array_equal(x, y)

@pytest.mark.parametrize("row, message", [
  ({"prompt": "a", "rejected": "b"}, r"needs 'chosen' and 'rejected'; missing \['chosen'\]"),
  ({"prompt": "a", "chosen": "b"}, r"missing \['rejected'\]"),
  ({"prompt": "a", "chosen": "b", "rejected": "b"}, "chosen and rejected are the same"),
  ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]}, "chosen and rejected are the same"),
  ({"chosen": "b", "rejected": "c"}, "need a text 'prompt'"),
  ({"prompt": "a", "chosen": 3, "rejected": "c"}, "'chosen' must be a string or a list of"),
  ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}],
    "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "z"}]}, "found 2 and 1 message"),
], ids=["no chosen", "no rejected", "same text", "same chat", "no prompt", "chosen int", "two replies"])
def test_bad_rows_name_the_row(tmp_path, row, message):
  good = {"prompt": "a", "chosen": "b", "rejected": "c"}
  (tmp_path / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
  with pytest.raises(LoraError, match=rf"train\.jsonl: example 2: .*{message}"): load_pairs(tmp_path / "train.jsonl", Tok())

def test_bad_batches_and_options():
  pairs = [(([5, 6, 7, 8], [0, 0, 0, 1]), ([5, 6, 9], [0, 0, 1]))]
  with pytest.raises(LoraError, match=r"example 1: its chosen response starts after seq_len=2"): make_pair_batch(pairs, 2)
  for bad in (0, -1, float("nan"), "0.1"):
    for loss in (dpo_loss, orpo_loss):
      with pytest.raises(LoraError, match=r"beta = .*: expected a finite number > 0"): loss(bad)

# ---- losses against numpy

def tiny_llama(seed=0):
  Tensor.manual_seed(seed)
  return Model.from_config(CONFIG)

def adapted(m, random_b=False):
  """m with a LoRA adapter; with `random_b`, B random (as after training) so that the adapter changes the output."""
  tl.inject(m, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
  if random_b:
    for layer in tl.lora_layers(m).values(): layer.lora_B.assign(Tensor.randn(*layer.lora_B.shape) * 0.5).realize()
  return m

def random_pairs(rng, n, bad=False):
  """Pairs of random 3-token prompts and 2-4 token responses; with `bad`, responses of 3 tokens each, the chosen from
  2..39 and the rejected from 40..47: a preference a model can learn and carry over to pairs it has not seen."""
  out = []
  for _ in range(n):
    prompt, lengths = rng.integers(2, 40, 3).tolist(), (3, 3) if bad else rng.integers(2, 5, 2)
    chosen, rejected = rng.integers(2, 40, lengths[0]).tolist(), rng.integers(40 if bad else 2, 48, lengths[1]).tolist()
    out.append(tuple((prompt + r, [0] * 3 + [1] * len(r)) for r in (chosen, rejected)))
  return out

def np_logps(logits, targets, mask):
  logits = logits.astype(np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  tok = np.take_along_axis(logp, np.where(targets == IGNORE, 0, targets)[..., None], -1)[..., 0]
  return tok, (tok * mask).sum(-1)

def np_dpo(policy, base, targets, mask, beta):
  _, lp = np_logps(policy, targets, mask)
  _, ref = np_logps(base, targets, mask)
  real = mask[0::2].sum(-1) > 0
  margin = beta * ((lp[0::2] - ref[0::2]) - (lp[1::2] - ref[1::2]))
  return np.logaddexp(0, -margin)[real].mean(), margin[real].mean()

def np_orpo(policy, targets, mask, beta):
  tok, lp = np_logps(policy, targets, mask)
  real = mask[0::2].sum(-1) > 0
  avg = lp / np.maximum(mask.sum(-1), 1)
  c, r = avg[0::2][real], avg[1::2][real]
  log1mexp = lambda x: np.where(x < -np.log(2), np.log1p(-np.exp(x)), np.log(-np.expm1(x)))
  log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
  seen = targets[0::2] != IGNORE
  nll = -(tok[0::2] * seen).sum() / seen.sum()
  return nll + beta * np.logaddexp(0, -log_odds).mean(), beta * (c - r).mean()

def logits(m, tokens):
  # a captured step, as the Trainer's: its schedule and programs are stored, so a later run of the test starts faster
  return captured_step(lambda t: realize(m(t)))(Tensor(tokens)).numpy()

def test_losses_match_numpy():
  """DPO against the base model's logits taken before the adapter was added (not through lora.disabled), ORPO on the
  policy alone; through the Trainer's captured evaluate step, on a batch with a filler pair, which both leave out."""
  m = tiny_llama()
  batch = pair_eval_batches(random_pairs(np.random.default_rng(0), 3), 4, 8)[0]
  base = logits(m, batch[0])
  policy = logits(adapted(m, random_b=True), batch[0])
  assert np.abs(policy - base).max() > 0.1
  for loss_fn, (want_loss, want_margin) in ((dpo_loss(0.1), np_dpo(policy, base, *batch[1:], 0.1)),
                                            (orpo_loss(0.1), np_orpo(policy, *batch[1:], 0.1))):
    trainer = Trainer(m, TrainConfig(iters=1, warmup=0), loss_fn=loss_fn)
    assert abs(trainer.evaluate([batch]) - want_loss) < 1e-5
    assert abs(trainer.eval_metrics["rewards/margins"] - want_margin) < 1e-5

def test_dpo_gradient_is_the_policys_alone():
  """The LoRA gradients of a DPO step are those of sum_i w_i (logp_c,i - logp_r,i) with w_i = -beta sigmoid(-z_i) / B
  (z_i the pair's beta-scaled margin, from numpy): the reference log-probabilities get no gradient."""
  m = adapted(tiny_llama(1), random_b=True)
  batch, beta = pair_batch_at(random_pairs(np.random.default_rng(1), 4), 0, 4, 8), 0.1
  with tl.disabled(m): ref = np_logps(logits(m, batch[0]), *batch[1:])[1]
  lp = np_logps(logits(m, batch[0]), *batch[1:])[1]
  z = beta * ((lp[0::2] - ref[0::2]) - (lp[1::2] - ref[1::2]))
  w = Tensor((np.repeat(-beta / (1 + np.exp(z)) / len(z), 2) * np.tile([1.0, -1.0], len(z))).astype(np.float32)).realize()
  surrogate = lambda model, tokens, targets, mask: ((-token_nll(model(tokens), targets) * mask).sum(-1) * w).sum()
  params, grads = tl.trainable_parameters(m), []
  start = [p.numpy() for p in params]
  for loss_fn in (dpo_loss(beta), surrogate):
    for p, v in zip(params, start): p.assign(Tensor(v)).realize()
    trainer = Trainer(m, TrainConfig(iters=1, warmup=0, grad_clip=0), loss_fn=loss_fn)
    trainer.train_step([batch])
    grads.append([g.numpy() for g in trainer.grads])
  for got, want in zip(*grads): np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-8)

# ---- training

def test_dpo_raises_the_held_out_margin():
  """Rejected responses hold tokens from 40..47, chosen ones never: a few DPO steps through fit raise the chosen
  response's log-probability margin on held-out pairs, and the reward accuracy there."""
  m = adapted(tiny_llama(2))
  rng = np.random.default_rng(2)
  train, valid = random_pairs(rng, 32, bad=True), random_pairs(rng, 8, bad=True)
  trainer = Trainer(m, TrainConfig(lr=1e-1, iters=12, warmup=0, min_lr_ratio=1.0), loss_fn=dpo_loss(0.1))
  before = trainer.evaluate(pair_eval_batches(valid, 4, 8))
  assert before == pytest.approx(np.log(2)) and trainer.eval_metrics["rewards/margins"] == 0  # the policy is the reference
  margin0 = trainer.eval_metrics["logps/chosen"] - trainer.eval_metrics["logps/rejected"]
  history = fit(trainer, train, valid, batch_size=4, seq_len=8, val_every=12, progress=False, draw=pair_batch_at,
                draw_eval=pair_eval_batches)
  last = history[-1]
  assert last["val_logps/chosen"] - last["val_logps/rejected"] > margin0 + 1
  assert last["val_rewards/margins"] > 0.1 and last["val_rewards/accuracies"] >= 0.75 and last["val_loss"] < before - 0.05
  assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(history[0])

def test_orpo_steps_raise_the_margin():
  m = adapted(tiny_llama(3))
  batch = pair_batch_at(random_pairs(np.random.default_rng(3), 4, bad=True), 0, 4, 8)
  trainer = Trainer(m, TrainConfig(lr=1e-1, iters=4, warmup=0), loss_fn=orpo_loss(0.1))
  history = []
  for _ in range(4):
    trainer.train_step([batch])
    history.append(trainer.metrics)  # measured before the step's update
  assert history[-1]["rewards/margins"] > history[0]["rewards/margins"] + 0.01
  assert history[-1]["nll_loss"] < history[0]["nll_loss"]
