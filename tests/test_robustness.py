"""Issue 6: a long fine-tune killed at any moment, or an adapter file from another tool, must never end in a traceback
from deep inside, a silently wrong model or a lost checkpoint."""
import json, math, os, pathlib, random, select, signal, subprocess, sys, time
import numpy as np, pytest
from hypothesis import HealthCheck, given, settings, strategies as st
import safetensors.numpy as safetensors_numpy
from tinygrad import Tensor, nn
import tinylora as tl
from tinylora import LoraConfig, LoraError
from tinylora.formats import detect_adapter_format
from tinylora.formats.peft import config_dict as peft_config_dict, config_from_dict as config_from_peft
from tinylora.io import DIGEST, read_json, read_safetensors, write_safetensors
from tinylora.train import Trainer, TrainConfig
from conftest import Block, Inner, TinyLM

TESTS = pathlib.Path(__file__).resolve().parent
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# a small adapter that both formats can express: q and v of the last of TinyLM's 3 blocks
SMALL = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[2], init_lora_weights=False)
WEIGHTS = {"peft": "adapter_model.safetensors", "mlx": "adapters.safetensors"}

def tree_only() -> TinyLM:
  """TinyLM's module tree with its weights never realized: all that saving and loading adapters needs, built fast."""
  model, model.model = TinyLM.__new__(TinyLM), Inner.__new__(Inner)
  model.model.layers = [Block(16, 8, 24) for _ in range(3)]
  return model

# ---- 1. atomic saves under SIGKILL ----
# A saver subprocess writes both adapter formats, a Trainer checkpoint and a merged model, over and over. Each saver is
# SIGKILLed once, at a random moment; before that it is frozen (SIGSTOP) a few times at random moments, which leaves the
# files exactly as a SIGKILL there would and costs far less than starting a new process (~2 s of tinygrad start-up).

def pattern(shape, i: int, k: int) -> np.ndarray: return np.full(shape, i + k / 16, np.float32)

# Saves iteration i of everything, forever: tensor k of iteration i holds i + k/16, so a file on disk names the one
# version it came from. Prints "ready", reads the first iteration from stdin, prints i after each one.
SAVER = """
import pathlib, sys
from tinygrad import Tensor
import tinylora as tl
from tinylora.io import write_json, write_safetensors
from tinylora.train import Trainer, TrainConfig
from test_robustness import SMALL, pattern, tree_only
out, model = pathlib.Path(sys.argv[1]), tree_only()
trainer = Trainer(tl.inject(model, SMALL), TrainConfig())
layers = list(tl.lora_layers(model).values())
print("ready", flush=True)
i = int(sys.stdin.readline())
while True:
  for j, layer in enumerate(layers):
    layer.lora_A, layer.lora_B = (Tensor(pattern(t.shape, i, 2 * j + n)) for n, t in enumerate((layer.lora_A, layer.lora_B)))
  tl.save_adapter(model, out / "peft")
  tl.save_adapter(model, out / "mlx", format="mlx")
  trainer.step = i
  trainer.opt.m = [Tensor(-pattern(m.shape, i, k)) for k, m in enumerate(trainer.opt.m)]
  trainer.opt.v = [Tensor(pattern(v.shape, i, k) + 0.5) for k, v in enumerate(trainer.opt.v)]
  trainer.save_checkpoint(out / "ckpt", keep=2)
  write_safetensors(out / "merged" / "model.safetensors", {f"w{k}": pattern((512, 512), i, k) for k in range(3)},
                    {"iteration": str(i)})
  write_json(out / "merged" / "config.json", {"iteration": i})
  print(i, flush=True)
  i += 1
"""

def version(arrays: list[np.ndarray], what: str, offset: float = 0.0) -> int:
  """The one iteration every array was written by (array k holds i + k/16 + offset), or fail."""
  i = int(arrays[0].flat[0] - offset)
  for k, a in enumerate(arrays): np.testing.assert_array_equal(a, pattern(a.shape, i, k) + offset, err_msg=what)
  return i

def temp_files(folder: pathlib.Path) -> set[str]:
  # os.walk, unlike Path.rglob, skips folders that vanish while it walks (the saver deletes old checkpoints)
  return {os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.startswith(".") and f.endswith(".tmp")}

def only_tmp_extras(folder: pathlib.Path, expected: set[str]):
  """Nothing but the expected names and `.NAME.*.tmp` leftovers (never a partial file under a real name)."""
  for p in folder.iterdir():
    if p.name in expected: continue
    assert p.name.startswith(".") and p.name.endswith(".tmp") and p.name[1:].split(".tmp")[0].rsplit(".", 1)[0] in expected, p

