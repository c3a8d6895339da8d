"""Mixed precision: a float16 base trains with float32 LoRA tensors, gradients and AdamW state, float32 loss, and a dynamic
loss scale whose overflowing steps are skipped and recorded rather than raised; bfloat16 is refused with a message
that says what to install when the CPU compiler cannot compile it."""
import os, subprocess, sys, textwrap
import numpy as np, pytest
from tinygrad import Tensor, dtypes, nn
import tinylora as tl
from tinylora.errors import LoraError
from tinylora.models import Model
from tinylora.engine import clang_command
from tinylora.precision import LossScale, bfloat16_compile_error, check_dtype
from tinylora.train import Trainer, TrainConfig, fit

CONFIG = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True)
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 33)).astype(np.int32)
BATCH = (TOKENS[:, :-1], TOKENS[:, 1:].copy(), np.ones((2, 32), np.float32))

def trainer(dtype, **config) -> Trainer:
  Tensor.manual_seed(0)
  model = Model.from_config(CONFIG, dtype=dtype)
  tl.inject(model, tl.LoraConfig(r=4, target_modules="all-linear"))
  return Trainer(model, TrainConfig(lr=1e-2, iters=4, warmup=0, **config))

def lora_arrays(t: Trainer) -> list[np.ndarray]: return [p.numpy().copy() for p in t.params]

@pytest.fixture(scope="module")
def fp16() -> Trainer: return trainer(dtypes.float16)

def test_float16_base_float32_lora_grads_and_optimizer_state(fp16):
  model, lora = fp16.model, {id(p) for p in fp16.params}
  base = [t for t in nn.state.get_parameters(model) if id(t) not in lora]
  assert base and all(t.dtype == dtypes.float16 for t in base)
  assert model.lm_head.weight is model.model.embed_tokens.weight  # tied weights stay tied through the cast
  assert fp16.params and all(p.dtype == dtypes.float32 for p in fp16.params)
  assert all(g.dtype == dtypes.float32 for g in fp16.grads)
  assert all(t.dtype == dtypes.float32 for t in fp16.opt.m + fp16.opt.v)
  assert model(Tensor(BATCH[0])).dtype == dtypes.float32  # logits, so the loss is float32
  assert fp16.loss_scale is not None and fp16.loss_scale.value == 2.0 ** 16
  assert trainer(dtypes.float32).loss_scale is None  # float32 (and bfloat16) train unscaled

def test_float16_tracks_float32(fp16):
  f32 = trainer(dtypes.float32)
  for _ in range(3):
    (loss, norm), (ref_loss, ref_norm) = fp16.train_step([BATCH]), f32.train_step([BATCH])
    assert not fp16.last_skipped
    assert loss == pytest.approx(ref_loss, rel=3e-3) and norm == pytest.approx(ref_norm, rel=3e-2)
  assert all(p.dtype == dtypes.float32 for p in fp16.params)
  np.testing.assert_allclose(lora_arrays(fp16)[1], lora_arrays(f32)[1], atol=2e-3)  # a B after 3 updates from 0

def test_overflow_is_skipped_lowers_the_scale_and_is_recorded(fp16, tmp_path):
  fp16.step, before = 0, lora_arrays(fp16)
  fp16.loss_scale.value = 2.0 ** 24  # injected: float16 activation gradients overflow at this scale
  loss, norm = fp16.train_step([BATCH])
  assert fp16.last_skipped and np.isfinite(loss) and not np.isfinite(norm) and fp16.step == 0
  assert fp16.loss_scale.value == 2.0 ** 23 and fp16.loss_scale.skips_in_a_row == 1
  for a, b in zip(before, lora_arrays(fp16)): np.testing.assert_array_equal(a, b)  # no update, nothing reached A/B
  # fit runs on: each overflow is one record with skipped=True, then the step runs again at the halved scale
  data = [(list(map(int, row)), [1] * len(row)) for row in TOKENS]
  history = fit(fp16, data, None, batch_size=2, seq_len=32, checkpoint_dir=tmp_path, save_every=1, progress=False)
  skipped = [h for h in history if h.get("skipped")]
  assert skipped and all(h["step"] == 1 for h in skipped)
  assert [h["loss_scale"] for h in skipped] == [2.0 ** (22 - i) for i in range(len(skipped))]
  done = [h for h in history if not h.get("skipped")]
  assert [h["step"] for h in done] == [1, 2, 3, 4] and all(np.isfinite(h["grad_norm"]) for h in done)
  assert fp16.loss_scale.skips_in_a_row == 0 and sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000003", "step_000004"]
  resumed = trainer(dtypes.float16)
  resumed.load_checkpoint(tmp_path)
  assert resumed.loss_scale.value == fp16.loss_scale.value  # the scale is part of the checkpoint

def test_a_run_of_skipped_steps_raises(fp16):
  fp16.loss_scale, before = LossScale(value=2.0 ** 60, max_skips=3), lora_arrays(fp16)
  for _ in range(2): fp16.train_step([BATCH])
  with pytest.raises(LoraError, match="3 steps in a row"): fp16.train_step([BATCH])
  for a, b in zip(before, lora_arrays(fp16)): np.testing.assert_array_equal(a, b)

def test_loss_scale_grows_after_good_steps():
  s = LossScale(value=8.0, growth_interval=2)
  for overflow, value in [(False, 8), (False, 16), (True, 8), (False, 8), (False, 16)]:
    s.update(overflow, step=1)
    assert s.value == value

def fake_compiler(tmp_path, stderr: str, rc: int) -> str:
  cc = tmp_path / f"fake-cc-{rc}"
  cc.write_text(f"#!/bin/sh\ncat > /dev/null\necho '{stderr}' >&2\nexit {rc}\n")
  cc.chmod(0o755)
  return str(cc)

def test_bfloat16_refusal_names_the_fix(tmp_path):
  """A compiler that cannot do __bf16 (as Debian 12's clang 14) gets a LoraError before any model is built, naming
  what to install and set; no compiler error escapes from a step."""
  cc = fake_compiler(tmp_path, "<stdin>:1:1: error: __bf16 is not supported on this target", 1)
  code = textwrap.dedent(f"""
    from tinygrad import dtypes
    from tinylora.models import Model
    try: Model.from_config({CONFIG!r}, dtype=dtypes.bfloat16)
    except Exception as e: print(type(e).__name__, e)
    else: print("built")""")
  env = dict(os.environ, DEV="CPU", CC=cc, PATH=str(tmp_path))  # PATH: no clang-19 to suggest, on any machine
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert out.stdout.startswith("LoraError bfloat16 on CPU"), out.stdout + out.stderr
  assert "__bf16 is not supported" in out.stdout and "apt-get install clang-19" in out.stdout and "CC=clang-19" in out.stdout
  assert "float16 or float32" in out.stdout

def test_bfloat16_compile_check(tmp_path):
  if clang_command("CPU") is None: pytest.skip("this CPU device does not compile C with clang")
  assert bfloat16_compile_error(clang_command("CPU", fake_compiler(tmp_path, "", 0))) is None
  failing = fake_compiler(tmp_path, "x.c:1: error: no __bf16", 1)
  assert bfloat16_compile_error(clang_command("CPU", failing)) == "x.c:1: error: no __bf16"
  assert "No such file" in bfloat16_compile_error(clang_command("CPU", str(tmp_path / "missing-cc")))
  with pytest.raises(LoraError, match="expected float32, float16 or bfloat16"): check_dtype(dtypes.int32)
