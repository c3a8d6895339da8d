"""`tinylora serve`: an OpenAI-compatible HTTP server answering one base model and any number of its adapters, with
every running request sharing each decode step whatever adapter it uses (continuous batching, tinylora.batching).

The standard library's HTTP server takes the requests, one thread each: they parse, check and tokenize, then hand a
`Job` to the `Engine`, which runs every tinygrad call on one thread (the one that calls `Engine.run`), between whose
steps jobs join and leave. Jobs report back through their own queue of events.
"""
from __future__ import annotations
import collections, dataclasses, json, pathlib, queue, select, socket, sys, threading, time, uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
import numpy as np
from tinylora.batching import BatchDecoder
from tinylora.errors import LoraError
from tinylora.formats import load_adapter
from tinylora.generate import sample
from tinylora.lora import BASE, delete_adapter, list_adapters
from tinylora.models.decoder import Model
from tinylora.tokenizer import Tokenizer

MAX_BODY = 16 << 20  # bytes of a request body

class ApiError(Exception):
  """An error answered as OpenAI's JSON error object with HTTP status `status`."""
  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               type: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.body = status, {"error": {"message": message, "type": type, "param": param, "code": code}}

@dataclasses.dataclass(eq=False)
class Job:
  """One request's generation: what it asks for, and the engine's progress on it."""
  model: str
  adapter: str                 # an adapter name, or BASE
  prompt: list[int]
  max_tokens: int
  temperature: float
  top_p: float
  stop: list[str]
  seed: int | None = None
  ignore_eos: bool = False     # vLLM's extension: generate past the end-of-sequence token (benchmarks)
  events: queue.Queue = dataclasses.field(default_factory=queue.Queue)  # ("text", str) ... then ("done", reason) or ("error", ApiError)
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
  row: int | None = None
  prefilled: int = 0           # prompt tokens cached so far
  tokens: list[int] = dataclasses.field(default_factory=list)  # generated so far
  sent: int = 0                # characters of the generated text sent so far

  def __post_init__(self): self.rng = np.random.default_rng(self.seed)

  @property
  def usage(self) -> dict:
    return {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.tokens), "total_tokens": len(self.prompt) + len(self.tokens)}

def _held_back(text: str, stops: list[str]) -> int:
  """How many characters at the end of `text` may begin a stop string (not sent until the next tokens decide)."""
  return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)

