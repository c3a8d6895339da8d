"""tinylora/device_policy.py and the engine room's kernel shapes: the CPU frozen-linear backward against numpy, the
merged-on-the-fly choice, and the CPU matmul kernel shapes: carried by the kernels compiled inside
`cpu_matmul_shapes()` (the Trainer's steps) only, in compile workers too, with tinygrad's heuristic everywhere else and
whenever a plan fails."""
import numpy as np, pytest
from tinygrad import Context, Device, Tensor, TinyJit, dtypes, nn
from tinygrad.codegen import to_program_cache
from tinygrad.codegen.opt import Opt, OptOps, heuristic
from tinygrad.engine import realize
from tinygrad.uop.ops import Ops
import tinylora as tl
from tinylora import device_policy
from tinylora.device_policy import base_forward, cpu_matmul_plan, cpu_matmul_shapes, linear, merge_on_the_fly, on_device
from tinylora.engine import KernelOpt, KernelShapes, MatmulKernel, kernel_plan, kernel_shapes
from tinylora.quant import QuantizedLinear
from tinylora.train import Trainer, TrainConfig
from conftest import TinyLM

TINYGRADS = (realize._compile_kernel, heuristic.hand_coded_optimizations)  # as tinygrad defines them

# ---- frozen linears

@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_and_gradients_match_numpy(bias):
  rng = np.random.default_rng(0)
  x, w, g = (rng.standard_normal(s).astype(np.float32) for s in ((2, 5, 12), (7, 12), (2, 5, 7)))
  b = rng.standard_normal(7).astype(np.float32) if bias else None
  tx, tw, tb = Tensor(x), Tensor(w), None if b is None else Tensor(b)
  y = linear(tx, tw, tb)
  grads = (y * Tensor(g)).sum().gradient(tx, tw, *([] if tb is None else [tb]))
  x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
  ref = [g64 @ w64, g64.reshape(-1, 7).T @ x64.reshape(-1, 12)] + ([] if b is None else [g64.sum((0, 1))])
  np.testing.assert_allclose(y.numpy(), x64 @ w64.T + (0 if b is None else b), rtol=1e-5, atol=1e-5)
  for got, want in zip(grads, ref): np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)

