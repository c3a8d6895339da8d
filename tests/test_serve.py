"""`tinylora serve` through the official `openai` client: a server started in a process of its own on a free port,
serving a small model and its adapters. Answers equal `generate` with the same adapter, alone or batched with other
requests; bad requests get OpenAI's error objects and the server goes on; adapters load and unload while serving;
the queue is bounded; a client leaving mid-stream frees its row; SIGTERM lets running requests finish."""
import concurrent.futures, json, os, re, signal, socket, subprocess, sys, threading, time, urllib.request
import numpy as np, pytest
from tinygrad import Tensor
from tinylora import LoraConfig, inject, load_adapter, load_pretrained, load_tokenizer, save_adapter, save_pretrained
from tinylora.batching import BatchDecoder
from tinylora.generate import generate
from tinylora.lora import BASE
from tinylora.models import Model
from tinylora.quant import quantize

openai = pytest.importorskip("openai", reason="the test extra's 'openai' package is not installed")
CONFIG = dict(model_type="qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, vocab_size=300, rms_norm_eps=1e-5, max_position_embeddings=256,
              tie_word_embeddings=True)
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MAX_LEN = 96
ADAPTERS = {"a": LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
            "b": LoraConfig(r=2, init_lora_weights=False), "c": LoraConfig(r=8, target_modules=["o_proj", "down_proj"], init_lora_weights=False)}

@pytest.fixture(scope="module")
def files(tmp_path_factory):
  tokenizers = pytest.importorskip("tokenizers")
  pytest.importorskip("jinja2")
  from tokenizers import decoders, models, pre_tokenizers, trainers
  root = tmp_path_factory.mktemp("serve")
  Tensor.manual_seed(0)
  model = Model.from_config(CONFIG)
  save_pretrained(model, root / "model")
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the sky is blue", "grass is green", "user assistant system"] * 20, trainer)
  tok.save(str(root / "model" / "tokenizer.json"))
  (root / "model" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": TEMPLATE}))
  for name, config in ADAPTERS.items():
    inject(model, config, adapter_name=name)
    save_adapter(model, root / name, format="mlx" if name == "c" else "peft", adapter_name=name)
  return root

def start(files, *flags: str) -> tuple[subprocess.Popen, str, list[str]]:
  """A `tinylora serve` process on a free port, its base URL once it says it is serving, and its log lines (read as
  they come, so that the pipe never fills)."""
  cmd = [sys.executable, "-m", "tinylora", "serve", "--model", str(files / "model"), "--port", "0", "--max-len", str(MAX_LEN), *flags]
  proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=os.environ | {"DEV": "CPU"}, start_new_session=True)
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and (line := proc.stderr.readline()):
    if m := re.search(r"on (http://\S+/v1)", line):
      log: list[str] = []
      threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
      return proc, m.group(1), log
  proc.kill()
  raise AssertionError(f"the server did not start: {line!r} {proc.stderr.read()[-2000:]}")

@pytest.fixture(scope="module")
def server(files):
  proc, url, log = start(files, "--adapter", f"a={files / 'a'}", "--adapter", f"b={files / 'b'}", "--max-batch", "4", "--max-queue", "4")
  yield url, log
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(60) == 0

@pytest.fixture(scope="module")
def client(server): return openai.OpenAI(base_url=server[0], api_key="none", max_retries=0, timeout=120)

@pytest.fixture(scope="module")
def reference(files):
  """The model with every adapter and its tokenizer, in this process: what `generate` answers."""
  model, tok = load_pretrained(files / "model"), load_tokenizer(files / "model")
  for name in ADAPTERS: load_adapter(model, files / name, adapter_name=name)
  return model, tok

def expected(reference, model_id: str, prompt: list[int], n: int) -> list[int]:
  model, tok = reference
  return generate(model, [prompt], n, stop_tokens=[tok.eos_id], adapter_names=[BASE if model_id == "model" else model_id])[0]

def chat_tokens(tok, text: str) -> list[int]:
  return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))

def post(url: str, path: str, data: bytes) -> tuple[int, dict]:
  request = urllib.request.Request(url.removesuffix("/v1") + path, data=data, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=60) as r: return r.status, json.load(r)
  except urllib.error.HTTPError as e: return e.code, json.load(e)

def health(url: str) -> dict:
  with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=10) as r: return json.load(r)

@pytest.fixture(scope="module")
def packed_reference(files):
  """The reference model with its linears packed to 4 bits (as `serve --qlora` serves a GGUF's Q4 layers), with every
  adapter."""
  model = quantize(load_pretrained(files / "model"), bits=4, group_size=32)
  for name in ADAPTERS: load_adapter(model, files / name, adapter_name=name)
  return model

