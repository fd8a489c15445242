"""Serve a checkpoint over the NeurIPS 2023 LLM Efficiency Challenge HTTP API (what HELM's `neurips/local` model calls).

    python generate/server.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --port 8080
    curl -s localhost:8080/process -d '{"prompt": "The capital of France is", "max_new_tokens": 5, "temperature": 0}'

Endpoints: POST /process, /tokenize and /decode, GET /health; the pydantic models below are their request and response
schemas (also served at /docs). Unknown request fields are ignored; a wrong type or value gets a 422 naming the field,
a body that is not JSON a 400, and one over --max_body_mb a 413.

Semantics (tests/test_server.py checks each):
- logprob of a token = log p(token | everything before it), an fp32 log-softmax; top_logprob holds the
  max(1, top_k_per_token) most likely tokens (as log-probabilities) at that position; `logprob` is the sum.
- echo_prompt: the prompt's own tokens come first, each with its logprob. The first prompt token has no context
  unless the tokenizer adds BOS (then BOS is the context, not echoed): it gets logprob 0.0 and top_logprob
  {its text: 0.0}. Echo requests score the raw prompt: the checkpoint's prompt template is not applied to them.
- temperature <= 1e-6 is greedy. Generation stops at EOS (not returned), at max_new_tokens, or at a stop sequence:
  the stop sequence and everything after it are cut from `text` and `tokens` (a token that straddles the cut keeps
  only its text before the cut). `--stop_at_blank_line` also cuts at the first blank line after some text.
- A prompt longer than the context (max_seq_length - max_new_tokens) is truncated from the left; the response's
  `truncated_prompt_tokens` says how many tokens were dropped (0 normally). max_new_tokens >= the context is a 422.
- Non-echo prompts go through the checkpoint's prompt_style.json when it has one (--prompt_style auto).
- Any integer is a valid seed: it is taken modulo 2**64 (torch's range). Empty stop sequences are ignored. Text with
  a lone UTF-16 surrogate ("\\ud800", not Unicode) and non-finite numbers (NaN, Infinity) are a 422.
- Reading JSON, tokenizing and building responses run in a thread pool: a huge request never stalls the others.
"""

import asyncio
import json
import logging
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Dict, List, Literal, Optional

from jsonargparse.typing import PositiveFloat, PositiveInt, restricted_number_type
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generate.base import Precision, Quantize, check_quantize_device, pick_device, pick_dtype  # noqa: E402
from generate.engine import Decode, Engine, Request, Result, parse_dola_layers  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

MAX_SAMPLES = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP_SEQUENCES = 64
log = logging.getLogger("server")
Port = restricted_number_type("Port", int, [(">=", 1), ("<=", 65535)])


def _unicode(value):
    # JSON can escape a lone UTF-16 surrogate ("\ud800"): Python keeps it in the str, tokenizers cannot encode it.
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"character {e.start} is a lone UTF-16 surrogate ({value[e.start]!r}), which is not "
                             "Unicode text; send valid UTF-8") from None
    return value


Text = Annotated[str, BeforeValidator(_unicode)]
# strict: "5" is not an int and 1 is not a bool; JSON ints are fine where floats are expected. No NaN or Infinity.
STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class ProcessRequest(BaseModel):
    model_config = STRICT
    prompt: Text = Field(min_length=1)
    num_samples: int = Field(1, ge=1, le=MAX_SAMPLES)
    num_return_sequences: Optional[int] = Field(None, ge=1, le=MAX_SAMPLES)  # HELM's name for num_samples
    max_new_tokens: int = Field(50, ge=0)
    top_k: Optional[int] = Field(200, ge=0)  # 0 or null: no top-k filter
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    temperature: float = Field(0.8, ge=0.0)
    seed: Optional[int] = None
    echo_prompt: Optional[bool] = None
    top_k_per_token: int = Field(1, ge=0, le=MAX_TOP_LOGPROBS)  # 0 still returns the best one
    stop_sequences: Optional[List[Text]] = Field(None, max_length=MAX_STOP_SEQUENCES)


class TokenizeRequest(BaseModel):
    model_config = STRICT
    text: Text
    truncation: bool = True
    max_length: int = Field(2048, ge=1)


class DecodeRequest(BaseModel):
    model_config = STRICT
    tokens: List[int]


class Token(BaseModel):
    text: str
    logprob: float  # log p(this token | everything before it)
    top_logprob: Dict[str, float]  # the max(1, top_k_per_token) most likely tokens here: text -> logprob


class Sample(BaseModel):
    text: str
    tokens: List[Token]
    logprob: float  # the sum of the tokens' logprobs
    finish_reason: Literal["length", "eos", "stop"]


