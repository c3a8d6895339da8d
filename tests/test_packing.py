"""Sequence packing: several examples per row, each attending only to itself with its positions from 0, so that each
example's logits, and the batch's loss and LoRA gradients, equal those of the examples laid out one per row."""
import numpy as np, pytest
from tinygrad import Tensor
import tinylora as tl
from tinylora import LoraConfig, LoraError
from tinylora.data import make_batch, make_packed_batch, pack_rows, packed_batch_at, packed_eval_batches
from tinylora.models import Model
from tinylora.train import Trainer, TrainConfig, chunked_lm_loss, fit, lm_loss
from test_architectures import FAMILIES

LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
# a sliding layer (window 5, shorter than most examples) and a full one, each with its own RoPE
GEMMA3 = dict(FAMILIES["gemma3_text"], num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
SEQ = 16

def examples(lengths=(9, 4, 6, 12, 3, 7), seed=0) -> list:
  """Random tokens, the first two of each example a prompt (weight 0)."""
  rng = np.random.default_rng(seed)
  return [(rng.integers(0, 64, n).tolist(), [0, 0] + [1] * (n - 2)) for n in lengths]

def packed(exs: list, seed=0) -> tuple[np.ndarray, ...]:
  return make_packed_batch([[exs[i] for i in row] for row in pack_rows(exs, SEQ, seed)], SEQ)

def lora_model(cfg: dict) -> Model:
  Tensor.manual_seed(0)
  return tl.inject(Model.from_config(cfg), LoraConfig(r=2, target_modules=["v_proj", "down_proj"], init_lora_weights=False))

# ---- the packer

def test_pack_rows_places_every_example_once_within_seq_len():
  exs = examples((30, 2, 9, 17, 5, 40, 3, 8, 16, 11))  # 30 and 40 are longer than a row: truncated to SEQ positions
  rows = pack_rows(exs, SEQ, seed=3)
  assert sorted(i for row in rows for i in row) == list(range(len(exs)))
  assert all(sum(min(len(exs[i][0]) - 1, SEQ) for i in row) <= SEQ for row in rows)
  assert rows == pack_rows(exs, SEQ, seed=3) and rows != pack_rows(exs, SEQ, seed=4)
  assert pack_rows(exs, SEQ, seed=None)[0] == [0] and [1, 2] == pack_rows(exs, SEQ, seed=None)[1][:2]  # in order, first fit

def test_packed_rows_hold_each_example_as_it_is_alone():
  exs = examples()
  tokens, targets, mask, positions, segments = packed(exs)
  alone = make_batch(exs, SEQ)
  rows = pack_rows(exs, SEQ)
  for r, row in enumerate(rows):
    at = 0
    for s, i in enumerate(row, 1):
      n = len(exs[i][0]) - 1
      span = slice(at, at + n)
      assert (segments[r, span] == s).all() and positions[r, span].tolist() == list(range(n))
      for got, ref in zip((tokens, targets, mask), alone): assert (got[r, span] == ref[i, :n]).all()
      at += n
    assert (segments[r, at:] == 0).all() and (mask[r, at:] == 0).all()  # padding: no segment, no loss
  assert mask.sum() == alone[2].sum()
  with pytest.raises(LoraError, match="more than seq_len"): make_packed_batch([exs[:4]], SEQ)

def test_packed_draws_cover_every_example_each_epoch():
  """One row per step for an epoch of len(rows) steps: every example once (its segment and its scored targets); the
  draws are a function of (seed, step), with or without the rows packed beforehand."""
  exs = examples((5, 9, 3, 12, 7, 4, 6, 10, 2, 8), seed=1)
  rows = pack_rows(exs, SEQ, seed=0)
  epoch = [packed_batch_at(exs, step, 1, SEQ, rows=rows) for step in range(len(rows))]
  assert sum(int(b[4].max()) for b in epoch) == len(exs) and sum(b[2].sum() for b in epoch) == sum(sum(w[1:]) for _, w in exs)
  assert all((a == b).all() for step in (0, 3) for a, b in zip(packed_batch_at(exs, step, 1, SEQ), epoch[step]))
  assert all(b[0].shape == (1, SEQ) for b in epoch)
  batches = packed_eval_batches(exs, 2, SEQ)
  assert sum(b[2].sum() for b in batches) == sum(sum(w[1:]) for _, w in exs)  # every scored target, once
  assert all(b[0].shape == (2, SEQ) for b in batches) and len(packed_eval_batches(exs, 2, SEQ, max_batches=1)) == 1

# ---- the model, the loss and its gradients

@pytest.mark.parametrize("cfg, layers", [(LLAMA, "inlined"), (LLAMA, "functions"), (LLAMA, "checkpointed"), (GEMMA3, "functions")],
                         ids=["llama-inlined", "llama-functions", "llama-checkpointed", "gemma3-functions"])
def test_packed_logits_loss_and_gradients_equal_the_examples_alone(cfg, layers):
  """Each example's logits in its packed row equal its logits alone (positions restart, attention stays inside it;
  gemma3: sliding windows shorter than the examples, two RoPEs); the packed loss (through the chunked head) is the mean
  over every scored target of the batch, as lm_loss on the examples one per row, and so are its LoRA gradients."""
  m = lora_model(cfg)
  m.layers_as_functions, m.grad_checkpoint = layers == "functions", layers == "checkpointed"
  exs = examples()
  tokens, targets, mask, positions, segments = (Tensor(a) for a in packed(exs))
  alone = [Tensor(a) for a in make_batch(exs, SEQ)]
  params = tl.trainable_parameters(m)
  ref_logits, got_logits = m(alone[0]), m(tokens, positions=positions, segments=segments)
  ref_loss = lm_loss(ref_logits, *alone[1:])
  got_loss = chunked_lm_loss(m, tokens, targets, mask, 8 * 4 * m.config.vocab_size, positions=positions, segments=segments)
  ref, got = [ref_loss, *ref_loss.gradient(*params)], [got_loss, *got_loss.gradient(*params)]
  Tensor.realize(*ref, *got, ref_logits, got_logits)
  ref, got = [t.numpy() for t in ref], [t.numpy() for t in got]
  ref_logits, got_logits, segs = ref_logits.numpy(), got_logits.numpy(), segments.numpy()
  placed = [(r, np.flatnonzero(segs[r] == s)) for r in range(len(segs)) for s in range(1, segs[r].max() + 1)]
  for i, (r, at) in zip([i for row in pack_rows(exs, SEQ) for i in row], placed):
    np.testing.assert_allclose(got_logits[r, at], ref_logits[i, :len(at)], rtol=1e-5, atol=1e-5)
  assert all(np.abs(r).max() > 0 for r in ref)
  for r, g in zip(ref, got): np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())

