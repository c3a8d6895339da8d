"""tinylora.programs: the Trainer's kernels compiled in one process are read back, lowered and compiled, by the next
one on the same tinygrad disk cache (CACHEDB), and train the same. Each run is a fresh process, as a user's is."""
import json, os, sqlite3, subprocess, sys
from tinygrad.helpers import VERSION
from tinylora.programs import TABLE

RUN = """
import json, sys
sys.path.insert(0, {tests!r})
from tinygrad import Tensor
import tinylora as tl
from tinylora.train import Trainer, TrainConfig
from conftest import TinyLM
import numpy as np
Tensor.manual_seed(0)
model = tl.inject(TinyLM(n_layers=1), tl.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
trainer = Trainer(model, TrainConfig(lr=1e-2, iters=2, warmup=0))
tokens = np.random.default_rng(0).integers(0, 48, (2, 9)).astype(np.int32)
batch = (tokens[:, :-1].copy(), tokens[:, 1:].copy(), np.ones((2, 8), np.float32))
print(json.dumps([trainer.train_step([batch])[0] for _ in range(2)]))
"""

def run(cache_db: str) -> tuple[list[float], list[int]]:
  """The losses of two steps, and the rows of the disk cache's program table after them: a program is stored when it
  is lowered, and storing it again would replace its row by a new one (a new rowid)."""
  script = RUN.format(tests=os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, CACHEDB=cache_db), capture_output=True,
                       text=True, check=True)
  with sqlite3.connect(cache_db) as db: stored = [r for r, in db.execute(f"SELECT rowid FROM '{TABLE}_{VERSION}' ORDER BY rowid")]
  return json.loads(out.stdout.splitlines()[-1]), stored

def test_a_second_process_lowers_nothing_and_trains_the_same(tmp_path):
  db = str(tmp_path / "cache.db")
  (first, stored), (second, stored_again) = run(db), run(db)
  assert len(stored) > 10  # the steps' kernels (their count depends on tinygrad's fusion)
  assert stored_again == stored  # nothing lowered again, nothing stored again
  assert second == first
