from typing import NamedTuple
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from tinygrad import Device, Tensor, dtypes, nn, GlobalCounters
from tinygrad.nn.state import get_state_dict, load_state_dict
from tinylora.errors import LoraError
from tinylora.device_policy import base_forward
from tinylora.engine import peak_memory
from tinylora.quant import (BITS, DENSE_ROWS, GROUP_SIZES, QuantizedEmbedding, QuantizedLinear, _unpack, dequantize, dequantize_array, linear_shape,
                            pack_array, prepare_quantized, quantization_config, quantize, quantize_array, unpack_array)

RNG = np.random.default_rng(0)

def _loaded(ql, w: np.ndarray):
  ql.weight, ql.scales, ql.biases = (Tensor(a).realize() for a in quantize_array(w, ql.bits, ql.group_size))
  return ql

def _dequantized(m) -> np.ndarray:
  return dequantize_array(m.weight.numpy(), m.scales.numpy(), m.biases.numpy(), m.bits, m.group_size).astype(np.float64)

# ---------------------------------------------------------------- layout and numpy reference

def test_word_layout_is_little_end_first():
  assert pack_array(np.arange(8)[None], 4).tolist() == [[0x76543210]]
  assert pack_array(np.array([[1, 2, 3, 4]]), 8).tolist() == [[0x04030201]]
  # 3-bit values run on across words: value 10 occupies bits 30..32
  assert pack_array(np.array([[0] * 10 + [7] + [0] * 21]), 3).tolist() == [[0xC0000000, 0x1, 0x0]]

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_pack_unpack_round_trip(bits, group_size):
  q = RNG.integers(0, 2**bits, (3, 2 * group_size), dtype=np.uint8)
  packed = pack_array(q, bits)
  assert packed.dtype == np.uint32 and packed.shape == (3, 2 * group_size * bits // 32)
  np.testing.assert_array_equal(unpack_array(packed, bits), q)
  w = RNG.standard_normal((3, 2 * group_size)).astype(np.float32)
  wq, scales, biases = quantize_array(w, bits, group_size)
  assert scales.shape == biases.shape == (3, 2) and scales.dtype == np.float32
  np.testing.assert_array_equal(pack_array(unpack_array(wq, bits), bits), wq)

@pytest.mark.parametrize("bits", BITS)
def test_tinygrad_unpack_matches_numpy(bits):
  wq = RNG.integers(0, 2**32, (4, 3 * bits), dtype=np.uint32)
  np.testing.assert_array_equal(_unpack(Tensor(wq), bits).numpy(), unpack_array(wq, bits))

# mx.quantize(w, group_size=32, bits) from mlx 0.32.4 (CPU) on the w below
_W = np.stack([((np.arange(64) * 37) % 101 - 50) / 64, ((np.arange(64) * 13) % 29) / 128]).astype(np.float32)
_MLX = {
  4: ([0x7d38e4af, 0x8e4af5b1, 0x9f5b06c2, 0xa06c28d3, 0xb17d39f4, 0xd28e4af5, 0xe39f5b07, 0xf4a06c28,
       0xd4b3a18f, 0x4b2918e6, 0xa2907e5c, 0x18f6d5c3, 0x8e6d4b3a, 0xe5c4b291, 0x5c3a2907, 0xb3a18f6d],
      [[-0.09765625, -0.095703125], [-0.014583333395421505, -0.014583333395421505]]),
  3: ([0xf078ceaf, 0x50f19d5e, 0xa1e33abd, 0x7bc2733a, 0xf543c675, 0xea878cea,
       0x3bca9827, 0x079654c1, 0x13bcb2a6, 0x609de54c, 0x5303cb2a, 0xa609de59],
      [[-0.1953125, -0.19140625], [-0.03125, -0.03125]])}

@pytest.mark.parametrize("bits", [4, 3])
def test_quantize_array_matches_recorded_mlx_output(bits):
  words, scales = _MLX[bits]
  wq, s, b = quantize_array(_W, bits, 32)
  assert wq.ravel().tolist() == words
  assert s.tolist() == scales and b.tolist() == [[0.78125, 0.765625], [0.21875, 0.21875]]

@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=64, max_size=64), st.sampled_from([2, 3, 4, 8]))
def test_quantization_error_is_within_one_step(values, bits):
  # mlx snaps the scale so the group edge of larger magnitude is exact; the far edge may then be clipped by up to
  # one step, every other value is within half a step
  w = np.array(values, np.float32).reshape(2, 32)
  wq, scales, biases = quantize_array(w, bits, 32)
  err = np.abs(dequantize_array(wq, scales, biases, bits, 32).astype(np.float64) - w)
  step = np.repeat(np.abs(scales.astype(np.float64)), 32, axis=-1)
  assert (err <= step + 4 * np.spacing(np.abs(w).max(-1, keepdims=True))).all()

