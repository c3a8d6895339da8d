import math
import numpy as np, pytest
from tinygrad import Tensor, nn
import tinylora as tl
from tinylora import LoraConfig, LoraError
from tinylora.data import batch_at, encode_example, eval_batches, load_dataset, make_batch
from tinylora.train import Trainer, TrainConfig, chunked_lm_loss, fit, learning_rate, lm_loss
from conftest import TinyLM

def model(seed=0):
  Tensor.manual_seed(seed)
  return tl.inject(TinyLM(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))

def pattern_data(n=24, seq=12, seed=0):
  """Sequences t, t+1, t+2, ... (mod 48): learnable from the previous token alone."""
  rng = np.random.default_rng(seed)
  return [([(s + i) % 48 for i in range(seq + 1)], [1] * (seq + 1)) for s in rng.integers(0, 48, n)]

def test_lm_loss_matches_numpy_and_masks():
  rng = np.random.default_rng(0)
  logits, targets = rng.standard_normal((2, 5, 7)).astype(np.float32), rng.integers(0, 7, (2, 5))
  mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  got = lm_loss(Tensor(logits), Tensor(targets.astype(np.int32)), Tensor(mask)).item()
  assert abs(got - (nll * mask).sum() / mask.sum()) < 1e-5

TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=500, max_position_embeddings=16)

@pytest.mark.parametrize("arch, targets", [
  (dict(model_type="llama", tie_word_embeddings=True), ["q_proj"]),
  (dict(model_type="llama"), ["q_proj", "lm_head"]),
  (dict(model_type="gemma2", final_logit_softcapping=30.0, query_pre_attn_scalar=8, sliding_window=8, head_dim=8), ["q_proj", "lm_head"]),
  (dict(model_type="granite", logits_scaling=4.0), ["v_proj", "lm_head"])], ids=["tied", "lm_head LoRA", "gemma2 soft-cap", "granite scaling"])
def test_chunked_loss_and_gradients_equal_the_full_logits(arch, targets):
  """The loss over chunks of 8 positions (22 positions: 3 chunks, the last padded) and its LoRA gradients equal lm_loss
  on the whole logits."""
  from tinylora.models import Model
  Tensor.manual_seed(0)
  m = tl.inject(Model.from_config(dict(TINY, **arch)), LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
  rng = np.random.default_rng(0)
  tokens, targets_ = (Tensor(rng.integers(0, 500, (2, 11)).astype(np.int32)) for _ in range(2))
  mask = Tensor((rng.random((2, 11)) > 0.3).astype(np.float32))
  params = tl.trainable_parameters(m)
  full, chunked = lm_loss(m(tokens), targets_, mask), chunked_lm_loss(m, tokens, targets_, mask, chunk_bytes=8 * 4 * 500)
  ref, got = [full, *full.gradient(*params)], [chunked, *chunked.gradient(*params)]
  Tensor.realize(*ref, *got)
  ref, got = [t.numpy() for t in ref], [t.numpy() for t in got]
  assert all(np.abs(r).max() > 0 for r in ref)
  for r, g in zip(ref, got): np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())

def test_the_trainer_steps_on_the_chunked_loss():
  """Inside the Trainer's captured steps the chunked loss gives the loss and gradient norm of lm_loss on the full logits."""
  import functools
  from tinylora.models import Model
  runs = []
  for loss_fn in (lambda m, tokens, targets, mask: lm_loss(m(tokens), targets, mask), functools.partial(chunked_lm_loss, chunk_bytes=8 * 4 * 500)):
    Tensor.manual_seed(0)
    m = tl.inject(Model.from_config(dict(TINY, model_type="llama")), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    tr = Trainer(m, TrainConfig(lr=1e-2, iters=2, warmup=0), loss_fn=loss_fn)
    runs.append([tr.train_step([batch_at(pattern_data(seq=12), step, 2, 12)]) for step in range(2)])
  np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5)

