"""DoRA: the layer against a numpy reference (forward and gradients, the norm held constant), merge/unmerge/disabled,
quantized bases, files, training, and refused inputs."""
import json
import numpy as np, pytest
from safetensors.numpy import load_file, save_file
from tinygrad import Tensor, dtypes, nn
from tinygrad.helpers import Context
from tinygrad.uop.ops import Ops
import tinylora as tl
from tinylora import LoraConfig, LoraError
from tinylora.quant import dequantize_array, quantize
from tinylora.train import Trainer, TrainConfig
from conftest import TinyLM

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def np_dora(x, W, b, A, B, m, s):
  """float64 DoRA: m / ||W + s B A||_rows * (x W^T + s x A^T B^T) + b, and the row scale g."""
  g = m / np.linalg.norm(W + s * B @ A, axis=1)
  y = g * (x @ W.T + s * x @ A.T @ B.T)
  return (y if b is None else y + b), g

def dora_layer(base, r=3, s=2.5, seed=0):
  """A DoRA layer with random A, B and a magnitude away from its init, so every term is exercised."""
  layer = tl.LoraLinear(base, r=r, scale=s, init=False, use_dora=True)
  layer.adapter.magnitude = (layer.magnitude * Tensor(np.random.default_rng(seed).uniform(0.5, 1.5, layer.out_features).astype(np.float32))).realize()
  return layer

def f64(*ts): return [t.numpy().astype(np.float64) for t in ts]

@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_numpy(bias):
  Tensor.manual_seed(1)
  lin = nn.Linear(12, 20, bias=bias)
  layer = dora_layer(lin)
  x = np.random.default_rng(0).standard_normal((4, 12))
  G = np.random.default_rng(1).standard_normal((4, 20))
  W, A, B, m = f64(lin.weight, layer.lora_A, layer.lora_B, layer.magnitude)
  b = lin.bias.numpy().astype(np.float64) if bias else None
  ref, g = np_dora(x, W, b, A, B, m, 2.5)
  xt = Tensor(x.astype(np.float32))
  y = layer(xt)
  # gradients with ||W + s B A|| treated as a constant (PEFT's and mlx-lm's detach); taken before y is realized, as
  # for LoRA: realizing y first would turn the low-rank delta it materializes into a constant buffer
  gm, gA, gB = (y * Tensor(G.astype(np.float32))).sum().gradient(layer.magnitude, layer.lora_A, layer.lora_B)
  np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)
  n = m / g
  Gg = G * g
  np.testing.assert_allclose(gm.numpy(), (G * (x @ W.T + 2.5 * x @ A.T @ B.T)).sum(0) / n, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gB.numpy(), 2.5 * Gg.T @ (x @ A.T), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gA.numpy(), 2.5 * (Gg @ B).T @ x, rtol=1e-4, atol=1e-5)

@pytest.mark.parametrize("bias", [True, False])
def test_forward_kernels_reading_the_input_hold_one_reduction(bias):
  """The base matmul's kernel holds only its own reduction (a second one, such as the rank-r projection, would cost it
  tinygrad's matmul optimisations: 2-3x the base's time, bench/RESULTS.md); so does x @ A.T."""
  Tensor.manual_seed(0)
  lin = nn.Linear(256, 128, bias=bias)
  Tensor.realize(*nn.state.get_parameters(lin))
  layer, x = dora_layer(lin, r=4), Tensor.randn(64, 256).realize()
  kernels = [c for c in Tensor.schedule_linear(layer(x)).src if c.src[0].op is Ops.SINK]
  reading_x = [c for c in kernels if any(getattr(b, "buffer", None) is x.uop.buffer for b in c.src[1:])]
  assert len(reading_x) == 2, f"{len(reading_x)} of {len(kernels)} kernels read the input"
  assert [sum(u.op is Ops.REDUCE for u in c.src[0].toposort()) for c in reading_x] == [1, 1]

def test_init_is_the_identity_and_magnitude_is_the_weight_norm(tiny_lm, tokens):
  Tensor.manual_seed(5)
  lin, x = nn.Linear(32, 24), Tensor.randn(3, 5, 32).realize()
  layer = tl.LoraLinear(lin, r=4, scale=2.0, use_dora=True)
  np.testing.assert_allclose(layer.magnitude.numpy(), np.linalg.norm(lin.weight.numpy().astype(np.float64), axis=1), rtol=1e-6)
  np.testing.assert_allclose(layer(x).numpy(), lin(x).numpy(), rtol=1e-6, atol=1e-6)
  base = tiny_lm(tokens).numpy()
  tl.inject(tiny_lm, LoraConfig(r=4, target_modules=ALL7, use_dora=True))
  np.testing.assert_allclose(tiny_lm(tokens).numpy(), base, rtol=1e-5, atol=1e-5)
  assert tl.count_parameters(tiny_lm)[0] == sum(t.numel() for t in tl.trainable_parameters(tiny_lm))
  layers = tl.lora_layers(tiny_lm)
  assert len(tl.trainable_parameters(tiny_lm)) == 3 * len(layers)  # A, B and the magnitude of each linear