# ---------------------------------------------------------------- layers

@pytest.mark.parametrize("bits,group_size,dtype", [(4, 32, dtypes.float32), (4, 64, dtypes.float32), (8, 128, dtypes.float32),
                                                   (3, 64, dtypes.float32), (4, 64, dtypes.float16)])
def test_forward_matches_numpy(bits, group_size, dtype):
  ql = _loaded(QuantizedLinear(256, 24, True, bits, group_size), RNG.standard_normal((24, 256)).astype(np.float32) * 0.1)
  ql.bias = Tensor(RNG.standard_normal(24).astype(np.float32))
  x = RNG.standard_normal((2, 5, 256)).astype(np.float32)
  y = ql(Tensor(x).cast(dtype))
  assert y.dtype == dtype and y.shape == (2, 5, 24)
  w = _dequantized(ql)
  ref, mag = x @ w.T + ql.bias.numpy(), np.abs(x) @ np.abs(w).T
  # float32: 1e-5 of the sum of |x*w| terms; float16 inputs, weights and output: 1e-2 of it
  tol = 1e-5 if dtype == dtypes.float32 else 1e-2
  assert (np.abs(y.numpy().astype(np.float64) - ref) <= tol * (mag + 1)).all()

def test_gradient_flows_to_x_and_adapters_not_to_packed_weight():
  ql = _loaded(QuantizedLinear(64, 8, False, 4, 32), RNG.standard_normal((8, 64)).astype(np.float32))
  x = Tensor(RNG.standard_normal((3, 64)))
  a = Tensor(RNG.standard_normal((2, 64)).astype(np.float32) * 0.1)
  b = Tensor(RNG.standard_normal((8, 2)).astype(np.float32) * 0.1)
  y = ql(x) + x @ a.T @ b.T
  loss = (y * y).sum()
  dx, da = (g.numpy().astype(np.float64) for g in loss.gradient(x, a))
  w, xn, an, bn = _dequantized(ql), x.numpy().astype(np.float64), a.numpy().astype(np.float64), b.numpy().astype(np.float64)
  dy = 2 * (xn @ w.T + xn @ an.T @ bn.T)
  np.testing.assert_allclose(dx, dy @ (w + bn @ an), rtol=1e-4, atol=1e-4)  # float32 vs float64 reference
  np.testing.assert_allclose(da, bn.T @ dy.T @ xn, rtol=1e-4, atol=1e-4)
  assert ql.weight.dtype == dtypes.uint32  # packed codes are integers: no gradient can be defined for them

class Counted(NamedTuple):
  kernels: int
  ops: int
  added: int  # peak bytes allocated above the starting point

def _realize_counting(*outs: Tensor) -> Counted:
  """What realizing `outs` runs and allocates."""
  with peak_memory() as memory:
    GlobalCounters.reset()
    Tensor.realize(*outs)
  return Counted(GlobalCounters.kernel_count, GlobalCounters.global_ops, memory.added)

@pytest.mark.parametrize("bits", [4, 8, 3])
def test_dequantization_fuses_into_the_matmul(bits):  # at fewer than DENSE_ROWS rows (decoding)
  lin = nn.Linear(256, 128)
  ql = QuantizedLinear.from_linear(lin, bits, 64)
  Tensor.realize(lin.weight, lin.bias, ql.weight, ql.scales, ql.biases)
  results = []
  for m in (lin, ql):
    x = Tensor(RNG.standard_normal((4, 256)).astype(np.float32)).realize()
    fwd = _realize_counting(m(x))
    loss = (m(x) ** 2).sum()
    results.append((fwd, _realize_counting(loss, *loss.gradient(x))))
  (fp_fwd, fp_bwd), (q_fwd, q_bwd) = results
  for fp, q in zip((fp_fwd, fp_bwd), (q_fwd, q_bwd)):  # same kernels, and no buffer beyond the fp path's (no (128, 256) weight)
    assert (q.kernels, q.added) == (fp.kernels, fp.added)
  assert q_fwd.added == 4 * 128 * 4