class Checker:
  """Checks that each artifact the saver left holds one complete version, no older than the last iteration the saver
  reported finished and no newer than the one it was in."""
  def __init__(self, out: pathlib.Path):
    self.out, self.seen, self.tmp, self.mid_write = out, {}, set(), 0
    self.base, self.trainer = tree_only(), Trainer(tl.inject(tree_only(), SMALL), TrainConfig())

  def adapter(self, format: str, load: bool) -> int:
    """With `load`, through load_adapter into a model without adapters (~0.4 s); else by reading both files."""
    folder = self.out / format
    only_tmp_extras(folder, {"adapter_config.json", WEIGHTS[format]})
    if not load:
      assert detect_adapter_format(folder) == format
      return version([a for _, a in sorted(read_safetensors(folder / WEIGHTS[format])[0].items())], format)
    layers = tl.lora_layers(tl.load_adapter(self.base, folder))
    tensors, scales = [t.numpy() for l in layers.values() for t in (l.lora_A, l.lora_B)], [l.scale for l in layers.values()]
    tl.unload(self.base)
    assert scales == [2.0, 2.0]
    return version(tensors, format)

  def checkpoint(self) -> int:
    only_tmp_extras(self.out / "ckpt", {"latest.json"} | {p.name for p in (self.out / "ckpt").glob("step_*")})
    state, tr = self.trainer.load_checkpoint(self.out / "ckpt"), self.trainer
    i = version([p.numpy() for p in tr.params], "checkpoint LoRA tensors")
    assert state["step"] == tr.step == i == version([-m.numpy() for m in tr.opt.m], "optimizer m")
    assert i == version([v.numpy() for v in tr.opt.v], "optimizer v", 0.5)
    return i

  def merged(self) -> int:
    only_tmp_extras(self.out / "merged", {"model.safetensors", "config.json"})
    tensors, meta = read_safetensors(self.out / "merged" / "model.safetensors")
    i = version([tensors[f"w{k}"] for k in range(3)], "merged model")
    assert meta == {"iteration": str(i)}
    return i

  def __call__(self, start: int, done: list[int], load: bool):
    tmp = temp_files(self.out)
    self.mid_write += bool(tmp - self.tmp)  # this crash point fell inside a write
    self.tmp = tmp
    found = {"peft": self.adapter("peft", load), "mlx": self.adapter("mlx", load), "ckpt": self.checkpoint(),
             "merged": self.merged(), "merged config": read_json(self.out / "merged" / "config.json")["iteration"]}
    for what, i in found.items():
      # finished iterations are on disk; the one in progress may be too (renamed, stopped before printing)
      ok = range(done[-1], done[-1] + 2) if done else [self.seen.get(what), start]
      assert i in ok, f"{what}: found iteration {i}, expected one of {list(ok)} (saver reported {done[-3:]})"
    self.seen = found

class Saver:
  """The SAVER script in a subprocess; `done` lists the iterations it has reported finished."""
  def __init__(self, out: pathlib.Path):
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]), "DEV": os.environ.get("DEV", "CPU"),
                        "PARALLEL": "0"}  # no compile worker pool to orphan
    self.proc = subprocess.Popen([sys.executable, "-c", SAVER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 env=env, cwd=out.parent)
    self.text, self.done = "", []

  def _read(self, wait: bool = False) -> list[str]:
    """Every complete line written so far (waiting for one if `wait`)."""
    fd = self.proc.stdout.fileno()
    while wait or select.select([fd], [], [], 0)[0]:
      if not (chunk := os.read(fd, 1 << 16)): break
      self.text += chunk.decode()
      wait = wait and "\n" not in self.text
    *lines, self.text = self.text.split("\n")
    return lines

  def start(self, first: int, wait_for_one: bool):
    assert self._read(wait=True) == ["ready"]
    self.proc.stdin.write(f"{first}\n".encode()); self.proc.stdin.flush()
    if wait_for_one: self.done += map(int, self._read(wait=True))

  def freeze(self):
    """SIGSTOP: the files stay exactly as a SIGKILL at this moment would leave them until `thaw`."""
    self.proc.send_signal(signal.SIGSTOP)
    os.waitpid(self.proc.pid, os.WUNTRACED)  # returns once it has stopped
    self.done += map(int, self._read())

  def thaw(self): self.proc.send_signal(signal.SIGCONT)

  def kill(self):
    self.proc.send_signal(signal.SIGKILL)
    self.proc.wait()
    self.done += map(int, self._read())
    self.proc.stdin.close(); self.proc.stdout.close()

def crash_moment(rng: random.Random, out: pathlib.Path, max_delay: float):
  """Waits a random time or, half the time, until a new temp file appears (so the crash falls inside a write)."""
  if rng.random() < 0.5: return time.sleep(rng.uniform(0, max_delay))
  before, deadline = temp_files(out), time.monotonic() + 2 * max_delay
  while not temp_files(out) - before and time.monotonic() < deadline: time.sleep(0.0005)

def kill_saves(tmp_path: pathlib.Path, savers: int, freezes: int, max_delay: float, seed: int) -> Checker:
  """Runs `savers` saver processes one after another; each is frozen `freezes` times and then SIGKILLed, at random
  moments, and everything on disk is checked at each of those crash points."""
  rng, out = random.Random(seed), tmp_path / "out"
  check, procs = Checker(out), [Saver(out)]
  try:
    for k in range(savers):
      if k + 1 < savers: procs.append(Saver(out))  # the next one starts up (seconds) while this one is crashed
      saver = procs[k]
      saver.start(1000 * k, wait_for_one=k == 0)  # the first crash lands after one complete save
      for f in range(freezes + 1):
        crash_moment(rng, out, max_delay)
        saver.kill() if f == freezes else saver.freeze()
        check(1000 * k, saver.done, load=f == freezes)  # the real loaders after each SIGKILL
        if f < freezes: saver.thaw()
  finally:
    for saver in procs:
      if saver.proc.poll() is None: saver.kill()
  return check

def test_saves_survive_sigkill(tmp_path):
  check = kill_saves(tmp_path, savers=6, freezes=4, max_delay=0.25, seed=0)
  assert check.mid_write > 0, "no crash point fell inside a write: the test did not test anything"

@pytest.mark.slow
def test_saves_survive_many_sigkills(tmp_path):
  check = kill_saves(tmp_path, savers=40, freezes=5, max_delay=0.5, seed=1)
  assert check.mid_write > 10

# ---- 2. property-based: configs, corrupt files, round trips ----

FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "layers_to_transform", "init_lora_weights",
          "rank_pattern", "alpha_pattern")
