"""Data-parallel training on tinygrad's virtual CPU devices: the same trajectory, checkpoints and adapter files as one
device, one TinyJit graph per step, and only the LoRA gradients (plus the loss's two sums) crossing devices.

The one-device reference runs on "CPU" too (not the default device), so both sides run the same kernels.

Tolerance: splitting a batch changes only the order of float32 additions (each device sums its half of the batch, the
all-reduce adds the halves); everything else computes the same numbers. Seen here: losses within 2.1e-7 relative
(2 float32 ulps), gradient norms 1.2e-7, LoRA tensors within 4.9e-7 absolute (largest 0.23) after 6 AdamW steps, whose
normalised updates pass a rounding difference in a small gradient on at up to lr scale. Asserted, with 10x room: rtol
2e-6 on losses and norms, 5e-6 absolute on the adapter tensors. A wrong reduction (a mean where a sum is due, a
device's gradient lost, a replica updated differently) moves them by percents."""
import json
import numpy as np, pytest
from safetensors.numpy import load_file
from tinygrad import Device, Tensor, nn, dtypes
import tinylora as tl
from tinylora import LoraConfig, LoraError
from tinylora.models.decoder import Model
from tinylora.quant import quantize
from tinylora.train import Trainer, TrainConfig, to_devices
from tinygrad.uop.ops import Ops

DEVICES, ONE = ("CPU:0", "CPU:1"), ("CPU",)
ON_BOTH = ("CPU", "CPU:1")  # tinygrad's spelling of DEVICES
CFG = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
TRAIN = TrainConfig(lr=2e-2, iters=6, warmup=2, weight_decay=0.01, grad_clip=1.0, accum_steps=2)
STEPS, BATCH, SEQ = 6, 4, 16
RTOL, ATOL = 2e-6, 5e-6

def base_model(cfg: dict = CFG) -> Model:
  Tensor.manual_seed(0)
  return Model.from_config(cfg)

def make_model(cfg: dict = CFG, bits: int | None = None) -> Model:
  model = base_model(cfg)
  return tl.inject(model if bits is None else quantize(model, bits=bits, group_size=32), LORA)

def micro_batches(step: int, batch: int = BATCH) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """accum_steps micro-batches of a learnable pattern (each token is the previous + 3), some positions masked."""
  rng = np.random.default_rng(step)
  out = []
  for _ in range(TRAIN.accum_steps):
    seqs = (rng.integers(0, 64, (batch, 1)) + 3 * np.arange(SEQ + 1)) % 64
    mask = (rng.random((batch, SEQ)) > 0.2).astype(np.float32)
    out.append((seqs[:, :-1].astype(np.int32), seqs[:, 1:].astype(np.int32), mask))
  return out

def run(trainer: Trainer, steps: range) -> np.ndarray:
  return np.array([trainer.train_step(micro_batches(s)) for s in steps])  # (steps, [loss, grad norm])

def replicas(t: Tensor) -> list[np.ndarray]:
  """The copy of t on each device."""
  return [b.numpy().reshape(t.shape) for b in t.uop.buffer.bufs]

def trained(devices: tuple[str, ...], tmp_path_factory) -> tuple[Trainer, np.ndarray, object]:
  """A Trainer after STEPS steps on `devices`, its (loss, norm) history and the folder of its saved adapter."""
  trainer = Trainer(make_model(), TRAIN, devices=devices)
  history = run(trainer, range(STEPS))
  tl.save_adapter(trainer.model, path := tmp_path_factory.mktemp("adapter"))
  return trainer, history, path

@pytest.fixture(scope="module")
def single(tmp_path_factory): return trained(ONE, tmp_path_factory)

@pytest.fixture(scope="module")
def parallel(tmp_path_factory): return trained(DEVICES, tmp_path_factory)

def test_trajectory_and_saved_adapter_equal_one_device(single, parallel):
  (_, ref, ref_path), (trainer, got, path) = single, parallel
  assert ref[-1, 0] < ref[0, 0] - 0.3  # the steps really train
  np.testing.assert_allclose(got, ref, rtol=RTOL)
  assert json.loads((path / "adapter_config.json").read_text()) == json.loads((ref_path / "adapter_config.json").read_text())
  want, saved = load_file(ref_path / "adapter_model.safetensors"), load_file(path / "adapter_model.safetensors")
  assert sorted(saved) == sorted(want) and len(saved) == 2 * 4 * CFG["num_hidden_layers"]
  for k in want:
    assert saved[k].dtype == np.float32 and saved[k].shape == want[k].shape, k
    np.testing.assert_allclose(saved[k], want[k], atol=ATOL, err_msg=k)
  # the replicas never drift apart: every device applies the same update to the same tensors
  for p in trainer.params + trainer.opt.m + trainer.opt.v:
    a, b = replicas(p)
    np.testing.assert_array_equal(a, b)
  # the files load onto a plain single-device model and give the data-parallel model's logits
  tokens = Tensor(micro_batches(99)[0][0], device="CPU")
  loaded = to_devices(tl.load_adapter(base_model(), path), "CPU")
  want_logits = trainer.model(tokens.shard(DEVICES, axis=0)).numpy()
  np.testing.assert_allclose(loaded(tokens).numpy(), want_logits, atol=1e-5)

