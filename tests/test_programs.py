"""tinylora.engine's stored schedules and programs: the Trainer's schedules and kernels made in one process are read back, scheduled and compiled, by
the next one on the same tinygrad disk cache (CACHEDB), and train the same. Each run is a fresh process, as a user's is."""
import json, os, sqlite3, subprocess, sys
import pytest
from tinygrad import Tensor, UOp
from tinygrad.helpers import VERSION, Context
from tinygrad.tensor import transform_to_call
from tinylora.device_policy import linear
from tinylora.engine import SCHEDULES, TABLE, schedule_key

RUN = """
import json, sys
sys.path.insert(0, {tests!r})
from tinygrad import Tensor
import tinylora as tl
from tinylora.train import Trainer, TrainConfig
from conftest import TinyLM
from tinylora.models import Model
import numpy as np
Tensor.manual_seed(0)
model = {model}
model = tl.inject(model, tl.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
trainer = Trainer(model, TrainConfig(lr=1e-2, iters=2, warmup=0))
tokens = np.random.default_rng(0).integers(0, 48, (2, 9)).astype(np.int32)
batch = (tokens[:, :-1].copy(), tokens[:, 1:].copy(), np.ones((2, 8), np.float32))
print(json.dumps([trainer.train_step([batch])[0] for _ in range(2)]))
"""

MODELS = {
  "inlined": "TinyLM(n_layers=1)",
  # decoder layers as tinygrad functions: each layer body is scheduled on its own, and the step around them is keyed
  # by tinygrad with their schedules in place
  "functions": "Model.from_config(dict(model_type='llama', hidden_size=32, intermediate_size=64, num_hidden_layers=2, "
               "num_attention_heads=2, num_key_value_heads=1, vocab_size=48, max_position_embeddings=16)); "
               "model.layers_as_functions = True",
}

def run(cache_db: str, model: str) -> tuple[list[float], list[int], list[int]]:
  """The losses of two steps, and the rows of the disk cache's program and schedule tables after them: a program or
  schedule is stored when it is made, and storing it again would replace its row by a new one (a new rowid)."""
  script = RUN.format(tests=os.path.dirname(os.path.abspath(__file__)), model=MODELS[model])
  out = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, CACHEDB=cache_db), capture_output=True,
                       text=True, check=True)
  with sqlite3.connect(cache_db) as db:
    programs, schedules = ([r for r, in db.execute(f"SELECT rowid FROM '{t}_{VERSION}' ORDER BY rowid")] for t in (TABLE, SCHEDULES))
  return json.loads(out.stdout.splitlines()[-1]), programs, schedules

@pytest.mark.parametrize("model", MODELS)
def test_a_second_process_schedules_and_lowers_nothing_and_trains_the_same(tmp_path, model):
  db = str(tmp_path / "cache.db")
  (first, programs, schedules), (second, programs_again, schedules_again) = run(db, model), run(db, model)
  assert len(programs) > 10  # the steps' kernels (their count depends on tinygrad's fusion)
  # the two TinyJit'd steps (gradient accumulation, optimizer update); with functions also the layers' forward and
  # backward bodies (the first layer's backward computes no input gradient: a body of its own)
  assert len(schedules) == 2 if model == "inlined" else len(schedules) > 2
  assert programs_again == programs and schedules_again == schedules  # nothing made again, nothing stored again
  assert second == first

def step_function(x: Tensor, w: Tensor) -> UOp:
  """What Tensor.realize schedules for a loss through device_policy's CPU `linear` (a custom gradient) and its input
  gradient."""
  loss = linear(x, w).sum()
  dx, = loss.gradient(x)
  return transform_to_call(UOp.sink(loss.uop, dx.uop))[0].src[0]

def test_schedule_key_is_the_same_for_the_same_graph_and_changes_with_settings():
  x, w = Tensor.ones(4, 8).contiguous().realize(), Tensor.ones(6, 8).contiguous().realize()
  one, two = step_function(x, w), step_function(x, w)
  # tinygrad keys each custom gradient by its address in memory (id(grad_fxn)), so no two builds share its key
  assert one.key != two.key
  assert (key := schedule_key(one)) == schedule_key(two)
  with Context(SPLIT_REDUCEOP=0): assert schedule_key(one) != key  # a setting the scheduler reads