@pytest.mark.skipif(Device.DEFAULT != "CPU", reason="the transient float copy is the CPU's path")
@pytest.mark.parametrize("bits", [4, 8])
def test_training_rows_dequantize_one_weight_at_a_time(bits):
  """A stack of packed linears at DENSE_ROWS rows, forward and input gradient: the matmuls of the float path plus the
  dequantizations, exact within float rounding, and one weight's float copy alive at a time (the float path holds a
  transposed copy of each)."""
  fp = [nn.Linear(512, 512, bias=False) for _ in range(6)]
  Tensor.realize(*(l.weight for l in fp))
  packed = [QuantizedLinear.from_linear(l, bits, 32) for l in fp]
  Tensor.realize(*(t for l in packed for t in (l.weight, l.scales, l.biases)))
  x = Tensor(RNG.standard_normal((DENSE_ROWS, 512)).astype(np.float32)).realize()
  results = []
  for stack in (fp, packed):
    h = x
    for layer in stack: h = base_forward(layer, h)
    loss = (h * h).sum()
    dx, = loss.gradient(x)
    results.append((_realize_counting(loss, dx), dx.numpy()))
  (fp, _), (q, q_dx) = results
  assert q.ops <= 1.2 * fp.ops and q.added < 3 * 512 * 512 * 4 < fp.added
  ws, h = [_dequantized(layer) for layer in packed], x.numpy().astype(np.float64)
  for w in ws: h = h @ w.T
  dy = 2 * h
  for w in reversed(ws): dy = dy @ w
  np.testing.assert_allclose(q_dx, dy, rtol=0, atol=1e-5 * np.abs(dy).max())

def test_quantized_weight_is_under_a_third_of_fp16():
  ql = QuantizedLinear(4096, 64, False, 4, 64, dtypes.float16)
  assert sum(t.nbytes() for t in (ql.weight, ql.scales, ql.biases)) <= 0.3 * 64 * 4096 * 2

def test_embedding_lookup_and_tied_head():
  qe = _loaded(QuantizedEmbedding(40, 64, 4, 32), RNG.standard_normal((40, 64)).astype(np.float32))
  w, idx = _dequantized(qe), np.array([[3, 0, 39], [3, 7, 1]])
  np.testing.assert_allclose(qe(Tensor(idx, dtype=dtypes.int32)).numpy(), w[idx], rtol=1e-6, atol=1e-6)
  x = RNG.standard_normal((2, 64)).astype(np.float32)
  np.testing.assert_allclose(qe.as_linear(Tensor(x)).numpy(), x @ w.T, rtol=1e-5, atol=1e-4)
  assert qe.dequantize().shape == (40, 64)

def test_linear_shape():
  assert linear_shape(nn.Linear(32, 8)) == (8, 32)
  assert linear_shape(QuantizedLinear(64, 8)) == (8, 64)
  assert linear_shape(nn.Embedding(4, 8)) is None and linear_shape(QuantizedEmbedding(4, 64)) is None

# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,words", [({"bits": 7}, ["bits=7", "[2, 3, 4, 5, 6, 8]"]),
                                          ({"group_size": 16}, ["group_size=16", "[32, 64, 128]"]),
                                          ({"mode": "mxfp4"}, ["'mxfp4'", "'affine'"])])
def test_unsupported_options_are_named(kwargs, words):
  with pytest.raises(LoraError) as e: prepare_quantized(_Toy(), {"group_size": 64, "bits": 4, **kwargs}, set())
  assert all(w in str(e.value) for w in words)
  if "mode" not in kwargs:
    with pytest.raises(LoraError, match=words[0]): QuantizedLinear(128, 8, **kwargs)
    with pytest.raises(LoraError, match=words[0]): quantize_array(np.zeros((1, 128), np.float32), **kwargs)

def test_per_layer_override_is_validated():
  with pytest.raises(LoraError, match="bits=7"):
    prepare_quantized(_Toy(), {"group_size": 32, "bits": 4, "layers.0.q_proj": {"bits": 7}}, {"layers.0.q_proj.scales"})