class Engine:
  """The model, its adapters and a BatchDecoder of `rows` rows, driven by `run` on one thread. Other threads `submit`
  jobs (at most `max_queue` waiting; more are refused with 429) and `call` functions to run between steps (adapter
  loads); `stop` ends `run` once the running jobs are done (a second `stop` ends them with an error)."""
  def __init__(self, model: Model, tokenizer: Tokenizer, model_id: str, adapters: dict[str, str] | None = None,
               rows: int = 8, max_len: int = 2048, chunk: int = 32, max_queue: int = 64):
    self.model, self.tokenizer, self.model_id, self.max_queue = model, tokenizer, model_id, max_queue
    self.stop_ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    self.paths: dict[str, str] = {}  # adapter name -> the path it was loaded from
    for name, path in (adapters or {}).items(): self._load(name, path)
    self.decoder, self.max_len = BatchDecoder(model, rows, max_len, chunk), max_len
    self.lock = threading.Condition()
    self.waiting: collections.deque[Job] = collections.deque()
    self.calls: list[tuple[Callable[[], Any], queue.Queue]] = []
    self.rows: list[Job | None] = [None] * rows
    self._warm_up()
    self.unloading: dict[str, queue.Queue] = {}  # adapter -> where to answer once its last job is done
    self.stopping = 0

  # ---- other threads

  def models(self) -> list[tuple[str, str | None]]:
    """(id, parent id) of the base model and every adapter being served."""
    with self.lock: return [(self.model_id, None)] + [(n, self.model_id) for n in self.paths if n not in self.unloading]

  def counts(self) -> dict:
    with self.lock: return {"running": sum(job is not None for job in self.rows), "waiting": len(self.waiting)}

  def adapter_for(self, model: str) -> str:
    if model == self.model_id: return BASE
    with self.lock:
      if model in self.paths and model not in self.unloading: return model
    raise ApiError(404, f"The model `{model}` does not exist.", "model", "model_not_found")

  def submit(self, job: Job) -> None:
    with self.lock:
      if self.stopping: raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
      if len(self.waiting) >= self.max_queue + self.rows.count(None):  # free rows take theirs at the next step
        raise ApiError(429, f"{self.max_queue} requests are waiting already; try again later", type="requests", code="rate_limit_exceeded")
      self.waiting.append(job)
      self.lock.notify()

  def call(self, fn: Callable[[], Any]) -> Any:
    """Runs `fn` on the engine's thread between steps and returns its result (or raises its exception)."""
    answer: queue.Queue = queue.Queue()
    with self.lock:
      if self.stopping: raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
      self.calls.append((fn, answer))
      self.lock.notify()
    ok, value = answer.get()
    if not ok: raise value
    return value

  def load(self, name: str, path: str) -> None:
    if name == self.model_id or name == BASE: raise ApiError(400, f"lora_name {name!r} is taken by the base model", "lora_name")
    try: self.call(lambda: (self._load(name, path), self._warm_up()))
    except LoraError as e: raise ApiError(400, str(e), "lora_path") from None

  def unload(self, name: str) -> None:
    """Removes adapter `name` once the jobs using it (running or waiting) are done; returns then."""
    answer: queue.Queue = queue.Queue()
    with self.lock:
      if name not in self.paths or name in self.unloading:
        raise ApiError(404, f"The model `{name}` does not exist.", "lora_name", "model_not_found")
      self.unloading[name] = answer
      self.lock.notify()
    ok, value = answer.get()
    if not ok: raise value

  def stop(self) -> None:
    with self.lock:
      self.stopping += 1
      self.lock.notify()

  # ---- the engine's thread

  def _load(self, name: str, path: str) -> None:
    if name in self.paths: raise LoraError(f"an adapter named {name!r} is already loaded")
    try: load_adapter(self.model, path, adapter_name=name)
    except (LoraError, OSError, ValueError) as e: raise LoraError(f"the adapter at {path} does not load: {e}") from None
    self.paths[name] = str(path)

  def _warm_up(self) -> None:
    """Captures the steps for the model's adapters as they are now, in a free row (else the next step does it)."""
    if free := [r for r, job in enumerate(self.rows) if job is None]: self.decoder.warm_up(free[0])

  def run(self) -> None:
    """Serves until `stop`: admits waiting jobs into free rows, prefills one chunk of each new prompt and decodes one
    token of every running job per step."""
    while True:
      with self.lock:
        while not (self.waiting or self.calls or self.unloading or self.stopping or any(self.rows)): self.lock.wait()
        calls, self.calls = self.calls, []
        if self.stopping:
          for job in self.waiting: job.events.put(("error", ApiError(503, "the server is shutting down", type="server_error")))
          self.waiting.clear()
          if self.stopping > 1:
            for job in filter(None, self.rows): self._end(job, error=ApiError(503, "the server stopped", type="server_error"))
          if not any(self.rows):
            for _, answer in calls: answer.put((False, ApiError(503, "the server is shutting down", type="server_error")))
            for answer in self.unloading.values(): answer.put((False, ApiError(503, "the server is shutting down", type="server_error")))
            return
        for r in range(len(self.rows)):
          if self.rows[r] is None and self.waiting:
            self.rows[r] = job = self.waiting.popleft()
            job.row = r
      for fn, answer in calls:
        try: answer.put((True, fn()))
        except Exception as e: answer.put((False, e))
      self._finish_unloads()
      try: self._step()
      except Exception as e:  # a failed step ends the jobs in it; the server goes on
        for job in filter(None, self.rows): self._end(job, error=ApiError(500, f"generation failed: {e}", type="server_error"))

  def _finish_unloads(self) -> None:
    busy = {j.adapter for j in filter(None, self.rows)} | {j.adapter for j in self.waiting}
    for name in [n for n in self.unloading if n not in busy]:
      try:
        delete_adapter(self.model, name)
        del self.paths[name]
        self._warm_up()
        self.unloading.pop(name).put((True, None))
      except LoraError as e: self.unloading.pop(name).put((False, ApiError(500, str(e), type="server_error")))

  def _step(self) -> None:
    jobs = [j for j in self.rows if j is not None]
    for job in jobs:
      if job.cancelled.is_set(): self._end(job)
    for job in [j for j in self.rows if j is not None and j.prefilled < len(j.prompt)]:  # one chunk of each new prompt
      chunk = job.prompt[job.prefilled:job.prefilled + self.decoder.chunk]
      logits = self.decoder.prefill(job.row, chunk, job.prefilled, job.adapter)
      job.prefilled += len(chunk)
      if job.prefilled == len(job.prompt): self._next(job, logits)
    decoding = {j.row: (j.tokens[-1], len(j.prompt) + len(j.tokens) - 1, j.adapter) for j in self.rows
                if j is not None and j.prefilled == len(j.prompt) and j.tokens}
    for row, logits in self.decoder.decode(decoding).items():
      if (job := self.rows[row]) is not None: self._next(job, logits)

  def _next(self, job: Job, logits: np.ndarray) -> None:
    """Samples the job's next token and sends the text it completes; ends the job at a stop or its length."""
    token = sample(logits, job.temperature, job.top_p, job.rng)
    if token in self.stop_ids and not job.ignore_eos: return self._end(job, "stop", self.tokenizer.decode(job.tokens, skip_special_tokens=True))
    job.tokens.append(token)
    text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
    if (cut := min((i for s in job.stop if (i := text.find(s, max(0, job.sent - len(s)))) >= 0), default=-1)) >= 0:
      return self._end(job, "stop", text[:cut])
    if len(job.tokens) == job.max_tokens or len(job.prompt) + len(job.tokens) >= self.max_len: return self._end(job, "length", text)
    if not text.endswith("\ufffd") and (ready := len(text) - _held_back(text, job.stop)) > job.sent:
      job.events.put(("text", text[job.sent:ready]))
      job.sent = ready

  def _end(self, job: Job, reason: str | None = None, text: str = "", error: ApiError | None = None) -> None:
    """Frees the job's row; sends what is left of its text and how it ended (nothing to a cancelled job)."""
    if job.row is not None: self.rows[job.row] = None
    if error is not None: job.events.put(("error", error))
    elif reason is not None:
      if len(text) > job.sent: job.events.put(("text", text[job.sent:]))
      job.events.put(("done", reason))