class ProcessResponse(Sample):  # the first sample, plus what the request as a whole cost
    request_time: float  # seconds
    prompt_tokens: int
    truncated_prompt_tokens: int  # cut from the left of a prompt too long for the context
    samples: Optional[List[Sample]] = None  # every sample, sent only when more than one was asked for


class TokenizeResponse(BaseModel):
    tokens: List[int]
    request_time: float


class DecodeResponse(BaseModel):
    text: str
    request_time: float


class Health(BaseModel):
    status: str
    model: str
    context: int  # max_seq_length: prompt + new tokens
    pending: int  # requests queued or generating
    prompt_style: Optional[str]
    dola_layers: List[int]
    decode: str  # how generation steps run now: eager, or static[+compiled][+cuda_graphs] (generate/fast_decode.py)
    scoring_batches: int
    decode_steps: int
    prefills: int
    requests: int


class ErrorResponse(BaseModel):
    error: str  # one line naming the field (or the body) and what to send instead
    detail: str  # the same line, where FastAPI clients look for it


ERRORS = {status: {"model": ErrorResponse} for status in (400, 413, 422)}


class BadRequest(ValueError):
    """A request that cannot be served: 400 for a body that is not JSON, 413 for one too large, 422 for bad values."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class Service:
    """Everything between the JSON bodies and the engine; shared by the HTTP app and scripts/evaluate.py."""

    def __init__(self, engine: Engine, prompt_style=None, stop_at_blank_line: bool = False, name: str = "") -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.prompt_style = prompt_style  # a prompts.PromptStyle or None
        self.stop_at_blank_line = stop_at_blank_line
        self.name = name

    # /process
    def submit(self, body: ProcessRequest) -> tuple:
        """Validates against the context, templates, tokenizes and queues; returns (futures, info for the response)."""
        context = self.engine.max_seq_length
        if body.max_new_tokens >= context:
            raise BadRequest(f"max_new_tokens={body.max_new_tokens} leaves no room for the prompt in the context of "
                             f"{context} tokens; ask for at most {context - 1}")
        echo = bool(body.echo_prompt)
        text = body.prompt
        stop = list(body.stop_sequences or [])
        if self.prompt_style is not None and not echo:
            from prompts import render

            text = render(self.prompt_style, text)
            stop += [s for s in self.prompt_style.stop if s not in stop]
        ids, echo_from, cut = self.engine.prepare_prompt(text, body.max_new_tokens)
        if len(ids) <= echo_from:
            raise BadRequest("prompt: tokenizes to nothing; send some text")
        n = body.num_return_sequences or body.num_samples
        futures = []
        for i in range(n):
            request = Request(prompt_ids=ids, max_new_tokens=body.max_new_tokens, temperature=body.temperature,
                              top_k=body.top_k, top_p=body.top_p,
                              seed=None if body.seed is None else body.seed + i, echo=echo, echo_from=echo_from,
                              top_logprobs=max(1, body.top_k_per_token), stop=stop,
                              stop_at_blank_line=self.stop_at_blank_line)
            futures.append(self.engine.submit(request))
        return futures, {"prompt_tokens": len(ids), "truncated_prompt_tokens": cut, "echo": echo, "prompt": body.prompt}

    def response(self, results: List[Result], info: dict, started: float) -> dict:
        samples = [self._sample(r, info) for r in results]
        out = dict(samples[0])
        out.update(request_time=time.perf_counter() - started, prompt_tokens=info["prompt_tokens"],
                   truncated_prompt_tokens=info["truncated_prompt_tokens"])
        if len(samples) > 1:
            out["samples"] = samples
        return out

    def _sample(self, r: Result, info: dict) -> dict:
        tokens = []
        for text, (logprob, top) in zip(r.prompt_texts + r.new_texts, r.prompt_scores + r.new_scores):
            tokens.append({"text": text, "logprob": logprob, "top_logprob": self._top_texts(top)})
        text = "".join(r.prompt_texts + r.new_texts)
        if info["echo"] and not info["truncated_prompt_tokens"] and not text.startswith(info["prompt"]):
            # Tokenizers that normalise text (sentencepiece's leading space) can echo a slightly different prompt;
            # `text` must start with exactly what was sent.
            text = info["prompt"] + "".join(r.new_texts)
        return {"text": text, "tokens": tokens, "logprob": sum(t["logprob"] for t in tokens),
                "finish_reason": r.finish_reason}

    def _top_texts(self, top: dict) -> dict:
        """{token text: logprob} keeping all k alternatives: a token whose text is not unique on its own (a partial
        UTF-8 byte decodes to '\ufffd') is keyed by its vocabulary piece instead."""
        out = {}
        for id_, logprob in top.items():
            text = self.tokenizer.decode([id_])
            if text in out or "\ufffd" in text:
                tok = self.tokenizer
                piece = tok.processor.id_to_token(id_) if tok.backend == "huggingface" else tok.processor.id_to_piece(id_)
                text = piece if piece not in out else f"{piece}<{id_}>"
            out[text] = logprob
        return out

    def process(self, body: dict) -> dict:
        """Synchronous /process for in-process callers (evaluation, tests)."""
        started = time.perf_counter()
        futures, info = self.submit(ProcessRequest.model_validate(body))
        return self.response([f.result() for f in futures], info, started)

    # /tokenize and /decode
    def tokenize(self, body: TokenizeRequest) -> dict:
        started = time.perf_counter()
        # No BOS: /decode(/tokenize(x)) must give back x exactly, and HELM counts prompt tokens with it.
        ids = self.tokenizer.encode(body.text, bos=False).tolist()
        if body.truncation:
            ids = ids[: body.max_length]
        return {"tokens": ids, "request_time": time.perf_counter() - started}

    def decode(self, body: DecodeRequest) -> dict:
        started = time.perf_counter()
        vocab = self.tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"tokens: ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        return {"text": self.tokenizer.decode(body.tokens), "request_time": time.perf_counter() - started}


def parse_body(raw: bytes, model):
    """The request model of a JSON body, or BadRequest."""
    try:
        data = json.loads(raw)
    except RecursionError:  # e.g. 100,000 nested lists: Python's parser recurses once per level
        raise BadRequest("body is nested too deeply to parse; send a flat JSON object", status=400) from None
    except ValueError as e:  # not JSON, not UTF-8, an integer of over 4,300 digits
        raise BadRequest(f"body is not valid JSON ({e}); send a JSON object", status=400) from None
    if not isinstance(data, dict):
        raise BadRequest(f"body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:  # one line naming every wrong field by its path, like stop_sequences.0
        wrong = [(".".join(map(str, err["loc"])) or "body", err["msg"]) for err in e.errors()]
        raise BadRequest("; ".join(f"field '{where}': {msg}" for where, msg in wrong)) from None


async def read_body(request, limit: int) -> bytes:
    """The raw body, refused (413) as soon as it passes `limit` bytes, whether or not it declared its length."""
    too_big = BadRequest(f"body is over the limit of {limit / 2**20:g} MB (--max_body_mb); HELM's requests are a few "
                         "KB, send a shorter one", status=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def json_body_route(max_body_bytes: int):
    """A route class that reads a route's pydantic body itself, as FastAPI's reader cannot keep this server's promises:
    a 413 while an oversized body streams in, a 400 that says why (not JSON, nested too deeply), any content type
    (curl -d sends a form type) and parsing and validation in a worker thread, so a huge body never stalls the event
    loop. FastAPI's handler then gets the validated model, which it takes as it is: endpoints stay typed for /docs."""
    from fastapi.routing import APIRoute
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request as HTTPRequest

    class ParsedRequest(HTTPRequest):  # FastAPI's handler reads its body here: the bytes, and as "JSON" the model
        def __init__(self, request: HTTPRequest, raw: bytes, parsed: BaseModel) -> None:
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            super().__init__({**request.scope, "headers": headers + [(b"content-type", b"application/json")]},
                             request.receive)
            self.raw, self.parsed = raw, parsed

        async def body(self) -> bytes:
            return self.raw

        async def json(self) -> BaseModel:
            return self.parsed

    class JSONBodyRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()
            if self.body_field is None:  # GET /health: no body to read
                return handler
            model = self.body_field.field_info.annotation

            async def read_parse_then_handle(request: HTTPRequest):
                raw = await read_body(request, max_body_bytes)
                parsed = await run_in_threadpool(parse_body, raw, model)
                return await handler(ParsedRequest(request, raw, parsed))
            return read_parse_then_handle

    return JSONBodyRoute


