import re, warnings
import numpy as np, pytest
from tinygrad import Tensor, GlobalCounters, nn, dtypes
import tinylora as tl
from tinylora import LoraConfig, LoraError
from tinylora.quant import DENSE_ROWS, QuantizedLinear, dequantize_array, quantize, quantize_array, unpack_array
from tinylora.train import Trainer, TrainConfig
from conftest import TinyLM

def quantized_lm(bits=4):
  Tensor.manual_seed(0)
  m = TinyLM(d=64, kv=32, f=64)
  return quantize(m, bits=bits, group_size=32)

def test_lora_on_quantized_linear_matches_numpy():
  m = quantized_lm()
  q = m.model.layers[0].self_attn.q_proj
  assert isinstance(q, QuantizedLinear)
  layer = tl.LoraLinear(q, r=4, scale=2.0, init=False)
  x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
  W = dequantize_array(q.weight.numpy(), q.scales.numpy(), q.biases.numpy(), 4, 32).astype(np.float64)
  ref = x @ W.T + q.bias.numpy() + x @ layer.lora_A.numpy().T @ layer.lora_B.numpy().T * 2.0
  np.testing.assert_allclose(layer(Tensor(x)).numpy(), ref, rtol=1e-4, atol=1e-4)

def test_qlora_trains_only_lora_and_gradients_reach_x():
  m = quantized_lm()
  tl.inject(m, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
  packed = {k: t.numpy().copy() for k, t in nn.state.get_state_dict(m).items() if t.dtype == dtypes.uint32}
  assert len(packed) > 10
  x = Tensor.randn(2, 5, 64).realize()
  layer = m.model.layers[0].self_attn.q_proj
  gx, gA = layer(x).square().sum().gradient(x, layer.lora_A)
  assert np.isfinite(gx.numpy()).all() and np.abs(gx.numpy()).max() > 0 and gA.shape == layer.lora_A.shape
  rng = np.random.default_rng(0)
  tok = rng.integers(0, 48, (4, 8)).astype(np.int32)
  tr = Trainer(m, TrainConfig(lr=1e-2, iters=3, warmup=0))
  for _ in range(3): tr.train_step([(tok, (tok + 1) % 48, np.ones((4, 8), np.float32))])
  for k, t in nn.state.get_state_dict(m).items():
    if k in packed: np.testing.assert_array_equal(t.numpy(), packed[k])

def test_quantized_lora_forward_kernels_equal_fp_lora():
  Tensor.manual_seed(1)
  lin = nn.Linear(128, 128)
  Tensor.realize(lin.weight, lin.bias)
  x = Tensor.randn(DENSE_ROWS - 1, 128).realize()  # a decode step's rows: the packed weight is read in the matmul
  def count(layer):
    GlobalCounters.reset(); layer(x).realize(); return GlobalCounters.kernel_count
  fp = count(tl.LoraLinear(lin, r=8, scale=1.0, init=False))
  q = QuantizedLinear.from_linear(lin, bits=4, group_size=64)
  Tensor.realize(q.weight, q.scales, q.biases)
  assert count(tl.LoraLinear(q, r=8, scale=1.0, init=False)) == fp  # dequantization fused into the matmul

def test_merge_and_unload_on_quantized_base(tokens):
  m = quantized_lm()
  tl.inject(m, LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
  with pytest.raises(LoraError, match="merge_and_unload"): tl.merge(m)
  unmerged = m(tokens).numpy()
  tl.merge_and_unload(m)
  q = m.model.layers[0].self_attn.q_proj
  assert isinstance(q, nn.Linear) and q.weight.dtype == dtypes.float16
  np.testing.assert_allclose(m(tokens).numpy(), unmerged, rtol=2e-2, atol=2e-2)  # float16 weights

def test_requantize_after_merge_reports_the_lost_update():
  m = quantized_lm()
  tl.inject(m, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
  ratios = {}
  for i, (p, layer) in enumerate(tl.lora_layers(m).items()):  # small updates, as after a short fine-tune, of three sizes
    layer.lora_B.assign(layer.lora_B * 10.0 ** (i - 2)).realize()
    q, A, B = layer.base, layer.lora_A.numpy(), layer.lora_B.numpy()
    # numpy reference: the fused weight in float16, quantized again as mlx does, dequantized in float32
    delta = layer.scale * B.astype(np.float64) @ A
    fused = (dequantize_array(q.weight.numpy(), q.scales.numpy(), q.biases.numpy(), 4, 32) + delta).astype(np.float16)
    wq, scales, biases = quantize_array(fused, 4, 32)
    again = (unpack_array(wq, 4).astype(np.float32).reshape(*scales.shape, 32) * scales[..., None].astype(np.float32)
             + biases[..., None].astype(np.float32)).reshape(fused.shape)
    ratios[p] = np.linalg.norm(again - fused.astype(np.float32)) / np.linalg.norm(delta)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tl.merge_and_unload(m, requantize=True)
  assert isinstance(m.model.layers[0].self_attn.q_proj, QuantizedLinear)
  text = next(str(w.message) for w in caught if "rounding error / adapter update" in str(w.message))
  average, worst, path = re.search(r"= ([\d.]+) on average, ([\d.]+) at worst \((\S+)\)", text).groups()
  assert float(average) == pytest.approx(np.mean(list(ratios.values())), abs=0.006)
  assert float(worst) == pytest.approx(max(ratios.values()), abs=0.006) and path == max(ratios, key=ratios.get)
  assert max(ratios.values()) > 1 > min(ratios.values())  # one update lost in the 4-bit steps, one kept

def test_adapter_round_trip_on_quantized_model(tmp_path, tokens):
  m = quantized_lm()
  tl.inject(m, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
  out = m(tokens).numpy()
  for fmt in ("peft", "mlx"):
    tl.save_adapter(m, tmp_path / fmt, format=fmt)
    np.testing.assert_array_equal(tl.load_adapter(quantized_lm(), tmp_path / fmt)(tokens).numpy(), out)