@pytest.mark.parametrize("packed", [False, True])
def test_the_batch_decoder_equals_generate(reference, packed_reference, packed):
  """Rows at different positions, each with its own adapter, prefilled in chunks and decoded together."""
  model = packed_reference if packed else reference[0]
  decoder = BatchDecoder(model, rows=3, max_len=40, chunk=4)
  prompts = {0: ([5, 9, 13, 2, 7, 7, 31], "a"), 1: ([8, 3], BASE), 2: ([40, 41, 42, 43, 44], "c")}
  want = {r: generate(model, [p], 6, adapter_names=[name])[0] for r, (p, name) in prompts.items()}
  got, pos = {r: [] for r in prompts}, {}
  for r, (p, name) in prompts.items():
    for i in range(0, len(p), decoder.chunk): logits = decoder.prefill(r, p[i:i + decoder.chunk], i, name)
    got[r].append(int(np.argmax(logits)))
    pos[r] = len(p)
  for _ in range(5):
    out = decoder.decode({r: (got[r][-1], pos[r], prompts[r][1]) for r in prompts})
    for r, logits in out.items(): got[r].append(int(np.argmax(logits)))
    pos = {r: p + 1 for r, p in pos.items()}
  assert got == want
  assert len({tuple(w) for w in want.values()}) == 3

def test_models_and_health(client, server):
  server = server[0]
  models = {m.id: m for m in client.models.list().data}
  assert set(models) == {"model", "a", "b"}
  assert models["model"].model_extra["parent"] is None and models["a"].model_extra["parent"] == "model"
  assert health(server)["status"] == "ok"

@pytest.mark.parametrize("model_id", ["model", "a", "b"])
def test_chat_and_completion_equal_generate(client, reference, model_id):
  _, tok = reference
  reply = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "the sky is"}], max_tokens=12, temperature=0)
  want = expected(reference, model_id, chat_tokens(tok, "the sky is"), 12)
  assert reply.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
  assert reply.usage.prompt_tokens == len(chat_tokens(tok, "the sky is")) and reply.usage.completion_tokens == len(want)
  assert reply.choices[0].finish_reason == ("length" if len(want) == 12 else "stop")
  text = client.completions.create(model=model_id, prompt="grass is", max_tokens=7, temperature=0)
  assert text.choices[0].text == tok.decode(expected(reference, model_id, tok.encode("grass is", add_special_tokens=True), 7), skip_special_tokens=True)

def test_concurrent_requests_over_adapters_each_equal_alone(client, reference):
  _, tok = reference
  asks = [(m, f"{w} is") for m, w in zip(["a", "b", "model", "a", "b", "model", "a", "b"], ["the sky", "grass", "user", "blue",
                                                                                             "green", "system", "sky", "the"])]
  def ask(i: int) -> str:
    model_id, text = asks[i]
    if i % 2:  # half of them stream
      stream = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": text}], max_tokens=10, temperature=0, stream=True)
      return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    return client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": text}], max_tokens=10, temperature=0).choices[0].message.content
  with concurrent.futures.ThreadPoolExecutor(8) as pool: got = list(pool.map(ask, range(8)))
  assert got == [tok.decode(expected(reference, m, chat_tokens(tok, t), 10), skip_special_tokens=True) for m, t in asks]