# ---------------------------------------------------------------- requests

def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any = None, ok: Callable[[Any], bool] = lambda v: True,
         expected: str = "") -> Any:
  """body[name] if present (not null), checked to be one of `kinds` and `ok`; else `default`."""
  if (value := body.get(name)) is None: return default
  if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)) or not ok(value):
    kind = expected or " or ".join(k.__name__ for k in kinds)
    raise ApiError(400, f"'{name}' must be {kind}, found {json.dumps(value)[:80]}", name, "invalid_value")
  return value

def _unsupported(body: dict, **defaults: Any) -> None:
  for name, default in defaults.items():
    if body.get(name) not in (None, default):
      raise ApiError(400, f"'{name}' = {json.dumps(body[name])[:80]} is not supported (only {json.dumps(default)})", name, "unsupported_value")

def _text_of(content: Any, where: str) -> str:
  if isinstance(content, str): return content
  if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
    return "".join(p["text"] for p in content)
  raise ApiError(400, f"'{where}' must be a string or a list of text parts", where, "invalid_value")

def _messages(body: dict) -> list[dict]:
  messages = _get(body, "messages", (list,), None, bool, "a non-empty list of messages")
  if messages is None: raise ApiError(400, "'messages' is required and must not be empty", "messages", "invalid_value")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
      raise ApiError(400, f"messages[{i}] must be an object with a role of system, developer, user, assistant or tool", f"messages[{i}]", "invalid_value")
    message = {"role": "system" if m["role"] == "developer" else m["role"]}
    if m.get("content") is not None or "tool_calls" not in m: message["content"] = _text_of(m.get("content"), f"messages[{i}].content")
    out.append(message | {k: m[k] for k in ("tool_calls", "tool_call_id", "name") if k in m})
  return out

