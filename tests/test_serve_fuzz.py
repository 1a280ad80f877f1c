"""`tunelab serve` under abuse, on loopback and bounded (a few hundred requests, fixed seed): malformed
JSON, wrong types, extreme numbers, huge prompts, 20 concurrent clients, clients that leave mid-stream or
give up waiting. Never a 500; every refusal in OpenAI's error shape; abandoned generations cancelled; the
server answers afterwards; memory stays bounded."""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from chat_helpers import serving, wait_for

from tunelab.engine import ChatEngine, Scheduler
from tunelab.hparams import parse_args
from tunelab.serve_app import create_app

MODEL = "tiny"
LIMIT = 60_000
MAX_BODY = 1 << 20
VALID = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
ODD_VALUES = [None, 0, -1, 1.5, "x", "", [], {}, [None], True, 2**70, -2**70, 1e308, -1e-300, "\u0000\ud7ff"]
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n",
          "stop", "stream", "stream_options", "repetition_penalty"]


@pytest.fixture(scope="module")
def url(tiny_llama_dir):
    engine = ChatEngine.from_args(parse_args(["--model_name_or_path", str(tiny_llama_dir), "--max_new_tokens", "8"]),
                                  name=MODEL, scheduler=Scheduler(max_batch=8, window_s=0.02, max_queue=32))
    with serving(create_app(engine, None, LIMIT, max_request_bytes=MAX_BODY)) as base_url:
        yield base_url


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _check(response: httpx.Response) -> int:
    """The status, after checking it is no 5xx but 503 (busy) and that every error is OpenAI-shaped."""
    assert response.status_code < 500 or response.status_code == 503, response.text
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return response.status_code


def _post(client: httpx.Client, body, path: str = "/v1/chat/completions") -> int:
    if isinstance(body, bytes):
        return _check(client.post(path, content=body, headers={"content-type": "application/json"}))
    return _check(client.post(path, json=body))


def _mutations(rng: random.Random, count: int) -> list[bytes]:
    """Valid bodies cut short or with bytes replaced."""
    text = json.dumps(VALID).encode()
    out = []
    for _ in range(count):
        cut = bytearray(text[:rng.randrange(len(text))])
        for _ in range(rng.randrange(3)):
            if cut:
                cut[rng.randrange(len(cut))] = rng.randrange(256)
        out.append(bytes(cut))
    return out


MALFORMED = [b"", b"{", b"[]", b"null", b"42", b'"text"', b"\xff\xfe\x00", b'{"model": }',
             b'{"model": "tiny", "messages": [}', b'{"model": "tiny", "messages": "Hello"}',
             b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
             b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "top_p": Infinity}',
             b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "repetition_penalty": 1e999}',
             b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1e999}',
             b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}']


def test_malformed_and_mutated_bodies(url):
    with httpx.Client(base_url=url, timeout=300) as client:
        statuses = [_post(client, body) for body in MALFORMED + _mutations(random.Random(0), 40)]
        statuses += [_post(client, body, "/v1/completions") for body in MALFORMED[:8]]
    assert statuses.count(400) >= len(statuses) - 2  # a mutation may stay valid


def test_every_field_with_odd_values(url):
    with httpx.Client(base_url=url, timeout=300) as client:
        for field in FIELDS:
            for value in ODD_VALUES:
                _post(client, {**VALID, field: value})
                if field != "messages":
                    _post(client, {**VALID, "prompt": "Hi", field: value}, "/v1/completions")
            _post(client, {**VALID, "messages": [{"role": "user", "content": value}]})


@pytest.mark.parametrize("field, value", [
    ("seed", 2**70), ("seed", -2**70), ("max_tokens", 2**70), ("max_tokens", LIMIT + 1), ("max_tokens", 0),
    ("max_tokens", -5), ("n", 2**70), ("n", 0), ("temperature", 1e-300), ("top_p", 1e-300),
    ("repetition_penalty", 1e-300), ("repetition_penalty", 1e300), ("stop", ["x"] * 1000), ("stop", "x" * 10_000),
])
def test_extreme_numbers_are_answered_or_refused(url, field, value):
    with httpx.Client(base_url=url, timeout=300) as client:
        status = _post(client, {**VALID, field: value})
    assert status == (200 if (field, value) in (("temperature", 1e-300), ("top_p", 1e-300),
                                                ("stop", "x" * 10_000)) else 400)


def test_huge_prompts(url):
    many = [{"role": r, "content": "Hi"} for _ in range(1500) for r in ("user", "assistant")][:-1]
    with httpx.Client(base_url=url, timeout=300) as client:
        assert _post(client, {**VALID, "messages": [{"role": "user", "content": "Hello " * 50_000}]}) == 200
        assert _post(client, {**VALID, "messages": many}) == 200
        assert _post(client, {**VALID, "prompt": "<|im_start|>" * 20_000}, "/v1/completions") == 200
        assert _post(client, {**VALID, "messages": [{"role": "user", "content": "x" * MAX_BODY}]}) == 413
        chunked = (json.dumps(VALID)[:-1].encode() + b', "pad": "' + b"y" * MAX_BODY + b'"}' for _ in range(1))
        assert _check(client.post("/v1/chat/completions", content=chunked,
                                  headers={"content-type": "application/json"})) == 413


def test_twenty_concurrent_clients_mixing_good_and_bad_requests(url):
    bodies = [VALID, {**VALID, "stream": True}, {**VALID, "seed": 2**70}, b"{", {**VALID, "model": "nope"},
              {**VALID, "temperature": 1.0, "n": 3}]

    def client_run(i: int) -> list[int]:
        with httpx.Client(base_url=url, timeout=300) as client:
            return [_post(client, bodies[(i + k) % len(bodies)]) for k in range(6)]

    with ThreadPoolExecutor(20) as pool:
        statuses = [s for run in pool.map(client_run, range(20)) for s in run]
    assert statuses.count(200) >= 40 and set(statuses) <= {200, 400, 404, 503}


def _in_flight(url: str) -> int:
    return httpx.get(f"{url}/health").json()["in_flight"]


def test_abandoned_generations_are_cancelled_and_the_server_still_answers(url):
    rss_before = _rss_mb()
    long = {**VALID, "max_tokens": 50_000}
    for _ in range(3):  # streams left after their first event
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**long, "stream": True}, timeout=300) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
    givers_up = [threading.Thread(target=_give_up, args=(url, long)) for _ in range(3)]
    for t in givers_up:
        t.start()
    for t in givers_up:
        t.join(timeout=60)
    assert wait_for(lambda: _in_flight(url) == 0, 120), "abandoned generations kept running"
    with httpx.Client(base_url=url, timeout=300) as client:
        assert _post(client, VALID) == 200 and _post(client, {**VALID, "prompt": "Hi"}, "/v1/completions") == 200
    assert _rss_mb() - rss_before < 300


def _give_up(url: str, body: dict) -> None:
    try:
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1.5)
    except httpx.TimeoutException:
        return
    raise AssertionError("a 50k-token answer came back within 1.5 s")


def test_odd_routes_and_methods(url):
    with httpx.Client(base_url=url, timeout=300) as client:
        for method, path in (("GET", "/v1/chat/completions"), ("DELETE", "/v1/models"), ("GET", "/v1/nothing"),
                             ("GET", "/v1/models/%00"), ("POST", "/v1/models"), ("GET", "/../../etc/passwd")):
            _check(client.request(method, path))