NAMES = ALL7 + ["all-linear", "gaussian", ".*_proj", "q_.*", "(", "[a-", "\\1", ""]
FIELD_VALUES = st.one_of(
  st.none(), st.booleans(), st.integers(), st.integers(-2, 70), st.floats(), st.sampled_from([10**400, 1e308, 5e-324, -0.0]),
  st.text(max_size=6), st.sampled_from(NAMES),
  st.lists(st.one_of(st.integers(-2, 4), st.booleans(), st.sampled_from(NAMES)), max_size=4),
  st.tuples(st.sampled_from(NAMES)), st.sets(st.one_of(st.integers(0, 3), st.sampled_from(NAMES)), max_size=3),
  st.dictionaries(st.one_of(st.sampled_from(NAMES), st.integers(0, 3), st.tuples(st.text(max_size=2))),
                  st.one_of(st.integers(-1, 16), st.floats(), st.text(max_size=2), st.none()), max_size=3))
PATHS = [f"model.layers.{i}.{k}" for i in (0, 2) for k in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")] + ["lm_head"]

@settings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({}, optional={f: FIELD_VALUES for f in FIELDS}))
def test_any_config_is_accepted_or_raises_lora_error(kwargs):
  try: config = LoraConfig(**kwargs)
  except LoraError: return
  for p in PATHS:  # an accepted config works: matching, ranks, scales, and the PEFT file round trip
    if config.matches(p): assert config.rank(p) >= 1 and math.isfinite(config.scale(p))
  saved = json.loads(json.dumps(peft_config_dict(config, dict.fromkeys(PATHS)), allow_nan=False))
  if config.target_modules not in ("all-linear", None): assert config_from_peft(saved, "adapter_config.json") == config

# Valid configs drawn on purpose, with what each name, regex and pattern key applies to among PATHS written out by hand
# (the expectations come from this table, not from tinylora's matching code).
Q0, V0, D0, Q2, V2, D2, HEAD = PATHS
APPLIES = {"q_proj": {Q0, Q2}, "v_proj": {V0, V2}, "down_proj": {D0, D2}, "mlp.down_proj": {D0, D2},
           "self_attn.q_proj": {Q0, Q2}, "k_proj": set(), "gate_proj": set(), r"layers\.2\.self_attn\.q_proj": {Q2},
           "all-linear": {Q0, V0, D0, Q2, V2, D2}, r".*\.(q|v)_proj": {Q0, V0, Q2, V2},
           r"model\.layers\.[02]\..*": {Q0, V0, D0, Q2, V2, D2}, r"lm_head|.*down_proj": {D0, D2, HEAD}}
NAME_KEYS = ["q_proj", "v_proj", "down_proj", "mlp.down_proj", "self_attn.q_proj", "k_proj", "gate_proj"]
PATTERN_KEYS = ["q_proj", "v_proj", "down_proj", "mlp.down_proj", r"layers\.2\.self_attn\.q_proj"]
VALID = st.fixed_dictionaries({}, optional={
  "r": st.integers(1, 64), "lora_alpha": st.integers(1, 128) | st.floats(0.01, 1e4), "lora_dropout": st.floats(0, 0.99),
  "target_modules": st.lists(st.sampled_from(NAME_KEYS), min_size=1, max_size=4, unique=True) |
                    st.sampled_from(["all-linear", r".*\.(q|v)_proj", r"model\.layers\.[02]\..*", r"lm_head|.*down_proj"]),
  "use_rslora": st.booleans(), "layers_to_transform": st.none() | st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True),
  "init_lora_weights": st.sampled_from([True, False, "gaussian"]), "use_dora": st.booleans(),
  "rank_pattern": st.dictionaries(st.sampled_from(PATTERN_KEYS), st.integers(1, 32), max_size=3),
  "alpha_pattern": st.dictionaries(st.sampled_from(PATTERN_KEYS), st.floats(0.01, 1e3), max_size=3)})

@settings(max_examples=300, deadline=None)
@given(VALID)
def test_valid_configs_match_scale_and_round_trip(kwargs):
  config, c = LoraConfig(**kwargs), LoraConfig()  # c: the defaults, for fields not drawn
  def get(field): return kwargs.get(field, getattr(c, field))
  targets, layers = get("target_modules") or ["q_proj", "v_proj"], get("layers_to_transform")  # None: the default targets
  hit = APPLIES[targets] if isinstance(targets, str) else set().union(*(APPLIES[t] for t in targets))
  if layers is not None: hit = {p for p in hit if p != HEAD and int(p.split(".")[2]) in layers}
  assert {p for p in PATHS if config.matches(p)} == hit
  for p in hit:  # the first pattern key (in the dict's order) that applies to p wins, as in PEFT
    r = next((v for k, v in get("rank_pattern").items() if p in APPLIES[k]), get("r"))
    alpha = next((v for k, v in get("alpha_pattern").items() if p in APPLIES[k]), get("lora_alpha"))
    assert config.rank(p) == r
    assert config.scale(p) == pytest.approx(alpha / (math.sqrt(r) if get("use_rslora") else r), rel=1e-12)
  if not hit: return  # an adapter on no linear is refused by inject, so it is never saved
  saved = json.loads(json.dumps(peft_config_dict(config, dict.fromkeys(hit)), allow_nan=False))
  back = config_from_peft(saved, "adapter_config.json")
  if targets != "all-linear" and config.target_modules is not None: assert back == config
  else: assert {p for p in PATHS if back.matches(p)} == hit and saved["target_modules"] == sorted(hit)