# ---- the Trainer and fit

def test_a_packed_step_splits_across_devices():
  """Data parallel (two virtual CPU devices): positions and segments split with the rows, the same steps as one device."""
  exs = examples((9, 4, 6, 12, 3, 7, 5, 10, 11, 2))
  rows = pack_rows(exs, SEQ)[:4]
  batch = make_packed_batch([[exs[i] for i in row] for row in rows], SEQ)
  runs = []
  for devices in (("CPU",), ("CPU:0", "CPU:1")):
    trainer = Trainer(lora_model(LLAMA), TrainConfig(lr=1e-2, iters=2, warmup=0), devices=devices)
    runs.append([trainer.train_step([batch]) for _ in range(2)])
  np.testing.assert_allclose(runs[1], runs[0], rtol=2e-6)

def test_a_packed_train_step_equals_the_unpacked_one():
  """The Trainer's captured step on a packed batch (2 rows) gives the loss, gradient norm and update of the same examples
  one per row (6 rows)."""
  exs = examples()
  runs = []
  for batch in (make_batch(exs, SEQ), packed(exs)):
    m = lora_model(LLAMA)
    trainer = Trainer(m, TrainConfig(lr=1e-2, iters=2, warmup=0))
    runs.append((trainer.train_step([batch]), [p.numpy() for p in tl.trainable_parameters(m)]))
  (ref, ref_params), (got, got_params) = runs
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  for r, g in zip(ref_params, got_params): np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)

def test_fit_packs_and_reports_real_tokens():
  exs, valid = examples((9, 4, 6, 12, 3, 7, 5, 10), seed=2), examples((8, 5, 11), seed=3)
  trainer = Trainer(lora_model(LLAMA), TrainConfig(lr=1e-2, iters=3, warmup=0))
  history = fit(trainer, exs, valid, batch_size=2, seq_len=SEQ, val_every=3, progress=False, pack=True)
  rows = pack_rows(exs, SEQ)
  assert [h["real_tokens"] for h in history] == [int(packed_batch_at(exs, s, 2, SEQ, rows=rows)[2].sum()) for s in range(3)]
  assert trainer.shape[-1] == (2, SEQ) and len(trainer.shape) == 5  # positions and segments reached the step
  assert history[-1]["val_loss"] == pytest.approx(trainer.evaluate(packed_eval_batches(valid, 2, SEQ, max_batches=8)), rel=1e-6)
  with pytest.raises(LoraError, match="pack=True"): fit(trainer, exs, None, 2, SEQ, progress=False, pack=True, draw=lambda *a: a)

def test_packed_rows_need_a_tinylora_model_positions_and_segments(tiny_lm):
  tokens, targets, mask, positions, segments = (Tensor(a) for a in packed(examples()))
  with pytest.raises(LoraError, match="need a tinylora Model"):
    chunked_lm_loss(tiny_lm, tokens, targets, mask, positions=positions, segments=segments)
  m = Model.from_config(LLAMA)
  with pytest.raises(LoraError, match="both positions and segments"): m(tokens, positions=positions)
  with pytest.raises(LoraError, match="segments must be an integer tensor"): m(tokens, positions=positions, segments=segments[:, :4])

def test_cli_pack_flag():
  from tinylora.cli import _parser, _train_args
  def parsed(*flags): return _train_args(_parser().parse_args(["train", "--model", "m", "--data", "d", "--train", *flags]))
  assert parsed("--pack").pack is True and parsed().pack is False
  with pytest.raises(LoraError, match="--pack packs supervised examples"): parsed("--pack", "--mode", "dpo")