def randomized_dora_lm(seed=0, **kw) -> TinyLM:
  Tensor.manual_seed(seed)
  m = tl.inject(TinyLM(**kw), LoraConfig(r=4, lora_alpha=8, target_modules=ALL7, init_lora_weights=False, use_dora=True))
  for i, l in enumerate(tl.lora_layers(m).values()):
    l.adapter.magnitude = (l.magnitude * Tensor(np.random.default_rng(i).uniform(0.5, 1.5, l.out_features).astype(np.float32))).realize()
  return m

def test_merge_unmerge_disabled_and_merge_and_unload(tokens):
  m = randomized_dora_lm()
  weights = {p: l.base.weight.numpy().copy() for p, l in tl.lora_layers(m).items()}
  with tl.disabled(m): base = m(tokens).numpy()
  out = m(tokens).numpy()
  assert np.abs(out - base).max() > 1e-2
  # the fused weight against numpy: g * (W + s B A) per row
  l = m.model.layers[1].mlp.down_proj
  W, A, B, mag = f64(l.base.weight, l.lora_A, l.lora_B, l.magnitude)
  _, g = np_dora(np.zeros((1, W.shape[1])), W, None, A, B, mag, l.scale)
  np.testing.assert_allclose(l.merged_weight().numpy(), g[:, None] * (W + l.scale * B @ A), rtol=1e-5, atol=1e-6)
  tl.merge(m)
  np.testing.assert_allclose(m(tokens).numpy(), out, rtol=1e-5, atol=1e-5)
  # unmerged for the while: the weights come back to float32 rounding
  with tl.disabled(m): np.testing.assert_allclose(m(tokens).numpy(), base, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(m(tokens).numpy(), out, rtol=1e-5, atol=1e-5)
  tl.unmerge(m)
  for p, l in tl.lora_layers(m).items(): np.testing.assert_allclose(l.base.weight.numpy(), weights[p], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m(tokens).numpy(), out, rtol=1e-5, atol=1e-5)
  tl.merge_and_unload(m)
  assert not tl.lora_layers(m) and not any("lora" in k or "magnitude" in k for k in nn.state.get_state_dict(m))
  np.testing.assert_allclose(m(tokens).numpy(), out, rtol=1e-5, atol=1e-5)

def test_quantized_base_forward_and_merge_and_unload():
  Tensor.manual_seed(0)
  m = quantize(TinyLM(d=64, kv=32, f=64), bits=4, group_size=32)
  q = m.model.layers[0].self_attn.q_proj
  layer = dora_layer(q, r=4, s=2.0)
  x = np.random.default_rng(0).standard_normal((3, 64))
  W = dequantize_array(q.weight.numpy(), q.scales.numpy(), q.biases.numpy(), 4, 32).astype(np.float64)
  A, B, mag = f64(layer.lora_A, layer.lora_B, layer.magnitude)
  np.testing.assert_allclose(layer(Tensor(x.astype(np.float32))).numpy(), np_dora(x, W, q.bias.numpy(), A, B, mag, 2.0)[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(tl.LoraLinear(q, r=4, scale=2.0, use_dora=True).magnitude.numpy(), np.linalg.norm(W, axis=1), rtol=1e-5)
  tl.inject(m, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False, use_dora=True))
  tok = Tensor(np.random.default_rng(0).integers(0, 48, (2, 6)).astype(np.int32))
  out = m(tok).numpy()
  with pytest.raises(LoraError, match="in place"): tl.merge(m)
  tl.merge_and_unload(m, dtype=dtypes.float32)
  np.testing.assert_allclose(m(tok).numpy(), out, rtol=1e-4, atol=1e-4)

@pytest.mark.parametrize("fmt", ["peft", "mlx"])
def test_files_round_trip(tmp_path, tokens, fmt):
  m = randomized_dora_lm()
  out = m(tokens).numpy()
  tl.save_adapter(m, tmp_path, format=fmt)
  cfg, tensors = json.loads((tmp_path / "adapter_config.json").read_text()), load_file(next(tmp_path.glob("*.safetensors")))
  if fmt == "peft":
    assert cfg["use_dora"] is True
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"].shape == (24,)
  else:
    assert cfg["fine_tune_type"] == "dora" and tensors["model.layers.0.mlp.up_proj.m"].shape == (24,)
    assert tensors["model.layers.0.mlp.up_proj.lora_a"].shape == (16, 4)  # mlx-lm's (in, r)
  Tensor.manual_seed(0)
  m2 = tl.load_adapter(TinyLM(), tmp_path)
  assert all(l.use_dora for l in tl.lora_layers(m2).values())
  np.testing.assert_allclose(m2(tokens).numpy(), out, rtol=1e-6, atol=1e-6)

def test_training_updates_the_magnitude_and_lowers_the_loss():
  Tensor.manual_seed(0)
  m = tl.inject(TinyLM(), LoraConfig(r=4, lora_alpha=8, target_modules=ALL7, use_dora=True))
  mags = [l.magnitude.numpy().copy() for l in tl.lora_layers(m).values()]
  tok = np.random.default_rng(0).integers(0, 48, (4, 8)).astype(np.int32)
  batch = [(tok, (tok * 7 + 3) % 48, np.ones((4, 8), np.float32))]
  tr = Trainer(m, TrainConfig(lr=2e-2, iters=8, warmup=0))
  losses = [tr.train_step(batch)[0] for _ in range(8)]
  assert losses[-1] < losses[0] - 0.1, losses
  assert any(np.abs(l.magnitude.numpy() - m0).max() > 1e-4 for l, m0 in zip(tl.lora_layers(m).values(), mags))

def test_zero_weight_rows_are_refused_and_nothing_changes(tokens):
  Tensor.manual_seed(0)
  m = TinyLM()
  v = m.model.layers[1].self_attn.v_proj
  v.weight.assign(v.weight * Tensor([[0.0]] * 3 + [[1.0]] * 5)).realize()
  before = m(tokens).numpy()
  with pytest.raises(LoraError, match=r"model\.layers\.1\.self_attn\.v_proj: DoRA needs a nonzero norm .* row\(s\) \[0, 1, 2\]"):
    tl.inject(m, LoraConfig(target_modules=["q_proj", "v_proj"], use_dora=True))
  assert not tl.lora_layers(m) and not tl.list_adapters(m)
  np.testing.assert_array_equal(m(tokens).numpy(), before)
  tl.inject(m, LoraConfig(target_modules=["q_proj", "v_proj"]))  # plain LoRA has no norm to compute: fine
  with pytest.raises(LoraError, match="use_dora"): LoraConfig(use_dora="yes")

def test_magnitude_of_the_wrong_shape_in_a_file_is_refused(tmp_path, tokens):
  m = randomized_dora_lm()
  tl.save_adapter(m, tmp_path)
  path = tmp_path / "adapter_model.safetensors"
  tensors = load_file(path)
  key = "base_model.model.model.layers.2.self_attn.k_proj.lora_magnitude_vector"
  tensors[key] = np.ones((8, 1), np.float32)
  save_file(tensors, path)
  Tensor.manual_seed(0)
  base = TinyLM()
  before = base(tokens).numpy()
  with pytest.raises(LoraError, match=rf"'{key}' has shape \(8, 1\), expected \(8,\)"): tl.load_adapter(base, tmp_path)
  assert not tl.lora_layers(base)
  np.testing.assert_array_equal(base(tokens).numpy(), before)

def test_dropout_applies_to_the_low_rank_input_only():
  Tensor.manual_seed(3)
  layer = tl.LoraLinear(nn.Linear(64, 64), r=4, scale=1.0, dropout=0.5, init=False, use_dora=True)
  x = Tensor.ones(8, 64).contiguous().realize()
  np.testing.assert_array_equal(layer(x).numpy(), layer(x).numpy())  # no dropout outside training
  with Context(TRAINING=1): a, b = layer(x).numpy(), layer(x).numpy()
  assert np.abs(a - b).max() > 0

def test_checkpoint_resume_restores_the_magnitude(tmp_path):
  tok = np.random.default_rng(0).integers(0, 48, (4, 8)).astype(np.int32)
  batch = [(tok, (tok * 7 + 3) % 48, np.ones((4, 8), np.float32))]
  def trainer(seed):
    Tensor.manual_seed(0)
    base = TinyLM()
    Tensor.manual_seed(seed)
    return Trainer(tl.inject(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True)),
                   TrainConfig(lr=2e-2, iters=4, warmup=0))
  a = trainer(0)
  for _ in range(2): a.train_step(batch)
  a.save_checkpoint(tmp_path)
  b = trainer(1)  # other adapter tensors at the start: everything must come from the checkpoint
  b.load_checkpoint(tmp_path)
  for t, u in zip(tl.trainable_parameters(a.model), tl.trainable_parameters(b.model)): np.testing.assert_array_equal(t.numpy(), u.numpy())
  np.testing.assert_allclose(b.train_step(batch)[0], a.train_step(batch)[0], rtol=1e-6)