def test_in_features_must_divide_by_group_size():
  with pytest.raises(LoraError, match="in_features=48"): QuantizedLinear(48, 8, group_size=32)

# ---------------------------------------------------------------- whole models

class _Block:
  def __init__(self):
    self.q_proj, self.o_proj, self.odd = nn.Linear(64, 64), nn.Linear(64, 64, bias=False), nn.Linear(48, 64)

class _Toy:
  def __init__(self):
    self.embed_tokens = nn.Embedding(50, 64)
    self.layers = [_Block(), _Block()]
    self.heads = {"lm_head": nn.Linear(64, 50, bias=False)}

  def __call__(self, idx: Tensor) -> Tensor:
    h = self.embed_tokens(idx)
    for layer in self.layers: h = layer.o_proj(layer.q_proj(h))
    return self.heads["lm_head"](h)

def _linear_bound(x: np.ndarray, dx: np.ndarray, w: np.ndarray, step: np.ndarray) -> np.ndarray:
  """Bound on |x'W'^T - x W^T| when |x' - x| <= dx and |W' - W| <= step elementwise (W' the quantized weight)."""
  return dx @ np.abs(w).T + (np.abs(x) + dx) @ step.T

def test_quantize_model_is_close_to_fp_within_the_quantization_step():
  model, idx = _Toy(), Tensor([[1, 2, 3, 49]], dtype=dtypes.int32)
  fp = {k: v.numpy().astype(np.float64) for k, v in get_state_dict(model).items()}
  ref = model(idx).numpy()
  assert quantize(model, bits=4, group_size=32, predicate=lambda name, m: {"bits": 8} if name == "heads.lm_head" else True) is model
  assert quantization_config(model) == {"group_size": 32, "bits": 4, "mode": "affine",
                                       "heads.lm_head": {"group_size": 32, "bits": 8, "mode": "affine"}}
  assert not hasattr(model, "quantization")  # read from the layers when saving, not recorded beside them
  assert isinstance(model.embed_tokens, QuantizedEmbedding) and isinstance(model.heads["lm_head"], QuantizedLinear)
  assert all(isinstance(l.q_proj, QuantizedLinear) and isinstance(l.o_proj, QuantizedLinear) for l in model.layers)
  assert all(isinstance(l.odd, nn.Linear) for l in model.layers)  # 48 inputs do not divide into groups of 32
  assert model.heads["lm_head"].bits == 8 and model.layers[0].q_proj.bias is not None
  # propagate the one-step-per-weight bound (see test_quantization_error_is_within_one_step) through the network
  def step(name): return np.repeat(np.abs(get_state_dict(model)[f"{name}.scales"].numpy().astype(np.float64)), 32, -1)
  h = fp["embed_tokens.weight"][idx.numpy()]
  dh = step("embed_tokens")[idx.numpy()]
  for name in ["layers.0.q_proj", "layers.0.o_proj", "layers.1.q_proj", "layers.1.o_proj", "heads.lm_head"]:
    w = fp[f"{name}.weight"]
    h, dh = h @ w.T + fp.get(f"{name}.bias", 0), _linear_bound(h, dh, w, step(name))
  np.testing.assert_allclose(ref, h, rtol=1e-4, atol=1e-4)
  err = np.abs(model(idx).numpy() - ref)
  assert (err <= dh * 1.001 + 1e-4).all() and err.max() > 0