class Base:
  """A model shared by many examples: each must leave it as it was."""
  def __init__(self):
    Tensor.manual_seed(0)
    self.model, self.tokens = TinyLM(), Tensor(np.random.default_rng(0).integers(0, 48, (2, 6)).astype(np.int32))
    self.out, self.tensors = self.model(self.tokens).numpy(), nn.state.get_state_dict(self.model)

  def assert_untouched(self):
    """Cheap, after every example: no LoRA layer left behind, the same tensors in the same places."""
    now = nn.state.get_state_dict(self.model)
    assert not tl.lora_layers(self.model) and now.keys() == self.tensors.keys()
    assert all(now[k] is t for k, t in self.tensors.items())

  def assert_unchanged(self):
    """After all examples: also the output, bit for bit."""
    self.assert_untouched()
    np.testing.assert_array_equal(self.model(self.tokens).numpy(), self.out)

@pytest.fixture(scope="module")
def shared_base() -> Base: return Base()

@pytest.fixture
def base(shared_base: Base):
  yield shared_base
  tl.unload(shared_base.model)  # a test that failed must not leave its adapter to the next one

@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory) -> dict[str, dict[str, bytes]]:
  """format -> file name -> bytes of a saved SMALL adapter."""
  Tensor.manual_seed(1)
  model, folder = tl.inject(tree_only(), SMALL), tmp_path_factory.mktemp("saved")
  for fmt in WEIGHTS: tl.save_adapter(model, folder / fmt, format=fmt)
  return {fmt: {p.name: p.read_bytes() for p in (folder / fmt).iterdir()} for fmt in WEIGHTS}

@pytest.fixture(scope="module")
def saved_layers(adapter_files, tmp_path_factory) -> dict[str, dict]:
  """format -> path -> (scale, A, B) that the undamaged files load as."""
  model, out = tree_only(), {}
  for fmt, files in adapter_files.items():
    folder = tmp_path_factory.mktemp(fmt)
    write_adapter(folder, files)
    out[fmt] = {p: (l.scale, l.lora_A.numpy(), l.lora_B.numpy()) for p, l in tl.lora_layers(tl.load_adapter(model, folder)).items()}
    tl.unload(model)
  return out

def load_or_refuse(base: Base, folder: pathlib.Path, saved: dict):
  """load_adapter either refuses with LoraError/OSError and leaves the model alone, or loads exactly what was saved:
  tinylora's files carry a SHA-256 of their tensors and of the config, so no damage can load as other numbers."""
  try: layers = tl.lora_layers(tl.load_adapter(base.model, folder))
  except (LoraError, OSError): layers = {}
  try:
    if layers: assert list(layers) == list(saved)
    for p, l in layers.items():
      assert l.scale == saved[p][0]
      np.testing.assert_array_equal(l.lora_A.numpy(), saved[p][1])
      np.testing.assert_array_equal(l.lora_B.numpy(), saved[p][2])
  finally: tl.unload(base.model)
  base.assert_untouched()

def write_adapter(folder: pathlib.Path, files: dict[str, bytes | None]):
  folder.mkdir(exist_ok=True)
  for name, data in files.items():
    if data is None: (folder / name).unlink(missing_ok=True)
    else: (folder / name).write_bytes(data)

def with_config(files: dict[str, bytes], edit) -> dict[str, bytes]:
  """`files` with adapter_config.json edited in place by `edit(config_dict)`."""
  cfg = json.loads(files["adapter_config.json"])
  edit(cfg)
  return files | {"adapter_config.json": json.dumps(cfg).encode()}

def header_edit(raw: bytes, edit) -> bytes:
  """A safetensors file with its header edited by `edit(header_dict)`, its length field kept right."""
  n = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8:8 + n])
  edit(header)
  h = json.dumps(header).encode()
  return len(h).to_bytes(8, "little") + h + raw[8 + n:]

@st.composite
def damaged(draw, data: bytes) -> bytes | None:
  """`data` truncated, bit-flipped, spliced with random bytes, replaced by random bytes, or deleted (None)."""
  kind, n = draw(st.sampled_from(["truncate", "flip", "splice", "random", "delete"])), len(data)
  if kind == "truncate": return data[:draw(st.integers(0, n - 1))]
  if kind == "flip":
    out = bytearray(data)
    for i, bit in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 7)), min_size=1, max_size=3)): out[i] ^= 1 << bit
    return bytes(out)
  if kind == "splice":
    i = draw(st.integers(0, n))
    return data[:i] + draw(st.binary(min_size=1, max_size=16)) + data[min(n, i + draw(st.integers(0, 16))):]
  return draw(st.binary(max_size=64)) if kind == "random" else None

def test_damaged_files_are_refused_and_leave_the_model_alone(base, adapter_files, saved_layers, tmp_path):
  @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(fmt=st.sampled_from(sorted(WEIGHTS)), which=st.sampled_from(["weights", "config"]), data=st.data())
  def check(fmt: str, which: str, data):
    files = dict(adapter_files[fmt])
    name = WEIGHTS[fmt] if which == "weights" else "adapter_config.json"
    files[name] = data.draw(damaged(files[name]), label=name)
    write_adapter(tmp_path / fmt, files)
    load_or_refuse(base, tmp_path / fmt, saved_layers[fmt])
  check()
  base.assert_unchanged()