def test_schedules():
  assert learning_rate(55, 1.0, 100, warmup_steps=10, min_lr_ratio=0.0, schedule="linear") == pytest.approx(0.5)
  assert learning_rate(100, 1.0, 100, warmup_steps=10, min_lr_ratio=0.2, schedule="linear") == pytest.approx(0.2)
  assert learning_rate(4, 1.0, 100, warmup_steps=10, schedule="constant") == pytest.approx(0.5)
  assert [learning_rate(s, 1.0, 100, warmup_steps=10, schedule="constant") for s in (10, 50, 100)] == [1.0, 1.0, 1.0]
  assert TrainConfig(lr=2.0, iters=100, warmup=10, min_lr_ratio=0.0, lr_schedule="linear").lr_at(55) == pytest.approx(1.0)
  assert learning_rate(0, 1.0, 100, warmup_steps=10) == pytest.approx(0.1)
  assert learning_rate(9, 1.0, 100, warmup_steps=10) == pytest.approx(1.0)
  assert learning_rate(10, 1.0, 100, warmup_steps=10) == pytest.approx(1.0)
  assert learning_rate(100, 1.0, 100, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.1)
  assert learning_rate(55, 1.0, 100, warmup_steps=10, min_lr_ratio=0.0) == pytest.approx(0.5)

class Tok:
  eos_id = 1
  def encode(self, s): return [ord(c) for c in s]
  def apply_chat_template(self, msgs, add_generation_prompt=False):
    return "".join(f"<{m['role']}>{m['content']}" for m in msgs) + ("<assistant>" if add_generation_prompt else "")

def test_prompt_masking_and_formats():
  toks, weights = encode_example({"prompt": "ab", "completion": "cd"}, Tok())
  assert toks == [97, 98, 99, 100, 1] and weights == [0, 0, 1, 1, 1]
  tokens, targets, mask = make_batch([(toks, weights)], seq_len=6)
  # position j predicts token j+1: only the predictions of "c", "d" and EOS count
  assert targets[0, :4].tolist() == [98, 99, 100, 1] and mask[0].tolist() == [0, 1, 1, 1, 0, 0]
  assert encode_example({"text": "ab"}, Tok())[1] == [1, 1, 1]
  msgs = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
  toks, weights = encode_example(msgs, Tok())
  plen = weights.index(1)
  assert "".join(map(chr, toks[:plen])) == "<user>hi<assistant>" and "".join(map(chr, toks[plen:])) == "yo" and all(weights[plen:])
  assert encode_example({"prompt": "ab", "completion": "cd"}, Tok(), "all")[1] == [1] * 5
  with pytest.raises(LoraError, match="unknown example format"): encode_example({"input": "x"}, Tok())

def test_batches_are_a_function_of_seed_and_step():
  data = pattern_data()
  a, b = batch_at(data, 5, 4, 8, seed=1), batch_at(data, 5, 4, 8, seed=1)
  for x, y in zip(a, b): np.testing.assert_array_equal(x, y)
  seen = np.concatenate([batch_at(data, s, 4, 8, seed=1)[0][:, 0] for s in range(6)])  # one epoch = 6 steps
  assert sorted(seen.tolist()) == sorted(ex[0][0] for ex in data)

def test_training_learns_and_changes_only_lora():
  m = model()
  frozen = {k: t.numpy().copy() for k, t in nn.state.get_state_dict(m).items() if ".lora_" not in k}
  lora = {k: t.numpy().copy() for k, t in nn.state.get_state_dict(m).items() if ".lora_" in k}
  data = pattern_data()
  tr = Trainer(m, TrainConfig(lr=3e-2, iters=30, warmup=3))
  first = tr.evaluate([batch_at(data, 0, 8, 12)])
  for step in range(30): tr.train_step([batch_at(data, step, 8, 12)])
  last = tr.evaluate([batch_at(data, 0, 8, 12)])
  assert last < first - 0.5, (first, last)  # ~3.9 -> ~2.6 in 30 steps
  for k, v in nn.state.get_state_dict(m).items():
    if k in frozen: np.testing.assert_array_equal(v.numpy(), frozen[k])
    elif k.endswith("lora_B"): assert np.abs(v.numpy() - lora[k]).max() > 0

def test_gradient_accumulation_matches_a_big_batch():
  data = pattern_data()
  big = batch_at(data, 0, 8, 12)
  halves = [tuple(x[:4] for x in big), tuple(x[4:] for x in big)]
  m1, m2 = model(), model()
  t1, t2 = Trainer(m1, TrainConfig(lr=1e-2, iters=3, warmup=0)), Trainer(m2, TrainConfig(lr=1e-2, iters=3, warmup=0, accum_steps=2))
  for _ in range(3):
    l1, g1 = t1.train_step([big])
    l2, g2 = t2.train_step(halves)
    assert abs(l1 - l2) < 1e-5 and abs(g1 - g2) < 1e-4 * g1
  for a, b in zip(tl.trainable_parameters(m1), tl.trainable_parameters(m2)):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)