def test_step_is_one_graph_and_only_lora_gradients_cross_devices(single, parallel):
  trainer = parallel[0]
  for jit in (trainer._accumulate, trainer._apply):
    kernels = [c for c in jit.captured._linear.src if c.src[0].op is Ops.PROGRAM]
    assert kernels and all(c.src[1].device == ON_BOTH for c in kernels)  # every kernel of the one graph runs on both
  grad_bytes = sum(p.numel() * p.dtype.itemsize for p in trainer.params)
  # 2 devices: each sends its partial LoRA gradients and the loss's numerator and mask count (2 floats) to the other
  assert trainer.cross_device_bytes() == 2 * (grad_bytes + 2 * 4)
  assert single[0].cross_device_bytes() == 0

def test_evaluate_and_resume_across_device_counts(single, parallel, tmp_path):
  ref_trainer, ref, _ = single
  assert parallel[0].evaluate(micro_batches(50)) == pytest.approx(ref_trainer.evaluate(micro_batches(50)), rel=RTOL)
  half = Trainer(make_model(), TRAIN, devices=DEVICES)
  run(half, range(STEPS // 2))
  half.save_checkpoint(tmp_path)
  for devices in (ONE, DEVICES):  # a data-parallel checkpoint resumes on one device or on several
    resumed = Trainer(make_model(), TRAIN, devices=devices)
    resumed.load_checkpoint(tmp_path)
    assert resumed.step == STEPS // 2
    np.testing.assert_allclose(run(resumed, range(STEPS // 2, STEPS)), ref[STEPS // 2:], rtol=RTOL)

def test_batch_that_does_not_split_and_bad_devices_are_refused():
  model = make_model()
  before = [p.numpy().copy() for p in tl.trainable_parameters(model)]
  for devices, message in [((), "devices must be device names"), (("CPU:1", "CPU:1"), "name one device twice"),
                           (("CPU", "CPU:0"), "name one device twice"), ((0, 1), "devices must be device names"),
                           (("CPU:0", "NOSUCHDEVICE:1"), "'NOSUCHDEVICE:1' of devices .* cannot be opened")]:
    with pytest.raises(LoraError, match=message): Trainer(model, TRAIN, devices=devices)
    assert model.model.norm.weight.device == Device.DEFAULT  # a refused Trainer leaves the model where it was
  trainer = Trainer(model, TRAIN, devices=DEVICES)
  with pytest.raises(LoraError, match=r"batch of 3 sequences does not split evenly across the 2 devices .* multiple of 2"):
    trainer.train_step(micro_batches(0, batch=3))
  assert trainer.step == 0
  for p, b in zip(trainer.params, before): np.testing.assert_array_equal(p.numpy(), b)
  trainer.train_step(micro_batches(0))  # the refused batch left no state behind
  assert trainer.step == 1

def test_non_finite_guard_on_several_devices():
  trainer = Trainer(make_model(), TRAIN, devices=DEVICES)
  run(trainer, range(1))
  before = [p.numpy().copy() for p in trainer.params]
  embed = trainer.model.model.embed_tokens.weight
  embed.assign(Tensor.full(embed.shape, float("nan"), device=embed.device)).realize()
  with pytest.raises(LoraError, match="step 2: non-finite loss"): run(trainer, range(1, 2))
  for p, b in zip(trainer.params, before):
    for r in replicas(p): np.testing.assert_array_equal(r, b)

def test_quantized_tied_base_is_replicated():
  cfg = dict(CFG, tie_word_embeddings=True)
  ref = run(Trainer(make_model(cfg, bits=4), TRAIN, devices=ONE), range(2))
  trainer = Trainer(model := make_model(cfg, bits=4), TRAIN, devices=DEVICES)
  q = model.model.layers[0].mlp.up_proj
  assert q.weight.dtype == dtypes.uint32 and q.weight.device == ON_BOTH and np.array_equal(*replicas(q.weight))
  assert all(t.device == ON_BOTH for t in nn.state.get_parameters(model))
  np.testing.assert_allclose(run(trainer, range(2)), ref, rtol=RTOL)
  to_devices(model, "CPU")  # back on one device: a plain model again
  assert all(t.device == "CPU" for t in nn.state.get_parameters(model))
  assert model(Tensor(micro_batches(0)[0][0], device="CPU")).shape == (BATCH, SEQ, CFG["vocab_size"])