JSON = st.recursive(
  st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5) |
  st.sampled_from(["F32", "BF16", "I32", "LORA", "lora", "q_proj", "self_attn.q_proj", "(", "layers", 10**400, 2**63, -1]),
  lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4) | st.sampled_from(["rank", "scale", "keys"]), c, max_size=3),
  max_leaves=6)
CONFIG_KEYS = ["r", "lora_alpha", "target_modules", "layers_to_transform", "rank_pattern", "alpha_pattern", "peft_type",
               "use_dora", "layers_pattern", "lora_parameters", "num_layers", "fine_tune_type"]

def test_hostile_json_values_are_refused_with_lora_error(base, adapter_files, saved_layers, tmp_path):
  """Well-formed files holding values of the wrong type or range: in any config field, any safetensors header field."""
  @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(fmt=st.sampled_from(sorted(WEIGHTS)), which=st.sampled_from(["config", "header"]), value=JSON, data=st.data())
  def check(fmt: str, which: str, value, data):
    def edit_config(cfg: dict):
      where = data.draw(st.sampled_from([cfg, cfg["lora_parameters"]] if fmt == "mlx" else [cfg]))
      key = data.draw(st.sampled_from(sorted(where) + CONFIG_KEYS))
      if data.draw(st.booleans()): where[key] = value
      else: where.pop(key, None)
    def edit_header(header: dict):
      key, field = data.draw(st.sampled_from(sorted(header))), data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
      if field is None or not isinstance(header[key], dict): header[key] = value
      else: header[key][field] = value
    files = adapter_files[fmt]
    if which == "config": files = with_config(files, edit_config)
    else: files = files | {WEIGHTS[fmt]: header_edit(files[WEIGHTS[fmt]], edit_header)}
    write_adapter(tmp_path / fmt, files)
    load_or_refuse(base, tmp_path / fmt, saved_layers[fmt])
  check()
  base.assert_unchanged()

def test_save_then_load_is_the_identity(base, tmp_path):
  @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(fmt=st.sampled_from(sorted(WEIGHTS)), data=st.data())
  def check(fmt: str, data):
    draw, model, folder = data.draw, base.model, tmp_path / fmt
    targets = draw(st.lists(st.sampled_from(ALL7), min_size=1, max_size=4, unique=True))
    kw = dict(r=draw(st.sampled_from([1, 2, 4])), lora_alpha=draw(st.floats(0.25, 64)), use_rslora=draw(st.booleans()),
              lora_dropout=draw(st.sampled_from([0.0, 0.1])), target_modules=targets, init_lora_weights=False)
    if fmt == "mlx":  # mlx-lm: the same keys in the last n blocks, one rank and one scale
      kw["layers_to_transform"] = draw(st.sampled_from([None, [2], [1, 2]]))
    else:
      kw["layers_to_transform"] = draw(st.none() | st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True))
      kw["rank_pattern"] = draw(st.dictionaries(st.sampled_from(targets), st.sampled_from([1, 3]), max_size=2))
      kw["alpha_pattern"] = draw(st.dictionaries(st.sampled_from(targets), st.floats(0.25, 64), max_size=2))
    config = LoraConfig(**kw)
    try:
      saved = {p: (l.r, l.scale, l.lora_A.numpy(), l.lora_B.numpy()) for p, l in tl.lora_layers(tl.inject(model, config)).items()}
      tl.save_adapter(model, folder, format=fmt)
    finally: tl.unload(model)
    try:
      loaded = tl.lora_layers(tl.load_adapter(model, folder))
      assert list(loaded) == list(saved)
      for p, (r, scale, A, B) in saved.items():
        assert (loaded[p].r, loaded[p].scale) == (r, scale)
        np.testing.assert_array_equal(loaded[p].lora_A.numpy(), A)
        np.testing.assert_array_equal(loaded[p].lora_B.numpy(), B)
      if fmt == "peft": assert all(l.config == config for l in loaded.values())
    finally: tl.unload(model)
    base.assert_untouched()
  check()
  base.assert_unchanged()

# ---- 3. errors are LoraError naming the thing (extends test_adapter.py / test_lora.py) ----

Q, V = "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"

@pytest.mark.parametrize("fmt, edit, message", [
  ("mlx", lambda c: c["lora_parameters"].update(rank=4),
   rf"'{Q}\.lora_a' has shape \(16, 2\), expected \(16, 4\); the config's rank is 4"),
  ("peft", lambda c: c.update(rank_pattern={"v_proj": 3}),
   rf"'base_model\.model\.{V}\.lora_A\.weight' has shape \(2, 16\), expected \(3, 16\); the config's rank is 3"),
  ("peft", lambda c: c.update(rank_pattern={"(": 2}), r"adapter_config\.json: LoraConfig pattern key '\(' is not a valid regex"),
  ("peft", lambda c: c.update(alpha_pattern={"q_proj": float("nan")}), r"adapter_config\.json: LoraConfig\.alpha_pattern"),
  ("peft", lambda c: c.update(lora_alpha=10**400), r"adapter_config\.json: LoraConfig\.lora_alpha"),
  ("mlx", lambda c: c["lora_parameters"].update(keys=5), r"adapter_config\.json: lora_parameters\.keys=5: expected a list"),
  ("mlx", lambda c: c["lora_parameters"].update(scale=10**400), r"adapter_config\.json: LoraConfig\.lora_alpha"),
  ("mlx", lambda c: c.update(num_layers=4), r"adapter_config\.json: num_layers=4 but the model has 3 blocks"),
  ("mlx", lambda c: c.pop("lora_parameters"), r"adapter_config\.json: lora_parameters must be an object"),
], ids=["mlx rank", "peft rank_pattern", "bad regex key", "nan alpha", "huge alpha", "mlx keys", "huge mlx scale", "num_layers",
        "no lora_parameters"])