def reference_gradients(batches) -> list[np.ndarray]:
  """The mean gradient of the LoRA tensors over micro-batches, from a fresh copy of `model()` outside the Trainer."""
  m = model()
  grads = [[g.numpy().astype(np.float64) for g in lm_loss(m(Tensor(t)), Tensor(y), Tensor(k)).gradient(*tl.trainable_parameters(m))]
           for t, y, k in batches]
  return [sum(gs) / len(batches) for gs in zip(*grads)]

@pytest.mark.parametrize("grad_clip, accum", [(1e-3, 1), (1e-3, 2), (0.0, 1), (1e3, 2)],
                         ids=["clipped", "clipped, 2 micro-batches", "no clipping", "under the limit"])
def test_clipping_reaches_the_optimizer(grad_clip, accum):
  """After one step AdamW's first moment is (1 - b1) x the gradient it was given: the mean gradient scaled by
  min(1, grad_clip / norm). (The step itself cannot show clipping: Adam's first update ignores the gradient's scale.)"""
  big = batch_at(pattern_data(), 0, 8, 12)
  batches = [big] if accum == 1 else [tuple(x[:4] for x in big), tuple(x[4:] for x in big)]
  tr = Trainer(model(), TrainConfig(lr=1e-2, iters=1, warmup=0, grad_clip=grad_clip, accum_steps=accum))
  _, norm = tr.train_step(batches)
  g = reference_gradients(batches)
  ref_norm = math.sqrt(sum((x ** 2).sum() for x in g))
  assert norm == pytest.approx(ref_norm, rel=1e-4)  # reported before clipping
  coef = min(1.0, grad_clip / (ref_norm + 1e-6)) if grad_clip > 0 else 1.0
  assert (coef < 1e-2) == (grad_clip == 1e-3)
  for m, gi in zip(tr.opt.m, g): np.testing.assert_allclose(m.numpy(), (1 - tr.opt.b1) * coef * gi, rtol=1e-3, atol=1e-9)

def test_the_learning_rate_schedule_reaches_the_jitted_step():
  """The rate each replayed step applied, read back from the update AdamW made (p_new = p - lr * m_hat / (sqrt(v_hat)
  + eps) without weight decay), follows learning_rate through warmup and decay: a rate frozen into the TinyJit fails."""
  c = TrainConfig(lr=1e-2, iters=8, warmup=3, min_lr_ratio=0.2, weight_decay=0.0)
  tr, data = Trainer(model(), c), pattern_data()
  for step in range(c.iters):
    before = [p.numpy().astype(np.float64) for p in tr.params]
    tr.train_step([batch_at(data, step, 8, 12)])
    b1_t, b2_t = tr.opt.b1_t.numpy().item(), tr.opt.b2_t.numpy().item()
    rates = []
    for p, b, m, v in zip(tr.params, before, tr.opt.m, tr.opt.v):
      u = (m.numpy() / (1 - b1_t)) / (np.sqrt(v.numpy() / (1 - b2_t)) + tr.opt.eps)
      big = np.abs(u) > 0.1  # elements whose update is large against float32 rounding of p
      rates.append((b - p.numpy())[big] / u[big])
    assert np.median(np.concatenate(rates)) == pytest.approx(learning_rate(step, c.lr, c.iters, c.warmup, c.min_lr_ratio), rel=1e-3)