def build_app(service: Service, warmup: bool = True, max_body_bytes: int = 4 * 2**20):
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    @asynccontextmanager
    async def lifespan(app):
        if warmup and not service.engine.running:  # compile and capture the decode step's buckets before traffic
            await asyncio.to_thread(service.engine.warm_up)
        service.engine.start()
        if warmup:  # the scoring and prefill kernels, and the caches, before the first real request
            t0 = time.perf_counter()
            await asyncio.to_thread(service.process, {"prompt": "The capital of France is", "max_new_tokens": 1,
                                                       "temperature": 0, "echo_prompt": True})
            await asyncio.to_thread(service.process, {"prompt": "The capital of France is", "max_new_tokens": 4,
                                                       "temperature": 0})
            log.info(json.dumps({"event": "warmup", "seconds": round(time.perf_counter() - t0, 3)}))
        yield
        service.engine.stop()

    app = FastAPI(title="oneday server", lifespan=lifespan)
    app.router.route_class = json_body_route(max_body_bytes)

    def error(status: int, message: str, request: HTTPRequest) -> JSONResponse:
        request.state.log["error"] = message
        return JSONResponse(status_code=status, content={"error": message, "detail": message})

    @app.exception_handler(BadRequest)
    async def bad_request(request: HTTPRequest, e: BadRequest):
        return error(e.status, str(e), request)

    @app.middleware("http")
    async def log_request(request: HTTPRequest, call_next):
        started = time.perf_counter()
        request.state.log = {}
        response = await call_next(request)
        line = {"event": "request", "method": request.method, "path": request.url.path, "status": response.status_code,
                "ms": round(1000 * (time.perf_counter() - started), 2), **request.state.log}
        log.info(json.dumps(line))
        return response

    @app.post("/process", response_model=ProcessResponse, response_model_exclude_none=True,
              responses={**ERRORS, 500: {"model": ErrorResponse}})
    async def process(body: ProcessRequest, request: HTTPRequest):
        started = time.perf_counter()
        futures, info = await run_in_threadpool(service.submit, body)  # templating and tokenizing
        try:
            results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except Exception as e:  # the engine failed this batch (e.g. out of memory); it keeps serving others
            log.exception("engine error")
            return error(500, f"generation failed: {type(e).__name__}: {e}", request)
        out = await run_in_threadpool(service.response, results, info, started)
        request.state.log.update(prompt_tokens=info["prompt_tokens"], truncated=info["truncated_prompt_tokens"],
                                 new_tokens=sum(len(r.new_ids) for r in results), max_new_tokens=body.max_new_tokens,
                                 echo=info["echo"], samples=len(results), finish=results[0].finish_reason,
                                 queued_ms=round(1000 * max(r.queued_s for r in results), 2))
        return out

    # Plain functions: FastAPI runs them, and checks what they return, in its thread pool.
    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    def tokenize(body: TokenizeRequest):
        return service.tokenize(body)

    @app.post("/decode", response_model=DecodeResponse, responses=ERRORS)
    def decode(body: DecodeRequest):
        return service.decode(body)

    @app.get("/health", response_model=Health)
    async def health():
        e = service.engine
        return {"status": "ok", "model": service.name, "context": e.max_seq_length, "pending": e.pending(),
                "prompt_style": service.prompt_style.name if service.prompt_style else None,
                "dola_layers": e.dola_layers, "decode": e.decode_mode, **e.stats}

    return app