def test_config_errors_name_the_field(base, adapter_files, tmp_path, fmt, edit, message):
  write_adapter(tmp_path, with_config(adapter_files[fmt], edit))
  with pytest.raises(LoraError, match=message): tl.load_adapter(base.model, tmp_path)
  base.assert_untouched()

QA = f"base_model.model.{Q}.lora_A.weight"

@pytest.mark.parametrize("edit, message", [
  (lambda h: h[QA].update(dtype=["F32"]), rf"tensor '{QA}' has unsupported dtype \['F32'\]"),
  (lambda h: h[QA].update(shape=[-4, -8]), rf"entry '{QA}' is malformed: negative dimension"),
  (lambda h: h[QA].update(shape=[2**40, 2**40], data_offsets=[0, 0]),  # np.prod wraps 2**80 elements to 0
   rf"tensor '{QA}' .* does not fit offsets"),
  (lambda h: h[QA].update(dtype="I32"), rf"tensor '{QA}' has dtype int32, expected a float type"),
  (lambda h: h.update({"__metadata__": [1]}), r"__metadata__ is not an object"),
], ids=["dtype list", "negative dims", "2**80 elements in 0 bytes", "int dtype", "metadata list"])
def test_safetensors_header_errors_name_the_tensor(base, adapter_files, tmp_path, edit, message):
  def by_another_tool(header: dict):  # which keeps none of tinylora's metadata (its SHA-256 would refuse any edit first)
    header["__metadata__"] = {k: v for k, v in header["__metadata__"].items() if not k.startswith("tinylora.")}
    edit(header)
  files = adapter_files["peft"]
  write_adapter(tmp_path, files | {WEIGHTS["peft"]: header_edit(files[WEIGHTS["peft"]], by_another_tool)})
  with pytest.raises(LoraError, match=rf"adapter_model\.safetensors: .*{message}"): tl.load_adapter(base.model, tmp_path)
  base.assert_untouched()

def as_other_tool(raw: bytes, edit=lambda tensors: None) -> bytes:
  """A weights file as another tool writes it, after `edit(tensors)`: through the safetensors library, with the same
  metadata but none of tinylora's (its SHA-256 of the tensors and of the config)."""
  tensors, metadata = safetensors_numpy.load(raw), json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
  edit(tensors)
  return safetensors_numpy.save(tensors, {k: v for k, v in metadata.items() if not k.startswith("tinylora.")})

@pytest.mark.parametrize("fmt", sorted(WEIGHTS))
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_tensors_are_refused(base, adapter_files, tmp_path, fmt, value):
  def poison(tensors): tensors[max(tensors)].flat[-1] = value
  write_adapter(tmp_path, adapter_files[fmt] | {WEIGHTS[fmt]: as_other_tool(adapter_files[fmt][WEIGHTS[fmt]], poison)})
  with pytest.raises(LoraError, match=rf"{WEIGHTS[fmt]}: tensor '.*{V}.*' holds non-finite values"):
    tl.load_adapter(base.model, tmp_path)
  base.assert_untouched()

@pytest.mark.parametrize("fmt", sorted(WEIGHTS))
def test_a_flipped_bit_in_a_tensor_is_caught_in_files_tinylora_wrote(base, adapter_files, saved_layers, tmp_path, fmt):
  def flip(raw: bytes) -> bytes:  # bit 0 of the last byte: an exponent bit of the last element, which stays finite
    return raw[:-1] + bytes([raw[-1] ^ 1])
  write_adapter(tmp_path, adapter_files[fmt] | {WEIGHTS[fmt]: flip(adapter_files[fmt][WEIGHTS[fmt]])})
  with pytest.raises(LoraError, match=rf"{WEIGHTS[fmt]}: its tensors do not match the SHA-256 tinylora saved"):
    tl.load_adapter(base.model, tmp_path)
  base.assert_untouched()
  # the same flip and one in the name of the SHA-256's key (found by test_damaged_files_are_refused...): the file still
  # carries tinylora's other keys, so it is not read as another tool's file, unchecked
  def rename(header: dict): header["__metadata__"]["u" + DIGEST[1:]] = header["__metadata__"].pop(DIGEST)
  write_adapter(tmp_path, adapter_files[fmt] | {WEIGHTS[fmt]: flip(header_edit(adapter_files[fmt][WEIGHTS[fmt]], rename))})
  with pytest.raises(LoraError, match=rf"{WEIGHTS[fmt]}: written by tinylora .* but its SHA-256 '{DIGEST}' is missing"):
    tl.load_adapter(base.model, tmp_path)
  base.assert_untouched()
  # a file from another tool has no SHA-256 (safetensors itself keeps none): the same flip loads, as other numbers
  write_adapter(tmp_path, adapter_files[fmt] | {WEIGHTS[fmt]: flip(as_other_tool(adapter_files[fmt][WEIGHTS[fmt]]))})
  try:
    got, saved = tl.lora_layers(tl.load_adapter(base.model, tmp_path))[V].lora_B.numpy(), saved_layers[fmt][V][2]
    assert (got != saved).sum() == 1 and got[-1, -1] / saved[-1, -1] in (4.0, 0.25)  # B[-1, -1] ends both files
  finally: tl.unload(base.model)