def test_the_first_step_is_the_captured_step():
  """Step 1 captures both TinyJits and runs the capture, on its memory plan: it peaks no higher than a replay, and
  nothing made once (a lazy weight, the RoPE table) is baked into the capture to be redone in every replay."""
  from tinygrad.uop.ops import Ops
  from tinylora.engine import peak_memory
  from tinylora.models.decoder import Model
  Tensor.manual_seed(0)
  cfg = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=48, max_position_embeddings=16)
  m = tl.inject(Model.from_config(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
  tr, data, peaks = Trainer(m, TrainConfig(lr=1e-2, iters=3, warmup=0)), pattern_data(), []
  for step in range(3):
    with peak_memory() as p: tr.train_step([batch_at(data, step, 8, 12)])
    peaks.append(p.peak)
    if step == 0: assert tr._accumulate.captured is not None and tr._apply.captured is not None
  assert peaks[0] <= peaks[2] == peaks[1], peaks
  for jit in (tr._accumulate, tr._apply):
    copies = [c for c in jit.captured._linear.toposort() if c.op is Ops.CALL and c.src[0].op is Ops.COPY]
    assert copies == [], [(c.src[2].device, c.src[2].shape) for c in copies]

def test_resume_continues_the_same_trajectory(tmp_path):
  data, cfg = pattern_data(), TrainConfig(lr=1e-2, iters=8, warmup=2)
  full = Trainer(model(), cfg)
  ref = [full.train_step([batch_at(data, s, 8, 12)])[0] for s in range(8)]
  first = Trainer(model(), cfg)
  for s in range(4): first.train_step([batch_at(data, s, 8, 12)])
  first.save_checkpoint(tmp_path)
  m = model()
  for p in tl.trainable_parameters(m): p.assign(Tensor.randn(*p.shape)).realize()  # all must come from the checkpoint
  resumed = Trainer(m, cfg)
  resumed.load_checkpoint(tmp_path)
  assert resumed.step == 4
  rest = [resumed.train_step([batch_at(data, s, 8, 12)])[0] for s in range(4, 8)]
  np.testing.assert_allclose(rest, ref[4:], rtol=1e-6)

def test_non_finite_loss_stops_before_any_update():
  m = model()
  tr = Trainer(m, TrainConfig(lr=1e-2, iters=2, warmup=0))
  tr.train_step([batch_at(pattern_data(), 0, 8, 12)])
  before = [p.numpy().copy() for p in tl.trainable_parameters(m)]
  m.model.embed_tokens.assign(Tensor.full(m.model.embed_tokens.shape, float("nan"))).realize()
  with pytest.raises(LoraError, match=r"step 2: non-finite loss"): tr.train_step([batch_at(pattern_data(), 1, 8, 12)])
  for p, b in zip(tl.trainable_parameters(m), before): np.testing.assert_array_equal(p.numpy(), b)

def test_shape_change_is_refused():
  tr = Trainer(model(), TrainConfig(iters=2, warmup=0))
  tr.train_step([batch_at(pattern_data(), 0, 8, 12)])
  with pytest.raises(LoraError, match="batch shapes changed"): tr.train_step([batch_at(pattern_data(), 1, 8, 10)])

@pytest.mark.parametrize("kwargs, field", [
  (dict(accum_steps=0), "accum_steps"), (dict(accum_steps=1.5), "accum_steps"), (dict(lr=-1e-3), "lr"), (dict(lr=0), "lr"),
  (dict(lr=float("nan")), "lr"), (dict(lr=10**400), "lr"), (dict(iters=0), "iters"), (dict(iters=True), "iters"),
  (dict(warmup=-1), "warmup"), (dict(iters=10, warmup=11), "warmup"), (dict(min_lr_ratio=1.5), "min_lr_ratio"),
  (dict(weight_decay=-0.1), "weight_decay"), (dict(grad_clip=-1), "grad_clip"), (dict(grad_clip=float("inf")), "grad_clip"),
  (dict(grad_checkpoint="yes"), "grad_checkpoint")])
def test_train_config_errors(kwargs, field):
  with pytest.raises(LoraError, match=rf"TrainConfig\.{field} = .*: expected"): TrainConfig(**kwargs)

def test_train_config_edges_are_accepted():
  TrainConfig(iters=1, warmup=1, min_lr_ratio=0.0, grad_clip=0.0, weight_decay=0.0)
  TrainConfig(iters=5, warmup=0, min_lr_ratio=1.0, lr=1)

def test_fit_end_to_end(tmp_path):
  """History, validation cadence, checkpoint cadence and pruning, and a resumed fit that runs only the missing steps."""
  data, valid = pattern_data(24), pattern_data(6, seed=1)
  c = TrainConfig(lr=3e-2, iters=7, warmup=2)
  tr = Trainer(model(), c)
  history = fit(tr, data, valid, batch_size=4, seq_len=12, val_every=3, val_batches=2, checkpoint_dir=tmp_path,
                save_every=2, keep=2, progress=False)
  assert [h["step"] for h in history] == list(range(1, 8)) and tr.step == 7
  assert [h["step"] for h in history if "val_loss" in h] == [3, 6, 7]  # every 3 steps and at the end
  assert [h["lr"] for h in history] == [learning_rate(s, c.lr, c.iters, c.warmup, c.min_lr_ratio) for s in range(7)]
  assert all(math.isfinite(h["loss"]) and h["grad_norm"] > 0 and h["tokens_per_s"] > 0 for h in history)
  assert all(h["real_tokens"] == 4 * 12 for h in history)  # 4 rows of 12 scored targets each
  assert "first_step_s" in history[0]
  valid_b = eval_batches(valid, 4, 12, max_batches=2)
  assert history[-1]["val_loss"] == pytest.approx(tr.evaluate(valid_b), rel=1e-6)
  assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000006", "step_000007"]  # 2, 4, 6, 7 written; 2 kept
  resumed = Trainer(model(), c)
  assert resumed.load_checkpoint(tmp_path)["step"] == 7
  assert fit(resumed, data, valid, 4, 12, checkpoint_dir=tmp_path, progress=False) == []
  with pytest.raises(LoraError, match="keep = 0"): tr.save_checkpoint(tmp_path, keep=0)

def test_eval_batches_cover_the_examples_in_order():
  examples = [([i, i + 1, i + 2], [0, 0, 1]) for i in range(5)]
  batches = eval_batches(examples, batch_size=2, seq_len=4, pad_id=9)
  assert len(batches) == 3 and all(b[0].shape == (2, 4) for b in batches)
  assert [int(t) for b in batches for t in b[0][:, 0]] == [0, 1, 2, 3, 4, 9]  # in order; the last row is padding
  tokens, targets, mask = batches[-1]
  assert mask[1].sum() == 0 and tokens[1].tolist() == [9, 9, 9, 9]  # the filler row counts for nothing
  assert mask[0].tolist() == [0, 1, 0, 0] and targets[0, :2].tolist() == [5, 6]  # only token 6 follows the 2-token prompt
  assert len(eval_batches(examples, 2, 4, max_batches=2)) == 2

@pytest.mark.parametrize("call, message", [
  (lambda: batch_at([], 0, 2, 8), "no examples"), (lambda: batch_at(pattern_data(), 0, 0, 8), "batch_size must be"),
  (lambda: eval_batches(pattern_data(), 2, 0), "seq_len must be"), (lambda: make_batch([([1, 2], [1, 1])], -1), "seq_len must be"),
  (lambda: encode_example({"text": None}, Tok()), "'text' must be a string"),
  (lambda: encode_example({"prompt": 1, "completion": "x"}, Tok()), "'prompt' must be a string"),
  (lambda: encode_example({"messages": []}, Tok()), "'messages' must be a non-empty list"),
], ids=["no examples", "batch 0", "seq_len 0", "seq_len -1", "text None", "prompt int", "no messages"])
def test_data_errors(call, message):
  with pytest.raises(LoraError, match=message): call()

@pytest.mark.parametrize("content, message", [
  (b"\xff\xfe{}", "not UTF-8"), (b'{"text": "a"}\n{"text": ', ":2: invalid JSON"), (b'["a"]', ":1: expected a JSON object"),
  (b"\n  \n", "no examples"), (b'{"text": ""}', "example 1: 1 token"), (b'{"text": "ok"}\n{"x": 1}', "example 2: unknown example format"),
], ids=["not utf-8", "bad line", "array", "empty", "too short", "unknown format"])
def test_dataset_file_errors(tmp_path, content, message):
  (tmp_path / "train.jsonl").write_bytes(content)
  with pytest.raises(LoraError, match=rf"train\.jsonl.*{message}"): load_dataset(tmp_path / "train.jsonl", Tok())

def test_grad_checkpoint_holds_for_the_trainers_steps_only():
  """TrainConfig(grad_checkpoint=True) sets the model's flag while the Trainer's own steps capture (train and evaluate)
  and restores it after: a model handed back after training computes as it did before."""
  from tinylora.models.decoder import Model
  Tensor.manual_seed(0)
  cfg = dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, vocab_size=48, max_position_embeddings=16)
  m = tl.inject(Model.from_config(cfg), LoraConfig(r=2, target_modules=["q_proj"]))
  seen = []
  def loss_fn(model, tokens, targets, mask):
    seen.append(model.grad_checkpoint)
    return lm_loss(model(tokens), targets, mask)
  tr = Trainer(m, TrainConfig(iters=2, warmup=0, grad_checkpoint=True), loss_fn=loss_fn)
  assert not m.grad_checkpoint
  tr.train_step([batch_at(pattern_data(), 0, 4, 12)])
  tr.evaluate([batch_at(pattern_data(), 1, 4, 12)])
  assert seen == [True, True] and not m.grad_checkpoint


def test_optimizers_update_as_their_rules_say():
  """SGD without momentum moves each LoRA tensor by -lr * gradient; Adam's betas come from optimizer_config; SGD with
  momentum and Muon train (the loss falls)."""
  data = pattern_data()
  tr = Trainer(model(), TrainConfig(lr=0.1, iters=5, warmup=0, grad_clip=0, optimizer="sgd"))
  before = [p.numpy() for p in tr.params]
  tr.train_step([batch_at(data, 0, 8, 12)])
  for b, p, g in zip(before, tr.params, tr.grads): np.testing.assert_allclose(p.numpy(), b - 0.1 * g.numpy(), rtol=1e-5, atol=1e-7)
  adam = Trainer(model(), TrainConfig(optimizer="adam", optimizer_config={"betas": [0.8, 0.95], "eps": 1e-6}))
  assert (adam.opt.b1, adam.opt.b2, adam.opt.eps, adam.opt.wd) == (0.8, 0.95, 1e-6, 0.0)
  for name, settings in (("sgd", {"momentum": 0.9}), ("muon", {"momentum": 0.9})):
    tr = Trainer(model(), TrainConfig(lr=0.05 if name == "sgd" else 0.02, iters=12, warmup=0, optimizer=name, optimizer_config=settings))
    first = tr.evaluate([batch_at(data, 0, 8, 12)])
    for step in range(12): tr.train_step([batch_at(data, step, 8, 12)])
    assert tr.evaluate([batch_at(data, 0, 8, 12)]) < first, name

@pytest.mark.parametrize("kwargs, message", [
  (dict(optimizer="lion"), "optimizer = 'lion': expected one of adamw, adam, sgd, muon"),
  (dict(lr_schedule="step"), "lr_schedule = 'step': expected one of cosine, linear, constant"),
  (dict(optimizer="sgd", optimizer_config={"betas": [0.9, 0.9]}), "optimizer_config = .*sgd's settings: momentum, nesterov"),
  (dict(optimizer="adam", weight_decay=0.1), "weight_decay = 0.1: expected 0 with adam")])
def test_bad_optimizer_settings(kwargs, message):
  with pytest.raises(LoraError, match=message): TrainConfig(**kwargs)

def test_checkpoints_carry_the_optimizer_and_refuse_another(tmp_path):
  """An SGD-with-momentum checkpoint resumes with its momentum; resuming it with AdamW (or an AdamW one with SGD) is
  refused naming both, and leaves the adapter and the optimizer state as they were."""
  data = pattern_data()
  sgd = TrainConfig(lr=0.05, iters=4, warmup=0, optimizer="sgd", optimizer_config={"momentum": 0.9})
  tr = Trainer(model(), sgd)
  for step in range(2): tr.train_step([batch_at(data, step, 8, 12)])
  tr.save_checkpoint(tmp_path)
  back = Trainer(model(seed=1), sgd)
  back.load_checkpoint(tmp_path)
  for a, b in zip(tr.opt.b + tr.params, back.opt.b + back.params): np.testing.assert_array_equal(a.numpy(), b.numpy())
  other = Trainer(model(seed=1), TrainConfig(lr=0.05, iters=4, warmup=0))
  before = [t.numpy() for t in other.params + other.opt.m]
  with pytest.raises(LoraError, match="a checkpoint of a sgd run, and this Trainer's optimizer is adamw"): other.load_checkpoint(tmp_path)
  for a, t in zip(before, other.params + other.opt.m): np.testing.assert_array_equal(a, t.numpy())
