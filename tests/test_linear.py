import numpy as np, pytest
from tinygrad import Tensor, nn, dtypes
from tinylora.linear import linear, base_forward, on_device

@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_and_gradients_match_numpy(bias):
  rng = np.random.default_rng(0)
  x, w, g = (rng.standard_normal(s).astype(np.float32) for s in ((2, 5, 12), (7, 12), (2, 5, 7)))
  b = rng.standard_normal(7).astype(np.float32) if bias else None
  tx, tw, tb = Tensor(x), Tensor(w), None if b is None else Tensor(b)
  y = linear(tx, tw, tb)
  grads = (y * Tensor(g)).sum().gradient(tx, tw, *([] if tb is None else [tb]))
  x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
  ref_y = x64 @ w64.T + (0 if b is None else b)
  ref = [g64 @ w64, g64.reshape(-1, 7).T @ x64.reshape(-1, 12)] + ([] if b is None else [g64.sum((0, 1))])
  np.testing.assert_allclose(y.numpy(), ref_y, rtol=1e-5, atol=1e-5)
  for got, want in zip(grads, ref): np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)

def test_base_forward_is_the_module_call_in_value():
  Tensor.manual_seed(3)
  lin, x = nn.Linear(16, 8), Tensor.randn(4, 16).realize()
  np.testing.assert_array_equal(base_forward(lin, x).numpy(), lin(x).numpy())  # same forward kernels, same bits
  half = nn.Linear(16, 8)
  half.weight, half.bias = half.weight.cast(dtypes.float16), half.bias.cast(dtypes.float16)
  np.testing.assert_array_equal(base_forward(half, x.half()).numpy(), half(x.half()).numpy())

def test_on_device():
  assert on_device(Tensor([1.0], device="CPU"), ("CPU",)) and on_device(Tensor([1.0], device="CPU:1"), ("CPU",))
  assert not on_device(Tensor([1.0], device="CPU"), ("CUDA", "NV"))
  assert not on_device(Tensor([1.0, 2.0]).shard(("CPU:0", "CPU:1")), ("CPU",))  # sharded tensors keep the default path