def make_job(engine: Engine, body: dict, chat: bool) -> tuple[Job, bool, bool]:
  """The job a /v1/chat/completions (`chat`) or /v1/completions request body asks for, with its `stream` and
  `stream_options.include_usage` flags. Raises ApiError for anything malformed, unknown or too long."""
  if not isinstance(body, dict): raise ApiError(400, "the request body must be a JSON object")
  model = _get(body, "model", (str,))
  if model is None: raise ApiError(400, "'model' is required", "model", "invalid_value")
  adapter = engine.adapter_for(model)
  _unsupported(body, n=1, logprobs=False if chat else None, echo=False, best_of=1, suffix=None, frequency_penalty=0,
               presence_penalty=0, logit_bias={})
  tok = engine.tokenizer
  if chat:
    if not getattr(tok, "chat_template", None): raise ApiError(400, f"the model `{model}` has no chat template; use /v1/completions")
    tools = _get(body, "tools", (list,))
    try: prompt = tok.encode(tok.apply_chat_template(_messages(body), add_generation_prompt=True, tools=tools))
    except LoraError as e: raise ApiError(400, str(e), "messages", "invalid_value") from None
  else:
    text = body.get("prompt")
    if isinstance(text, list) and len(text) == 1 and isinstance(text[0], str): text = text[0]
    if isinstance(text, list) and text and all(isinstance(t, int) and not isinstance(t, bool) for t in text): prompt = text
    elif isinstance(text, str) and text: prompt = tok.encode(text, add_special_tokens=True)
    else: raise ApiError(400, "'prompt' must be a non-empty string (or one string, or a list of token ids)", "prompt", "invalid_value")
    if bad := [t for t in prompt if not 0 <= t < engine.model.config.vocab_size]:
      raise ApiError(400, f"prompt token {bad[0]} is outside the vocabulary of {engine.model.config.vocab_size}", "prompt", "invalid_value")
  if not prompt: raise ApiError(400, "the prompt renders to no tokens", "messages" if chat else "prompt", "invalid_value")
  room = engine.max_len - len(prompt)
  if room < 1:
    raise ApiError(400, f"the prompt is {len(prompt)} tokens; this server's context is {engine.max_len}", "messages" if chat else "prompt",
                   "context_length_exceeded")
  name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
  max_tokens = _get(body, name, (int,), room, lambda v: v >= 1, "an integer >= 1")
  if max_tokens > room:
    raise ApiError(400, f"{name} {max_tokens} and the prompt's {len(prompt)} tokens exceed this server's context of "
                   f"{engine.max_len}", name, "context_length_exceeded")
  stop = _get(body, "stop", (str, list), [], lambda v: isinstance(v, str) or (len(v) <= 4 and all(isinstance(s, str) for s in v)),
              "a string or a list of at most 4 strings")
  options = _get(body, "stream_options", (dict,), {})
  job = Job(model, adapter, prompt, max_tokens,
            temperature=float(_get(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number from 0 to 2")),
            top_p=float(_get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
            stop=[s for s in ([stop] if isinstance(stop, str) else stop) if s], seed=_get(body, "seed", (int,)),
            ignore_eos=_get(body, "ignore_eos", (bool,), False))
  return job, _get(body, "stream", (bool,), False), bool(_get(options, "include_usage", (bool,), False))

# ---------------------------------------------------------------- HTTP

class Handler(BaseHTTPRequestHandler):
  """One request: the engine is `self.server.engine`."""
  server_version = "tinylora"

  def log_request(self, code: Any = "-", size: Any = "-") -> None: pass  # one line per request, written by _log

  def _log(self, status: int, extra: str = "") -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} {self.client_address[0]} {self.command} {self.path} {status} "
                     f"{time.monotonic() - self.began:.2f}s{extra}\n")

  def _json(self, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def do_GET(self) -> None:
    self.began = time.monotonic()
    engine: Engine = self.server.engine
    if self.path == "/health": self._answer(lambda: {"status": "ok"} | engine.counts())
    elif self.path == "/v1/models":
      self._answer(lambda: {"object": "list", "data": [{"id": i, "object": "model", "created": self.server.started, "owned_by": "tinylora",
                                                         "root": engine.paths.get(i, engine.model_id), "parent": p} for i, p in engine.models()]})
    else: self._answer(self._no_route)

  def do_POST(self) -> None:
    self.began = time.monotonic()
    routes = {"/v1/chat/completions": lambda b: self._complete(b, chat=True), "/v1/completions": lambda b: self._complete(b, chat=False),
              "/v1/load_lora_adapter": self._load, "/v1/unload_lora_adapter": self._unload}
    self._answer(lambda: routes[self.path](self._body()) if self.path in routes else self._no_route())

  def _no_route(self) -> dict:
    raise ApiError(404, f"no route {self.command} {self.path}", code="not_found")

  def _answer(self, fn: Callable[[], dict | None]) -> None:
    """Sends fn()'s JSON (None: fn answered itself), or the error it raised."""
    try:
      if (body := fn()) is not None: self._json(200, body), self._log(200)
    except ApiError as e: self._json(e.status, e.body), self._log(e.status, f" {e}")
    except (BrokenPipeError, ConnectionResetError): self._log(499, " client went away")
    except Exception as e:  # a bug or an unexpected input: the request fails, the server goes on
      self._json(500, ApiError(500, f"{type(e).__name__}: {e}", type="server_error").body), self._log(500, f" {type(e).__name__}: {e}")

  def _gone(self) -> bool:
    """Whether the client closed the connection (it is readable, with nothing to read)."""
    try: return bool(select.select([self.connection], [], [], 0)[0]) and not self.connection.recv(1, socket.MSG_PEEK)
    except OSError: return True

  def _body(self) -> Any:
    try: length = int(self.headers.get("Content-Length", ""))
    except ValueError: raise ApiError(411, "a Content-Length header is required") from None
    if length > MAX_BODY: raise ApiError(413, f"the body is {length} bytes; at most {MAX_BODY} are read")
    try: return json.loads(self.rfile.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError) as e: raise ApiError(400, f"the body is not valid JSON: {e}") from None

  def _load(self, body: Any) -> dict:
    if not isinstance(body, dict): raise ApiError(400, "the request body must be a JSON object")
    name, path = _get(body, "lora_name", (str,), None, bool), _get(body, "lora_path", (str,), None, bool)
    if not name or not path: raise ApiError(400, "'lora_name' and 'lora_path' are required", "lora_name" if not name else "lora_path")
    self.server.engine.load(name, path)
    return {"object": "lora_adapter", "lora_name": name, "status": "loaded"}

  def _unload(self, body: Any) -> dict:
    if not isinstance(body, dict) or not (name := _get(body, "lora_name", (str,), None, bool)):
      raise ApiError(400, "'lora_name' is required", "lora_name")
    self.server.engine.unload(name)
    return {"object": "lora_adapter", "lora_name": name, "status": "unloaded"}

  def _complete(self, body: Any, chat: bool) -> dict | None:
    engine: Engine = self.server.engine
    job, stream, include_usage = make_job(engine, body, chat)
    engine.submit(job)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": job.model}
    if not stream:
      texts, (kind, value) = [], (None, None)
      for kind, value in _events(job, self._gone):
        if kind == "text": texts.append(value)
      text = "".join(texts)
      choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
      self._log(200, f" {job.model} {job.usage['prompt_tokens']}+{job.usage['completion_tokens']} tokens {value}")
      self._json(200, head | {"choices": [choice | {"finish_reason": value, "logprobs": None}], "usage": job.usage})
      return None
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-cache")
    self.end_headers()
    head["object"] = "chat.completion.chunk" if chat else "text_completion"
    def send(choices: list, **more: Any) -> None:
      self.wfile.write(f"data: {json.dumps(head | {'choices': choices} | more)}\n\n".encode())
      self.wfile.flush()
    piece = (lambda text: {"index": 0, "delta": {"content": text}, "finish_reason": None}) if chat else \
            (lambda text: {"index": 0, "text": text, "finish_reason": None, "logprobs": None})
    try:
      if chat: send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
      for kind, value in _events(job, self._gone):
        if kind == "text": send([piece(value)])
      send([piece("") | {"finish_reason": value} | ({"delta": {}} if chat else {})])
      if include_usage: send([], usage=job.usage)
      self.wfile.write(b"data: [DONE]\n\n")
      self.wfile.flush()
      self._log(200, f" {job.model} {job.usage['prompt_tokens']}+{job.usage['completion_tokens']} tokens {value} (stream)")
    except ApiError as e:  # after the headers: the error goes in the stream
      self.wfile.write(f"data: {json.dumps(e.body)}\n\n".encode())
      self._log(e.status, f" {e} (stream)")
    except (BrokenPipeError, ConnectionResetError):
      job.cancelled.set()
      self._log(499, f" {job.model} client went away after {len(job.tokens)} tokens; its row is freed")
    return None

def _events(job: Job, gone: Callable[[], bool]) -> Iterator[tuple[str, Any]]:
  """The job's events up to its end ("done", reason); an ("error", e) raises e. At once and then every quarter second it
  checks whether the client has `gone`: then the job is cancelled (the engine frees its row) and ConnectionResetError
  raised."""
  checked = 0.0
  while True:
    try: kind, value = job.events.get(timeout=0.25)
    except queue.Empty: kind, value = None, None
    if time.monotonic() - checked >= 0.25:
      if gone():
        job.cancelled.set()
        raise ConnectionResetError
      checked = time.monotonic()
    if kind is None: continue
    if kind == "error": raise value
    yield kind, value
    if kind == "done": return

class Server(ThreadingHTTPServer):
  daemon_threads = True  # a handler still waiting on a job does not keep the process alive after `serve` returns
  def __init__(self, address: tuple[str, int], engine: Engine):
    super().__init__(address, Handler)
    self.engine, self.started = engine, int(time.time())

def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8080, ready: Callable[[Server], None] | None = None) -> None:
  """Serves `engine` over HTTP at host:port until `engine.stop()` (the command line calls it on SIGINT/SIGTERM). The
  HTTP server runs in a thread of its own; the engine runs on the calling thread, which must be the thread that made
  the model (tinygrad's disk cache is bound to one thread)."""
  server = Server((host, port), engine)
  thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
  thread.start()
  if ready is not None: ready(server)
  try: engine.run()
  finally:
    server.shutdown()
    server.server_close()

def model_id(path: str | pathlib.Path) -> str:
  """The id a served model is known by: its directory's name, or its GGUF file's name without the extension."""
  path = pathlib.Path(path)
  return path.stem if path.suffix == ".gguf" else path.resolve().name
