"""Dynamic batching (tunelab/batching.py) on a tiny model: requests arriving together share one generate
call with the answers they get alone; stop strings, n choices, seeds, per-row budgets, the bounded queue
and cancelling."""

from __future__ import annotations

import threading

import pytest

from tunelab.engine import BadRequest, Busy, ChatEngine, Scheduler, to_messages
from tunelab.hparams import parse_args

QUERIES = ["Hello, how are you?", "凉宫春日", "Give three tips for staying healthy.", "Hi"]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return ChatEngine.from_args(parse_args(["--model_name_or_path", str(tiny_llama_dir), "--max_new_tokens", "24"]),
                                scheduler=Scheduler(max_batch=8, window_s=0.0))


def _sharing(engine, **scheduler) -> ChatEngine:
    """The same model behind a scheduler of its own. With a long window, a batch starts exactly when
    `max_batch` rows are queued: tests decide what lands in one batch, however slow the machine."""
    return ChatEngine(engine.model, engine.tokenizer, engine.template, generation=engine.generation,
                      scheduler=Scheduler(**{"window_s": 600, **scheduler}))


def _alone(engine, query: str, **settings):
    gen = engine.stream(to_messages(query), **settings)
    return gen.result()


def test_requests_arriving_together_share_a_batch_with_their_solo_answers(engine):
    solo = [_alone(engine, q) for q in QUERIES]  # each its own batch (no window)
    together = _sharing(engine, max_batch=len(QUERIES))
    gens = [together.stream(to_messages(q)) for q in QUERIES]
    batched = [g.result() for g in gens]
    assert list(together.scheduler.batch_sizes) == [len(QUERIES)]
    assert [r.text for r in batched] == [r.text for r in solo]
    assert [r.usage for r in batched] == [r.usage for r in solo] and engine.in_flight == 0


def test_each_row_keeps_its_own_token_budget(engine):
    together = _sharing(engine, max_batch=3)
    gens = [together.stream(to_messages("Hello"), max_new_tokens=k, temperature=0) for k in (2, 5, 24)]
    replies = [g.result() for g in gens]
    assert list(together.scheduler.batch_sizes) == [3]
    for reply, k in zip(replies, (2, 5, 24)):
        assert reply.completion_tokens == k or (reply.finish_reason == "stop" and reply.completion_tokens < k)
    assert replies[0].finish_reason == "length"


def test_stop_string_cuts_the_answer_and_is_never_streamed(engine):
    full = _alone(engine, QUERIES[0], max_new_tokens=24).text
    assert len(full) > 8, "the tiny model's answer is too short to cut"
    stop = full[4:7]
    gen = engine.stream(to_messages(QUERIES[0]), stop=["never-there", stop])
    pieces = list(gen)
    assert gen.reply.text == full[:full.find(stop)] == "".join(pieces)
    assert gen.reply.finish_reason == "stop" and stop not in "".join(pieces)


def test_n_choices_need_sampling(engine):
    gen = engine.stream(to_messages("Hello"), n=3, temperature=1.0, max_new_tokens=8)
    indices = {i for i, _ in gen.events()}
    assert gen.done.is_set() and len(gen.replies) == 3 and indices <= {0, 1, 2}
    assert gen.usage["completion_tokens"] == sum(r.completion_tokens for r in gen.replies)
    assert gen.usage["prompt_tokens"] == gen.replies[0].prompt_tokens  # the prompt counts once
    with pytest.raises(BadRequest, match="sampling") as err:
        engine.stream(to_messages("Hello"), n=2, temperature=0)
    assert err.value.param == "n"


def test_a_seeded_sampled_request_repeats_even_among_others(engine):
    settings = {"temperature": 1.0, "seed": 1234, "max_new_tokens": 12}
    first = _alone(engine, "Hello", **settings).text
    others = [engine.stream(to_messages(q), temperature=1.0, max_new_tokens=12) for q in QUERIES]
    again = engine.stream(to_messages("Hello"), **settings)
    assert again.result().text == first
    assert all(g.result() for g in others)
    with pytest.raises(BadRequest, match="seed"):
        engine.stream(to_messages("Hello"), seed=2**70)


def test_raw_completion_continues_the_text(engine):
    gen = engine.complete(["Hello, how", "The quick"], n=1, max_new_tokens=6, temperature=0)
    replies = [gen.result(), gen.replies[1]]
    ids = engine.text_ids("The quick")
    assert replies[1].prompt_tokens == len(ids) and gen.usage["prompt_tokens"] == len(ids) + len(
        engine.text_ids("Hello, how"))
    assert replies[0].text == engine.complete(["Hello, how"], max_new_tokens=6, temperature=0).result().text


def test_the_queue_is_bounded_and_a_queued_cancel_ends_at_once(tiny_llama_dir, engine):
    small = _sharing(engine, max_batch=8, max_queue=2)
    gens = [small.stream(to_messages("Hi")), small.stream(to_messages("Hi"))]
    with pytest.raises(Busy, match="busy"):
        small.stream(to_messages("Hi"))
    with pytest.raises(BadRequest, match="at most 2"):  # could never fit: not 'busy'
        small.stream(to_messages("Hi"), n=3, temperature=1.0)
    assert small.in_flight == 2
    for gen in gens:
        gen.cancel()
        assert gen.wait(5) and gen.reply.finish_reason == "cancelled" and list(gen) == []
    assert small.in_flight == 0


def test_cancelling_one_row_leaves_the_others_running(engine):
    together = _sharing(engine, max_batch=2)
    long = together.stream(to_messages("Hello"), max_new_tokens=50_000, temperature=0)
    short = together.stream(to_messages("Hi"), max_new_tokens=8, temperature=0)
    done = threading.Event()
    threading.Thread(target=lambda: (short.result(), done.set()), daemon=True).start()
    assert done.wait(300) and short.reply.finish_reason in ("stop", "length")
    long.cancel()
    assert long.wait(120) and long.reply.finish_reason == "cancelled" and together.in_flight == 0
    assert list(together.scheduler.batch_sizes) == [2]


def test_a_failing_batch_ends_its_requests_with_the_error(engine):
    from tunelab.batching import Generation

    broken = {**engine._generate_kwargs(engine.generation), "not_a_generate_option": 1}
    gen = Generation(engine, [engine.prompt_ids(to_messages("Hi"))], broken)
    engine.scheduler.submit(gen)
    with pytest.raises(ValueError, match="not_a_generate_option"):
        gen.result()
    assert gen.done.is_set() and engine.in_flight == 0
    assert engine.chat(to_messages("Hi"), max_new_tokens=2).completion_tokens > 0


def test_wait_idle_returns_once_the_worker_has_ended(engine):
    assert engine.chat(to_messages("Hello"), max_new_tokens=3).completion_tokens > 0
    assert engine.scheduler.wait_idle(timeout=30)
    assert engine.scheduler._worker is None and engine.in_flight == 0