def load_service(checkpoint_dir: str, adapter_dir: Optional[str] = None, quantize: Optional[str] = None,
                 precision: str = "auto", device: str = "auto", prompt_style: str = "auto",
                 max_seq_length: Optional[int] = 2048, max_batch_size: int = 32, max_batch_tokens: int = 16384,
                 dola_layers: Optional[str] = None, stop_at_blank_line: bool = False, decode: Decode = "auto",
                 interleave_tokens: int = 2048, fused_4bit: bool = True) -> Service:
    """Loads the model (merged, or base + LoRA adapter; bf16/fp32 or 4-bit) and wraps it in an engine."""
    from prompts import get_style, load_style
    from utils import load_model, resolve_checkpoint_dir

    device = pick_device(device)
    dtype = pick_dtype(precision, device)
    check_quantize_device(quantize, device)
    checkpoint_dir = resolve_checkpoint_dir(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    t0 = time.perf_counter()
    model = load_model(checkpoint_dir, device=device, dtype=dtype, quantize=quantize)
    style_dirs = [checkpoint_dir]
    if adapter_dir is not None:  # a LoRA adapter file from finetune/lora.py, or its folder
        from lora import freeze_lora, load_adapter, strip_lora

        load_adapter(model, Path(adapter_dir))
        model.to(device)
        if quantize is None:  # merged into plain weights (no extra cost per token); over 4-bit ones it stays a branch
            strip_lora(model)
        else:
            freeze_lora(model, dtype)
        style_dirs.insert(0, Path(adapter_dir) if Path(adapter_dir).is_dir() else Path(adapter_dir).parent)
    model.eval()
    log.info(json.dumps({"event": "loaded", "checkpoint": str(checkpoint_dir), "adapter": adapter_dir,
                         "seconds": round(time.perf_counter() - t0, 2), "device": device,
                         "dtype": str(dtype).removeprefix("torch."), "quantize": quantize}))
    if prompt_style == "auto":  # the template the checkpoint (or adapter) was fine-tuned with, or none
        style = next((load_style(d) for d in style_dirs if (d / "prompt_style.json").is_file()), None)
    elif prompt_style == "none":
        style = None
    elif Path(prompt_style).is_file():
        style = load_style(Path(prompt_style).parent)
    else:
        style = get_style(prompt_style)
    layers = parse_dola_layers(dola_layers, model.config.n_layer)
    engine = Engine(model, tokenizer, max_seq_length=max_seq_length, max_batch_size=max_batch_size,
                    max_batch_tokens=max_batch_tokens, dola_layers=layers, decode=decode,
                    interleave_tokens=interleave_tokens, fused_4bit=fused_4bit)
    return Service(engine, style, stop_at_blank_line, name=model.config.name or str(checkpoint_dir))


def main(
    checkpoint_dir: str = "smollm2-135m",
    adapter_dir: Optional[str] = None,
    quantize: Optional[Quantize] = None,
    precision: Precision = "auto",
    device: str = "auto",
    prompt_style: str = "auto",
    host: str = "0.0.0.0",
    port: Port = 8080,
    max_seq_length: PositiveInt = 2048,
    max_batch_size: PositiveInt = 32,
    max_batch_tokens: PositiveInt = 16384,
    max_body_mb: PositiveFloat = 4.0,
    dola_layers: Optional[str] = None,
    stop_at_blank_line: bool = False,
    decode: Decode = "auto",
    interleave_tokens: PositiveInt = 2048,
    fused_4bit: bool = True,
    warmup: bool = True,
) -> None:
    """Serve the challenge API (/process, /tokenize, /decode, /health).

    Args:
        checkpoint_dir: a converted (or merged) checkpoint folder, or a registered name such as smollm2-135m.
        adapter_dir: a LoRA adapter (adapter.safetensors or its folder) from finetune/lora.py, applied on top of
            checkpoint_dir; its folder's prompt_style.json wins over the checkpoint's.
        quantize: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq or bnb.int8 base weights (needs a CUDA GPU and
            bitsandbytes).
        precision: bf16, fp16, fp32 or auto (bf16 on a GPU that supports it, else fp32).
        device: cuda, cpu or auto.
        prompt_style: auto (the checkpoint's prompt_style.json, or none), none, a style name from prompts.py, or a
            path to a prompt_style.json. Applied to non-echo prompts.
        host: interface to listen on.
        port: port to listen on (the challenge image uses 80).
        max_seq_length: prompt + completion tokens per request (the challenge caps them at 2048); longer prompts are
            truncated from the left. Also sizes the KV cache.
        max_batch_size: generation slots decoded together, and rows per scoring batch.
        max_batch_tokens: padded tokens per forward pass (bounds activation memory of a scoring batch).
        max_body_mb: larger request bodies get a 413 (HELM's, at most 2048 tokens, are a few KB).
        dola_layers: DoLa decoding: low, high or comma-separated early layers to contrast with the final layer.
        stop_at_blank_line: cut every completion at its first blank line (after some text), as Upaya's entry did.
        decode: how generation steps run: auto (compiled on a GPU, else eager), eager (the plain reference step),
            static, graphs or compiled (generate/fast_decode.py: static shapes per bucket, + a CUDA graph per bucket,
            + torch.compile'd blocks; docs/serving.md).
        interleave_tokens: while generations decode, a scoring batch holds at most this many tokens, so that
            neither kind of request starves the other.
        fused_4bit: with --quantize bnb.nf4(-dq) on a GPU, the fast decode step multiplies the 4-bit weights
            through generate/nf4_matmul.py's Triton kernels (several rows on the tensor cores, one 16-bit row on the
            CUDA cores) instead of bitsandbytes' products (checked against bitsandbytes at start; see
            docs/serving.md for the figures). false: bitsandbytes' products throughout.
        warmup: compile and capture the decode step and run two small requests before accepting traffic.
    """
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    service = load_service(checkpoint_dir, adapter_dir, quantize, precision, device, prompt_style, max_seq_length,
                           max_batch_size, max_batch_tokens, dola_layers, stop_at_blank_line, decode,
                           interleave_tokens, fused_4bit)
    uvicorn.run(build_app(service, warmup, int(max_body_mb * 2**20)), host=host, port=port, log_level="warning")


if __name__ == "__main__":
    from cli import run

    run(main)