def test_prepare_quantized_swaps_exactly_the_stored_modules_and_loads():
  source = quantize(_Toy(), bits=4, group_size=32)
  source.layers[1].q_proj = nn.Linear(64, 64)  # stored unquantized
  sd = {k: v.realize() for k, v in get_state_dict(source).items()}
  config = {"group_size": 32, "bits": 4, "mode": "affine", "heads.lm_head": {"group_size": 64, "bits": 8}}
  source.heads["lm_head"] = _loaded(QuantizedLinear(64, 50, False, 8, 64), source.heads["lm_head"].dequantize().numpy())
  sd.update({f"heads.lm_head.{k}": v for k, v in get_state_dict(source.heads["lm_head"]).items()})
  target = _Toy()
  prepare_quantized(target, config, set(sd))
  assert isinstance(target.embed_tokens, QuantizedEmbedding) and isinstance(target.layers[0].q_proj, QuantizedLinear)
  assert isinstance(target.layers[1].q_proj, nn.Linear) and isinstance(target.layers[0].odd, nn.Linear)
  assert (target.heads["lm_head"].bits, target.heads["lm_head"].group_size) == (8, 64)
  assert quantization_config(target) == config | {"heads.lm_head": {"group_size": 64, "bits": 8, "mode": "affine"}}
  assert set(get_state_dict(target)) == set(sd)
  load_state_dict(target, sd, verbose=False)
  idx = Tensor([[4, 9, 0]], dtype=dtypes.int32)
  np.testing.assert_array_equal(target(idx).numpy(), source(idx).numpy())

def test_prepare_quantized_honours_false_override():
  target = _Toy()
  prepare_quantized(target, {"group_size": 32, "bits": 4, "layers.0.q_proj": False}, {"layers.0.q_proj.scales", "layers.0.o_proj.scales"})
  assert isinstance(target.layers[0].q_proj, nn.Linear) and isinstance(target.layers[0].o_proj, QuantizedLinear)
  assert isinstance(target.embed_tokens, nn.Embedding)

class _Tied:
  def __init__(self):
    self.embed_tokens, self.lm_head = nn.Embedding(50, 64), nn.Linear(64, 50, bias=False)
    self.lm_head.weight = self.embed_tokens.weight

def test_tied_head_shares_the_quantized_embedding():
  model = quantize(_Tied(), bits=4, group_size=32)
  assert model.lm_head.weight is model.embed_tokens.weight and model.lm_head.scales is model.embed_tokens.scales
  assert quantization_config(model) == {"group_size": 32, "bits": 4, "mode": "affine"}
  # an mlx-lm tied checkpoint stores only the embedding; its head is embed_tokens.as_linear
  target = _Tied()
  prepare_quantized(target, quantization_config(model), {f"embed_tokens.{k}" for k in ("weight", "scales", "biases")})
  assert isinstance(target.lm_head, QuantizedLinear) and target.lm_head.biases is target.embed_tokens.biases
  for k in ("weight", "scales", "biases"): getattr(target.embed_tokens, k).replace(getattr(model.embed_tokens, k))
  x = Tensor(RNG.standard_normal((2, 64)).astype(np.float32))
  np.testing.assert_array_equal(target.lm_head(x).numpy(), model.embed_tokens.as_linear(x).numpy())

def test_dequantize_gives_back_plain_layers_with_the_packed_values():
  model, idx = quantize(_Toy(), bits=4, group_size=32), Tensor([[1, 2, 3, 49]], dtype=dtypes.int32)
  want = {name: _dequantized(m) for name, m in (("embed", model.embed_tokens), ("head", model.heads["lm_head"]),
                                                ("q0", model.layers[0].q_proj))}
  logits, bias = model(idx).numpy(), model.layers[0].q_proj.bias
  assert dequantize(model) is model and quantization_config(model) == {}
  assert isinstance(model.embed_tokens, nn.Embedding) and isinstance(model.heads["lm_head"], nn.Linear)
  assert all(type(l.q_proj) is nn.Linear and type(l.o_proj) is nn.Linear for l in model.layers)
  assert model.layers[0].q_proj.bias is bias and model.layers[0].o_proj.bias is None
  for name, m in (("embed", model.embed_tokens), ("head", model.heads["lm_head"]), ("q0", model.layers[0].q_proj)):
    assert m.weight.dtype == dtypes.float32
    np.testing.assert_allclose(m.weight.numpy(), want[name], rtol=0, atol=1e-6)  # w = scale * q + bias, in float32
  np.testing.assert_allclose(model(idx).numpy(), logits, rtol=1e-5, atol=1e-5)  # the same model, now plain
  weights = dict(get_state_dict(model))
  assert dequantize(model) is model and dict(get_state_dict(model)) == weights  # nothing left to dequantize

def test_dequantize_keeps_a_tied_head_tied():
  model = dequantize(quantize(_Tied(), bits=4, group_size=32), dtypes.float16)
  assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed_tokens.weight
  assert model.embed_tokens.weight.dtype == dtypes.float16