@pytest.mark.parametrize("fmt", sorted(WEIGHTS))
@pytest.mark.parametrize("where", ["empty", "in length", "in header", "at header end", "in body", "last byte"])
def test_truncated_safetensors_names_the_file(base, adapter_files, tmp_path, fmt, where):
  raw = adapter_files[fmt][WEIGHTS[fmt]]
  end = 8 + int.from_bytes(raw[:8], "little")
  cut = {"empty": 0, "in length": 5, "in header": end // 2, "at header end": end, "in body": (end + len(raw)) // 2,
         "last byte": len(raw) - 1}[where]
  write_adapter(tmp_path, adapter_files[fmt] | {WEIGHTS[fmt]: raw[:cut]})
  with pytest.raises(LoraError, match=rf"{WEIGHTS[fmt]}: not a valid safetensors file"): tl.load_adapter(base.model, tmp_path)
  base.assert_untouched()

@pytest.mark.parametrize("text, message", [
  ("", "invalid JSON"), ("[1, 2]", "expected a JSON object, found list"), ('"LORA"', "expected a JSON object, found str"),
  (b"\xff\xfe{}", "invalid JSON"), ('{"r": ' + "9" * 5000 + "}", "invalid JSON"), ("[" * 100_000, "invalid JSON"),
], ids=["empty", "array", "string", "not utf-8", "5000 digits", "deep nesting"])
def test_invalid_json_names_the_file(base, adapter_files, tmp_path, text, message):
  write_adapter(tmp_path, adapter_files["peft"] | {"adapter_config.json": text if isinstance(text, bytes) else text.encode()})
  with pytest.raises(LoraError, match=rf"adapter_config\.json: {message}"): tl.load_adapter(base.model, tmp_path)
  base.assert_untouched()

@pytest.mark.parametrize("array", [np.zeros(2, np.complex64), np.array([1.5], np.longdouble), np.array(["a"])],
                         ids=["complex64", "longdouble", "str"])
def test_unsupported_save_dtypes_are_refused_before_writing(tmp_path, array):
  with pytest.raises(LoraError, match=rf"tensor 'x': dtype {array.dtype} cannot be written to safetensors"):
    write_safetensors(tmp_path / "t.safetensors", {"w": np.zeros(2, np.float32), "x": array})
  assert not any(tmp_path.iterdir())

def test_unknown_format_and_missing_files(base, adapter_files, tmp_path):
  write_adapter(tmp_path, adapter_files["peft"])
  with pytest.raises(LoraError, match="unknown adapter format 'onnx': expected 'peft', 'mlx' or 'gguf'"):
    tl.load_adapter(base.model, tmp_path, format="onnx")
  write_adapter(tmp_path / "mlx", adapter_files["mlx"] | {WEIGHTS["mlx"]: None})
  with pytest.raises(FileNotFoundError, match="adapters.safetensors"): tl.load_adapter(base.model, tmp_path / "mlx")
  with pytest.raises(FileNotFoundError, match="adapter directory not found"):
    tl.load_adapter(base.model, tmp_path / "adapter_model.safetensors")  # a file, not the folder
  base.assert_untouched()
  model = tl.inject(base.model, SMALL)
  try:
    with pytest.raises(LoraError, match="unknown adapter format 'onnx'"): tl.save_adapter(model, tmp_path / "new", format="onnx")
    assert not (tmp_path / "new").exists()
  finally: tl.unload(model)

@pytest.mark.parametrize("kwargs, message", [
  (dict(lora_alpha=10**400), "LoraConfig.lora_alpha"), (dict(lora_dropout=-10**400), "LoraConfig.lora_dropout"),
  (dict(alpha_pattern={"q_proj": 10**400}), "LoraConfig.alpha_pattern"),
  (dict(target_modules={1, "q_proj"}), "LoraConfig.target_modules"),
  (dict(target_modules=("q_proj", None)), "LoraConfig.target_modules"),
  (dict(rank_pattern={("q_proj",): 2}), "LoraConfig.rank_pattern"), (dict(alpha_pattern={None: 2.0}), "LoraConfig.alpha_pattern"),
  (dict(rank_pattern={"q_proj(": 2}), r"pattern key 'q_proj\(' is not a valid regex"),
  (dict(alpha_pattern={"[v": 2.0}), r"pattern key '\[v' is not a valid regex"),
], ids=["alpha 10**400", "dropout -10**400", "alpha_pattern 10**400", "mixed set", "tuple with None", "tuple key", "None key",
        "bad rank regex", "bad alpha regex"])
def test_config_values_that_used_to_escape_as_other_errors(kwargs, message):
  with pytest.raises(LoraError, match=message): LoraConfig(**kwargs)

