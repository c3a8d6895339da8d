"""tinylora.programs: the Trainer's kernels compiled in one process are read back, lowered and compiled, by the next
one on the same tinygrad disk cache (CACHEDB), and train the same. Each run is a fresh process, as a user's is."""
import json, os, subprocess, sys

RUN = """
import json, sys
sys.path.insert(0, {tests!r})
from tinygrad import Tensor
from tinygrad.codegen import to_program_cache
import tinylora as tl
from tinylora.train import Trainer, TrainConfig
from conftest import TinyLM
import numpy as np
Tensor.manual_seed(0)
model = tl.inject(TinyLM(n_layers=1), tl.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
trainer = Trainer(model, TrainConfig(lr=1e-2, iters=2, warmup=0))
tokens = np.random.default_rng(0).integers(0, 48, (2, 9)).astype(np.int32)
batch = (tokens[:, :-1].copy(), tokens[:, 1:].copy(), np.ones((2, 8), np.float32))
lowered = len(to_program_cache)
losses = [trainer.train_step([batch])[0] for _ in range(2)]
print(json.dumps(dict(lowered=len(to_program_cache) - lowered, losses=losses)))
"""

def run(cache_db: str) -> dict:
  script = RUN.format(tests=os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, CACHEDB=cache_db), capture_output=True,
                       text=True, check=True)
  return json.loads(out.stdout.splitlines()[-1])

def test_a_second_process_lowers_nothing_and_trains_the_same(tmp_path):
  db = str(tmp_path / "cache.db")
  first, second = run(db), run(db)
  assert first["lowered"] > 10  # the step's kernels (their count depends on tinygrad's fusion)
  assert second["lowered"] == 0
  assert second["losses"] == first["losses"]