def test_streaming(client, reference):
  _, tok = reference
  chunks = list(client.chat.completions.create(model="a", messages=[{"role": "user", "content": "grass"}], max_tokens=9,
                                               temperature=0, stream=True, stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  want = expected(reference, "a", chat_tokens(tok, "grass"), 9)
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == tok.decode(want, skip_special_tokens=True)
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)
  text = "".join(c.choices[0].text for c in client.completions.create(model="b", prompt="the sky", max_tokens=5, temperature=0, stream=True))
  assert text == client.completions.create(model="b", prompt="the sky", max_tokens=5, temperature=0).choices[0].text

def test_stop_strings_and_sampling(client):
  full = client.completions.create(model="b", prompt="the sky", max_tokens=16, temperature=0).choices[0].text
  stop = next(w for i in range(2, len(full) - 1) if (w := full[i:i + 2]).isascii() and w.isalpha() and w not in full[:i + 1])
  cut = client.completions.create(model="b", prompt="the sky", max_tokens=16, temperature=0, stop=[stop, "never seen"])
  assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
  streamed = "".join(c.choices[0].text for c in client.completions.create(model="b", prompt="the sky", max_tokens=16, temperature=0, stop=stop, stream=True))
  assert streamed == full[:full.index(stop)]
  draw = lambda seed: client.completions.create(model="b", prompt="grass", max_tokens=8, temperature=1.0, seed=seed).choices[0].text
  assert draw(3) == draw(3)
  assert len({draw(s) for s in range(4)}) > 1

def test_bad_requests_get_openai_errors_and_the_server_goes_on(client, server):
  server = server[0]
  with pytest.raises(openai.NotFoundError, match="does not exist"): client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
  bad = [dict(messages=[]), dict(messages=[{"role": "user", "content": "x"}], temperature="hot"),
         dict(messages=[{"role": "user", "content": "x"}], max_tokens=0), dict(messages=[{"role": "user", "content": "x"}], max_tokens=MAX_LEN),
         dict(messages=[{"role": "user", "content": "the sky " * 60}]), dict(messages=[{"role": "user", "content": "x"}], n=2),
         dict(messages=[{"role": "robot", "content": "x"}]), dict(messages=[{"role": "user", "content": "x"}], stop=[1, 2])]
  for kwargs in bad:
    with pytest.raises(openai.BadRequestError) as e: client.chat.completions.create(model="a", **kwargs)
    assert e.value.body["message"] and e.value.body["type"] == "invalid_request_error", kwargs
  assert post(server, "/v1/chat/completions", b"{not json")[0] == 400
  assert post(server, "/v1/completions", b'{"model": "a", "prompt": "x", "max_tokens": true}')[1]["error"]["param"] == "max_tokens"
  assert post(server, "/v1/nothing", b"{}")[0] == 404
  with pytest.raises(openai.BadRequestError, match="context"): client.completions.create(model="a", prompt=list(range(MAX_LEN)))
  assert client.completions.create(model="a", prompt="the sky", max_tokens=3).choices[0].text is not None

def test_adapters_load_and_unload_while_serving(client, server, files, reference):
  server = server[0]
  _, tok = reference
  assert post(server, "/v1/load_lora_adapter", json.dumps({"lora_name": "c", "lora_path": str(files / "c")}).encode())[0] == 200
  assert "c" in {m.id for m in client.models.list().data}
  reply = client.chat.completions.create(model="c", messages=[{"role": "user", "content": "blue"}], max_tokens=8, temperature=0)
  assert reply.choices[0].message.content == tok.decode(expected(reference, "c", chat_tokens(tok, "blue"), 8), skip_special_tokens=True)
  status, body = post(server, "/v1/load_lora_adapter", json.dumps({"lora_name": "d", "lora_path": str(files / "missing")}).encode())
  assert status == 400 and "does not load" in body["error"]["message"]
  assert post(server, "/v1/load_lora_adapter", json.dumps({"lora_name": "c", "lora_path": str(files / "c")}).encode())[0] == 400
  # a stream in flight on `c` finishes before `c` goes
  stream = client.chat.completions.create(model="c", messages=[{"role": "user", "content": "grass"}], max_tokens=30, temperature=0, stream=True)
  first = next(stream)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    unloading = pool.submit(post, server, "/v1/unload_lora_adapter", json.dumps({"lora_name": "c"}).encode())
    rest = [c.choices[0].finish_reason for c in stream if c.choices]
    assert unloading.result(60)[0] == 200
  assert first.choices[0].delta.role == "assistant" and rest[-1] in ("stop", "length")
  assert "c" not in {m.id for m in client.models.list().data}
  with pytest.raises(openai.NotFoundError): client.chat.completions.create(model="c", messages=[{"role": "user", "content": "x"}])
  assert post(server, "/v1/unload_lora_adapter", json.dumps({"lora_name": "c"}).encode())[0] == 404
  reply = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "the sky is"}], max_tokens=12, temperature=0)
  assert reply.choices[0].message.content == tok.decode(expected(reference, "a", chat_tokens(tok, "the sky is"), 12), skip_special_tokens=True)

@pytest.mark.parametrize("stream", [True, False])
def test_a_client_leaving_frees_its_row(server, stream):
  (url, log), seen = server, len(server[1])
  host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
  body = json.dumps({"model": "a", "prompt": "the sky", "max_tokens": MAX_LEN - 8, "ignore_eos": True, "stream": stream}).encode()
  with socket.create_connection((host, int(port))) as s:
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    if stream: assert b"text/event-stream" in s.recv(4096)
  deadline = time.monotonic() + 60  # the server notices, then frees the row at its next step
  while not any("client went away" in line for line in log[seen:]) and time.monotonic() < deadline: time.sleep(0.1)
  while health(url)["running"] and time.monotonic() < deadline: time.sleep(0.1)
  assert any("client went away" in line for line in log[seen:]), log[seen:]
  assert health(url) == {"status": "ok", "running": 0, "waiting": 0}

def test_a_full_queue_answers_429_and_sigterm_lets_running_requests_finish(files):
  proc, url, _ = start(files, "--max-batch", "1", "--max-queue", "1")
  client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
  long = dict(model="model", prompt="the sky", max_tokens=MAX_LEN - 8, temperature=0)
  try:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      futures = [pool.submit(client.completions.create, **long) for _ in range(4)]
      outcomes = [f.exception() for f in futures]
    assert sum(isinstance(e, openai.RateLimitError) for e in outcomes) >= 1 and sum(e is None for e in outcomes) >= 2
    stream = client.completions.create(**long, stream=True)
    next(stream)
    os.killpg(proc.pid, signal.SIGTERM)  # as timeout(1) and service managers send it: tinygrad's compile workers get it too
    assert [c.choices[0].finish_reason for c in stream][-1] in ("length", "stop")  # the running request finishes
    assert proc.wait(60) == 0
  finally: proc.kill()

def test_the_command_line_refuses_bad_adapters(files, capsys):
  from tinylora.cli import main
  assert main(["serve", "--model", str(files / "model"), "--adapter", "no-equals-sign"]) == 1
  assert "NAME=PATH" in capsys.readouterr().err
  assert main(["serve", "--model", str(files / "model"), "--adapter", f"x={files / 'missing'}"]) == 1
  assert "does not load" in capsys.readouterr().err