def test_state_errors_name_the_layers_and_change_nothing(base, tmp_path):
  with pytest.raises(LoraError, match="no LoRA adapters to save"): tl.save_adapter(base.model, tmp_path)
  for fn in (tl.merge, tl.unmerge, tl.merge_and_unload):
    with pytest.raises(LoraError, match="no LoRA adapters"): fn(base.model)
  base.assert_untouched()
  assert not any(tmp_path.iterdir())
  Tensor.manual_seed(2)
  model = tl.inject(TinyLM(), SMALL)  # not the shared base: merging changes base weights by rounding
  with pytest.raises(LoraError, match="already has an adapter named 'default'"): tl.inject(model, SMALL)
  with pytest.raises(LoraError, match=rf"not merged: {Q}, {V}"): tl.unmerge(model)
  q = tl.lora_layers(model)[Q]
  with pytest.raises(LoraError, match="adapter is not merged"): q.unmerge()
  tl.merge(model)
  merged = q.base.weight.numpy()
  with pytest.raises(LoraError, match=rf"already merged: {Q}, {V}"): tl.merge(model)
  with pytest.raises(LoraError, match="adapter is already merged"): q.merge()
  np.testing.assert_array_equal(q.base.weight.numpy(), merged)

def small_trainer(seed: int, config: LoraConfig = SMALL) -> Trainer:
  Tensor.manual_seed(seed)
  return Trainer(tl.inject(tree_only(), config), TrainConfig())

@pytest.fixture
def checkpoint(tmp_path) -> pathlib.Path:
  small_trainer(3).save_checkpoint(tmp_path)
  return tmp_path

@pytest.mark.parametrize("damage, error, message", [
  (lambda d: (d / "latest.json").write_text("{"), LoraError, r"latest\.json: invalid JSON"),
  (lambda d: (d / "latest.json").write_text("[]"), LoraError, r"latest\.json: expected a JSON object"),
  (lambda d: (d / "step_000000" / "optimizer.safetensors").write_bytes(b"\0" * 9), LoraError,
   r"optimizer\.safetensors: not a valid safetensors file"),
  (lambda d: (d / "step_000000" / "trainer_state.json").unlink(), FileNotFoundError, "trainer_state.json"),
  (lambda d: (d / "latest.json").write_text('{"checkpoint": "step_000009"}'), FileNotFoundError, "step_000009"),
], ids=["latest not JSON", "latest not an object", "optimizer truncated", "state missing", "latest names a missing folder"])
def test_damaged_checkpoint_errors_name_the_file(checkpoint, damage, error, message):
  damage(checkpoint)
  with pytest.raises(error, match=message): small_trainer(4).load_checkpoint(checkpoint)

def test_checkpoint_of_another_rank_names_the_tensor(checkpoint):
  trainer = small_trainer(4, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[2]))
  before = [p.numpy() for p in trainer.params]
  with pytest.raises(LoraError, match=rf"step_000000: tensor '{QA}' has shape \(2, 16\), expected \(4, 16\)"):
    trainer.load_checkpoint(checkpoint)
  for p, b in zip(trainer.params, before): np.testing.assert_array_equal(p.numpy(), b)  # checked before assigning

def test_checkpoint_pointer_without_its_key_is_a_lora_error(checkpoint):
  (checkpoint / "latest.json").write_text("{}")
  with pytest.raises(LoraError, match="latest.json"): small_trainer(4).load_checkpoint(checkpoint)

# ---- 4. the non-finite guard, end to end ----

def train_batch(step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  seq = np.random.default_rng(step).integers(0, 48, (8, 13)).astype(np.int32)
  return seq[:, :-1], seq[:, 1:], np.ones((8, 12), np.float32)

def lm_trainer() -> Trainer:
  Tensor.manual_seed(0)
  model = tl.inject(TinyLM(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
  return Trainer(model, TrainConfig(lr=1e-2, iters=10, warmup=0))

def trainer_state(tr: Trainer) -> list[np.ndarray]:
  return [t.numpy().copy() for t in (*tr.params, *tr.opt.m, *tr.opt.v, tr.opt.b1_t, tr.opt.b2_t)]

def poison_next_batch(tr: Trainer, step: int) -> np.ndarray:
  """Sets the embedding of one token of batch `step` to nan (its loss turns non-finite mid-run); returns the clean table."""
  embed = tr.model.model.embed_tokens
  clean = embed.numpy().copy()
  poisoned = clean.copy()
  poisoned[train_batch(step)[0][0, 0]] = np.nan
  embed.assign(Tensor(poisoned)).realize()
  return clean

def test_non_finite_step_is_refused_and_the_last_checkpoint_survives(tmp_path):
  tr = lm_trainer()
  for step in range(3):
    tr.train_step([train_batch(step)])
    tr.save_checkpoint(tmp_path, keep=2)
  before = trainer_state(tr)
  poison_next_batch(tr, 3)
  with pytest.raises(LoraError, match=r"step 4: non-finite (loss|gradient) .*no update was applied and nothing was saved"):
    tr.train_step([train_batch(3)])
  assert tr.step == 3
  for a, b in zip(trainer_state(tr), before): np.testing.assert_array_equal(a, b)  # LoRA and AdamW state untouched
  assert read_json(tmp_path / "latest.json") == {"checkpoint": "step_000003"}
  resumed = lm_trainer()
  assert resumed.load_checkpoint(tmp_path)["step"] == resumed.step == 3
  for a, b in zip(trainer_state(resumed), before):
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
  assert all(math.isfinite(x) for x in resumed.train_step([train_batch(3)]))  # the run goes on from the checkpoint

def test_training_goes_on_in_process_after_a_refused_step():
  tr = lm_trainer()
  tr.train_step([train_batch(0)])
  clean = poison_next_batch(tr, 1)
  with pytest.raises(LoraError, match="step 2: non-finite"): tr.train_step([train_batch(1)])
  tr.model.model.embed_tokens.assign(Tensor(clean)).realize()
  assert all(math.isfinite(x) for x in tr.train_step([train_batch(2)]))  # skipping the bad batch must work
