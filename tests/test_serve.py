"""`tunelab serve` on a free loopback port, driven by the official `openai` client (plain and streaming)
and raw httpx (bad payloads, keys, disconnects)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from chat_helpers import free_port, make_lora

from tunelab.engine import ChatEngine, to_messages
from tunelab.hparams import parse_args

openai = pytest.importorskip("openai")

KEY = "sk-tunelab-test"
LIMIT = 60_000  # high enough for the disconnect test's long generation
MODEL = "tiny-lora"
HELLO = [{"role": "user", "content": "Hello, how are you?"}]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, tmp_path_factory):
    ckpt = make_lora(tiny_llama_dir, tmp_path_factory.mktemp("lora"), source_prefix="You are Haruhi.")
    return ChatEngine.from_args(parse_args(["--checkpoint_dir", str(ckpt), "--max_new_tokens", "24"]), name=MODEL)


@pytest.fixture(scope="module")
def url(engine):
    """The API served by uvicorn in a thread, on a socket bound before it starts (no port race)."""
    import uvicorn

    from tunelab.serve import create_app

    sock = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, KEY, LIMIT), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "server did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    return body["error"]


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(f"{url}/health").json()  # no key needed
    assert health == {"status": "ok", "model": MODEL, "in_flight": 0}


def test_chat_completion_matches_the_engine(client, engine):
    expected = engine.chat(to_messages("Hello, how are you?"))
    out = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0)
    assert out.choices[0].message.content == expected.text and out.choices[0].message.role == "assistant"
    assert {k: getattr(out.usage, k) for k in expected.usage} == expected.usage
    assert out.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")


def test_streaming_chunks_add_up_to_the_same_answer(client, engine):
    expected = engine.chat(to_messages("Hello, how are you?"))
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == expected.text and len(finish) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == expected.usage["total_tokens"]
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done(url):
    body = {"model": MODEL, "messages": HELLO, "stream": True, "max_tokens": 4}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=_auth(), timeout=60) as r:
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and json.loads(data[0])["object"] == "chat.completion.chunk"


def _auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("body, param", [
    ({"messages": HELLO}, "model"),
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, "messages.0.content"),
    ({"model": MODEL, "messages": HELLO, "temperature": 3}, "temperature"),
    ({"model": MODEL, "messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "messages": HELLO, "n": 2}, "n"),
    ({"model": MODEL, "messages": HELLO, "stop": ["\n"]}, "stop"),
    ({"model": MODEL, "messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"model": MODEL, "messages": [*HELLO, {"role": "assistant", "content": "x"}]}, "messages"),
])
def test_bad_payloads_get_openai_shaped_400(url, body, param):
    error = _error(httpx.post(f"{url}/v1/chat/completions", json=body, headers=_auth()), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_invalid_json_is_a_400(url):
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={**_auth(), "content-type":
                                                                                  "application/json"})
    assert _error(r, 400)["type"] == "invalid_request_error"


def test_missing_or_bad_key_is_a_401(url):
    assert _error(httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": HELLO}), 401)[
        "code"] == "invalid_api_key"
    assert _error(httpx.get(f"{url}/v1/models", headers=_auth("sk-wrong")), 401)["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=HELLO)


def test_unknown_model_is_a_404(client, url):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    _error(httpx.get(f"{url}/v1/models/gpt-4o", headers=_auth()), 404)


def test_max_tokens_is_bounded(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=LIMIT + 1)
    assert err.value.body["param"] == "max_tokens" and str(LIMIT) in err.value.body["message"]
    out = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=3)
    assert out.usage.completion_tokens <= 3


def test_two_concurrent_streams_both_complete(client, engine):
    expected = engine.chat(to_messages("Hello, how are you?")).text
    texts: list[str] = []

    def one_stream():
        stream = client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
        texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))

    threads = [threading.Thread(target=one_stream) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert texts == [expected, expected]


def _in_flight(url: str) -> int:
    return httpx.get(f"{url}/health").json()["in_flight"]


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_mid_stream_frees_the_model(url, client):
    body = {"model": MODEL, "messages": HELLO, "stream": True, "max_tokens": 50_000}  # ~a minute to finish
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=_auth(), timeout=60) as r:
        lines = r.iter_lines()  # one iterator: a dropped one closes the response, i.e. disconnects early
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        assert _wait_for(lambda: _in_flight(url) == 1, 10)
    assert _wait_for(lambda: _in_flight(url) == 0, 10), "the generation kept running after the client left"
    out = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert out.usage.completion_tokens <= 2
