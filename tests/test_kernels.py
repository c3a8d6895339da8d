import numpy as np, pytest
from tinygrad import Tensor, Device
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad.codegen.opt.postrange import Scheduler
from tinygrad.uop.ops import Ops
from tinylora import kernels

def scheduled(out: Tensor) -> Scheduler:
  ast = [c for c in out.schedule_linear().src if c.op is Ops.CALL and c.src[0].op is Ops.SINK][-1].src[0]
  k = Scheduler(ast, Device["CPU"].renderer)
  k.convert_loop_to_global()
  return k

@pytest.mark.parametrize("transposed, plan", [
  (True, [Opt(OptOps.UPCAST, 1, 4), Opt(OptOps.UPCAST, 0, 8), Opt(OptOps.UNROLL, 0, 4)]),  # x @ W.T: dot products
  (False, [Opt(OptOps.UPCAST, 1, 16), Opt(OptOps.UPCAST, 0, 4)]),                           # x @ W: outer products
])
def test_cpu_matmul_plans(transposed, plan):
  x, w = Tensor.empty(128, 96), Tensor.empty(80, 96) if transposed else Tensor.empty(96, 80)
  assert list(kernels.cpu_matmul_optimizations(scheduled(x @ (w.T if transposed else w))).applied_opts) == plan

@pytest.mark.parametrize("make", [lambda: Tensor.empty(32, 48) @ Tensor.empty(48, 40),  # too small
                                  lambda: Tensor.empty(4, 64, 128).sum(-1)])             # three output axes
def test_other_kernels_keep_tinygrad_choice(make):
  assert kernels.cpu_matmul_optimizations(scheduled(make())).applied_opts == kernels._hand_coded(scheduled(make())).applied_opts

def test_installed_matmuls_match_numpy():
  kernels.install()
  rng = np.random.default_rng(0)
  x, w, wt = (rng.standard_normal(s).astype(np.float32) for s in ((256, 192), (160, 192), (192, 160)))
  np.testing.assert_allclose((Tensor(x) @ Tensor(w).T).numpy(), x @ w.T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose((Tensor(x) @ Tensor(wt)).numpy(), x @ wt, rtol=1e-4, atol=1e-4)
