import os
os.environ.setdefault("DEV", "CPU")
import numpy as np, pytest
from tinygrad import Tensor, nn

def norm(x: Tensor) -> Tensor: return x * (x.square().mean(-1, keepdim=True) + 1e-6).rsqrt()

class Attention:
  def __init__(self, d: int, kv: int):
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, kv), nn.Linear(d, kv), nn.Linear(d, d, bias=False)
  def __call__(self, x: Tensor) -> Tensor:
    kv = (self.k_proj(x) * self.v_proj(x)).tanh()
    return self.o_proj(self.q_proj(x).tanh() * kv.repeat(*([1] * (x.ndim - 1)), x.shape[-1] // kv.shape[-1]))

class MLP:
  def __init__(self, d: int, f: int):
    self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)
  def __call__(self, x: Tensor) -> Tensor: return self.down_proj(self.gate_proj(x).silu() * self.up_proj(x))

class Block:
  def __init__(self, d: int, kv: int, f: int): self.self_attn, self.mlp = Attention(d, kv), MLP(d, f)
  def __call__(self, x: Tensor) -> Tensor:
    x = x + self.self_attn(norm(x))
    return x + self.mlp(norm(x))

class Inner:
  def __init__(self, vocab: int, d: int, kv: int, f: int, n_layers: int):
    self.embed_tokens = Tensor.randn(vocab, d).realize()
    self.layers = [Block(d, kv, f) for _ in range(n_layers)]

class TinyLM:
  """HF-named module tree (model.layers.N.self_attn.q_proj ...) with GQA-sized k/v, for adapter tests."""
  def __init__(self, vocab=48, d=16, kv=8, f=24, n_layers=3):
    self.model, self.lm_head = Inner(vocab, d, kv, f, n_layers), nn.Linear(d, vocab, bias=False)
    Tensor.realize(*nn.state.get_parameters(self))  # lazy random weights would depend on when they are realized
  def __call__(self, tokens: Tensor) -> Tensor:
    x = self.model.embed_tokens[tokens]
    for layer in self.model.layers: x = layer(x)
    return self.lm_head(x)

@pytest.fixture
def tiny_lm():
  Tensor.manual_seed(0)
  return TinyLM()

@pytest.fixture
def tokens():
  return Tensor(np.random.default_rng(0).integers(0, 48, (2, 6)).astype(np.int32))