def test_long_input_gradient_is_a_sum_of_unsplit_matmuls():
  """An output head's input gradient (a reduction over the vocabulary) runs as matmuls over REDUCTION_CHUNK outputs each,
  none split by tinygrad's scheduler into a partial-sum kernel, and equals dy @ W."""
  rng = np.random.default_rng(0)
  n = device_policy.LONG_REDUCTION + device_policy.REDUCTION_CHUNK // 2  # a last chunk shorter than the others
  dy, wt = rng.standard_normal((3, 4, n)).astype(np.float32), rng.standard_normal((16, n)).astype(np.float32)
  got = device_policy.input_gradient(Tensor(dy), Tensor(wt))
  kernels = [c.src[0] for c in Tensor.schedule_linear(got).src if c.src[0].op is Ops.SINK]
  assert len(kernels) == -(-n // device_policy.REDUCTION_CHUNK) + 1  # the chunks' products and their sum
  np.testing.assert_allclose(device_policy.input_gradient(Tensor(dy), Tensor(wt)).numpy(),
                             dy.astype(np.float64) @ wt.astype(np.float64).T, rtol=1e-4, atol=1e-3)

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
  sharded = Tensor([1.0, 2.0]).shard(("CPU:0", "CPU:1"))  # data parallel: on CPUs only
  assert on_device(sharded, ("CPU",)) and not on_device(sharded, ("CUDA",))

def test_merge_on_the_fly_only_for_plain_linears_outside_training(monkeypatch):
  lin, x = nn.Linear(64, 64), Tensor.ones(2, 64)
  q = QuantizedLinear.from_linear(lin, bits=4, group_size=32)
  assert not merge_on_the_fly(lin, x)  # the CPU is not among MERGE_ON_THE_FLY
  monkeypatch.setattr(device_policy, "MERGE_ON_THE_FLY", ("CPU",))
  assert merge_on_the_fly(lin, x) and not merge_on_the_fly(q, x)
  with Context(TRAINING=1): assert not merge_on_the_fly(lin, x)

# ---- CPU matmul kernel shapes

def last_plan(out: Tensor) -> list[Opt] | None:
  """The tinygrad options cpu_matmul_plan chooses for the last kernel computing `out`."""
  ast = [c for c in out.schedule_linear().src if c.op is Ops.CALL and c.src[0].op is Ops.SINK][-1].src[0]
  return kernel_plan(ast, Device["CPU"].renderer, cpu_matmul_plan)

DOT = [Opt(OptOps.UPCAST, 1, 4), Opt(OptOps.UPCAST, 0, 8), Opt(OptOps.UNROLL, 0, 4)]  # x @ W.T: dot products
OUTER = [Opt(OptOps.UPCAST, 1, 16), Opt(OptOps.UPCAST, 0, 4)]                        # x @ W: outer products

def test_cpu_matmul_plan_chooses_by_layout_and_size():
  assert cpu_matmul_plan(MatmulKernel((128, 80), 96, None)) == [KernelOpt("upcast", 1, 4), KernelOpt("upcast", 0, 8), KernelOpt("unroll", 0, 4)]
  assert cpu_matmul_plan(MatmulKernel((128, 80), 96, 0)) == [KernelOpt("upcast", 0, 16), KernelOpt("upcast", 1, 4)]
  assert cpu_matmul_plan(MatmulKernel((128, 80), 32, 1)) is None  # too small

@pytest.mark.parametrize("transposed, plan", [(True, DOT), (False, OUTER)])
def test_cpu_matmul_plans(transposed, plan):
  x, w = Tensor.empty(128, 96), Tensor.empty(80, 96) if transposed else Tensor.empty(96, 80)
  assert last_plan(x @ (w.T if transposed else w)) == plan

@pytest.mark.parametrize("make", [lambda: Tensor.empty(32, 48) @ Tensor.empty(48, 40),  # too small
                                  lambda: Tensor.empty(4, 64, 128).sum(-1),              # three output axes
                                  lambda: (Tensor.empty(128, 96) @ Tensor.empty(96, 80)).max(-1)])  # a MAX reduction
def test_other_kernels_have_no_plan(make):
  assert last_plan(make()) is None

def compiled(fn) -> list[tuple]:
  """The applied_opts of every kernel program that calling fn compiled (tinygrad's in-process program cache)."""
  before = set(to_program_cache)
  fn()
  return sorted((to_program_cache[k].src[0].arg.applied_opts for k in set(to_program_cache) - before), key=str)

def two_matmuls(n: int):
  """x @ W.T then (..) @ W, on shapes no other test uses (n), and the numpy result: two kernels, so tinygrad compiles
  them in its worker processes when it has a pool."""
  rng = np.random.default_rng(n)
  x, w = rng.standard_normal((256, 192)).astype(np.float32), rng.standard_normal((n, 192)).astype(np.float32)
  tx, tw = Tensor(x).realize(), Tensor(w).realize()
  return (lambda: ((tx @ tw.T).relu().contiguous() @ tw).realize()), np.maximum(x @ w.T, 0) @ w

def test_kernels_compiled_inside_carry_the_plan_and_outside_do_not():
  step, ref = two_matmuls(160)
  jit = TinyJit(cpu_matmul_shapes()(step))
  eager = compiled(lambda: jit())  # TinyJit's first call runs eagerly
  assert eager == sorted([tuple(OUTER), tuple(DOT)], key=str)
  assert compiled(lambda: jit()) == [] and compiled(lambda: jit()) == []  # capture and replay: the same programs
  outside = compiled(step)  # the same kernels outside the block: compiled anew, with tinygrad's heuristic
  assert len(outside) == 2 and not set(outside) & set(eager)
  assert all(any(o.op is OptOps.THREAD for o in opts) for opts in outside)  # the heuristic splits over cores; plans do not
  np.testing.assert_allclose(jit().numpy(), ref, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(step().numpy(), ref, rtol=1e-4, atol=1e-3)
  # nothing of tinygrad's was replaced, and the block left its capture list as it found it
  assert (realize._compile_kernel, heuristic.hand_coded_optimizations) == TINYGRADS and realize.capturing == []

def test_order_does_not_matter():
  step, ref = two_matmuls(176)
  outside = compiled(step)  # first outside, with the heuristic
  with cpu_matmul_shapes(): inside = compiled(step)
  assert inside == sorted([tuple(OUTER), tuple(DOT)], key=str) and not set(outside) & set(inside)
  with cpu_matmul_shapes(): out = step()  # tensor data is read outside the block (as outside a TinyJit capture)
  np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-3)

def test_block_is_left_on_exceptions():
  before = list(realize.capturing)
  with pytest.raises(ZeroDivisionError), cpu_matmul_shapes(): 1 / 0
  assert realize.capturing == before
  step, _ = two_matmuls(208)
  assert all(any(o.op is OptOps.THREAD for o in opts) for opts in compiled(step))

def test_a_failing_plan_falls_back_to_tinygrad():
  step, ref = two_matmuls(224)
  seven = KernelShapes(("CPU",), lambda m: [KernelOpt("upcast", 0, 7)])  # does not divide: rejected
  with kernel_shapes(seven): rejected = compiled(step)
  assert len(rejected) == 2 and all(any(o.op is OptOps.THREAD for o in opts) for opts in rejected)
  def broken(m): raise AttributeError("a tinygrad change")
  step, ref = two_matmuls(240)
  with pytest.warns(UserWarning, match="AttributeError: a tinygrad change"), kernel_shapes(KernelShapes(("CPU",), broken)):
    out = step()
  np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-3)

def test_noopt_and_beam_win():
  step, _ = two_matmuls(272)
  with Context(NOOPT=1), cpu_matmul_shapes(): assert compiled(step) == [(), ()]

def test_trainer_steps_carry_the_plan():
  Tensor.manual_seed(0)
  model = tl.inject(TinyLM(vocab=64, d=64, kv=64, f=128, n_layers=1), tl.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
  tokens = np.random.default_rng(0).integers(0, 64, (2, 33)).astype(np.int32)
  batch = (tokens[:, :-1], tokens[:, 1:], np.ones((2, 32), np.float32))
  trainer = Trainer(model, TrainConfig(iters=3, warmup=0))
  step_opts = compiled(lambda: trainer.train_step([batch]))
  assert tuple(DOT) in step_opts and tuple(OUTER) in step_opts  # forward (x @ W.T) and input gradients (dy @ W)
  assert compiled(lambda: [trainer.train_step([batch]) for _ in range(2)]) == []  # captured and replayed as compiled
  forward = compiled(lambda: model(Tensor(batch[0])).realize())  # the model outside the Trainer: tinygrad's choices
  assert forward and not {tuple(DOT), tuple(OUTER)} & set(forward)

def test_kernels_for_other_devices_keep_tinygrads_choice():
  step, _ = two_matmuls(288)
  with kernel_shapes(KernelShapes(("CUDA", "NV"), cpu_matmul_plan)): opts = compiled(step)
  assert len(opts) == 2 and all(any(o.op is OptOps.THREAD for o in applied) for applied in opts)
