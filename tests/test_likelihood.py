"""tunelab/likelihood.py on a tiny model: per-sample NLL against a hand computation from full logits, the
aggregate against the old loss, the coarse (top-k) KL against the exact KL, and training toward a target."""

import math

import pytest
import torch

from tunelab import likelihood
from tunelab.hparams import parse_args
from tunelab.likelihood import BaseTopK, Scores, aggregate, coarse_kl, records, score_rows


@pytest.fixture
def setup(tiny_llama_dir, tiny_data_dir):
    """(model, tokenizer, rows): the tiny Llama and 7 eval rows of the tiny data set (full sequences)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.preprocess import build_dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    args = parse_args(["--dataset", "tiny", "--dataset_dir", str(tiny_data_dir), "--max_samples", "7",
                       "--output_dir", "unused", "--do_eval"])
    dataset = build_dataset(args.data, tokenizer, "eval")
    rows = [{"input_ids": r["full_input_ids"], "labels": r["full_labels"]} for r in dataset]
    return model, tokenizer, rows


def full_logprobs(model, row) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [n, V] at the positions predicting response tokens, those tokens [n]) from one unbatched
    forward with every logit computed."""
    ids = torch.tensor([row["input_ids"]])
    labels = torch.tensor(row["labels"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    where = labels[1:] != -100
    return logits[:-1][where].log_softmax(-1), labels[1:][where]


def perturbed(model, scale=0.05, seed=1):
    import copy

    torch.manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * scale)
    return other


def score(model, tokenizer, rows, **kw):
    with torch.inference_mode():
        return score_rows(model, rows, tokenizer, 3, **kw)


def test_per_sample_nll_matches_full_logits(setup):
    model, tokenizer, rows = setup
    scores, _ = score(model, tokenizer, rows)
    lines = records(scores)
    assert [line["index"] for line in lines] == list(range(len(rows)))
    for row, line in zip(rows, lines):
        logprobs, targets = full_logprobs(model, row)
        assert line["tokens"] == len(targets) > 0
        assert line["nll"] == pytest.approx(float(-logprobs.gather(1, targets[:, None]).mean()), abs=2e-5)
        assert line["kl"] is None  # no base log-probs given


def test_aggregate_nll_is_the_old_token_weighted_loss(setup):
    from transformers import DataCollatorForSeq2Seq

    from tunelab.trainer import supervised_loss

    model, tokenizer, rows = setup
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    total, count = 0.0, 0
    with torch.inference_mode():  # the loss pass eval ran before the likelihood pass replaced it
        for start in range(0, len(rows), 3):
            batch = collate(rows[start:start + 3])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, count = total + float(supervised_loss(model, batch)) * n, count + n
    agg = aggregate(score(model, tokenizer, rows)[0])
    assert agg["nll"] == pytest.approx(total / count, abs=1e-5)
    assert agg["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert agg["kl"] is None and agg["likelihood_samples"] == len(rows)


def exact_kl(base_model, model, row) -> float:
    p, _ = full_logprobs(base_model, row)
    q, _ = full_logprobs(model, row)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_coarse_kl_is_exact_at_full_vocab_and_a_lower_bound_below(setup):
    model, tokenizer, rows = setup
    tuned = perturbed(model)
    vocab = model.config.vocab_size
    exact = [exact_kl(model, tuned, row) for row in rows]
    assert min(exact) > 1e-4  # the perturbation moved the distributions
    _, full = score(model, tokenizer, rows, topk=vocab)
    assert full.k == vocab and full.covered_mass() == pytest.approx(1.0, abs=1e-5)
    at_vocab = [line["kl"] for line in records(score(tuned, tokenizer, rows, base=full)[0])]
    assert at_vocab == pytest.approx(exact, rel=1e-3, abs=1e-6)
    _, top4 = score(model, tokenizer, rows, topk=4)
    assert top4.covered_mass() < 0.999
    at_4 = [line["kl"] for line in records(score(tuned, tokenizer, rows, base=top4)[0])]
    assert all(0 < c <= e + 1e-6 for c, e in zip(at_4, exact)), (at_4, exact)
    assert any(c < e - 1e-4 for c, e in zip(at_4, exact))  # grouping lost something at k = 4


def test_kl_of_the_base_model_against_itself_is_zero(setup):
    model, tokenizer, rows = setup
    _, top = score(model, tokenizer, rows, topk=8)
    scores, _ = score(model, tokenizer, rows, base=top)
    assert scores.kl_sum is not None and float(scores.kl_sum.abs().max()) < 1e-6
    assert torch.allclose(scores.nll_sum, top.nll_sum)


def test_coarse_kl_pure_cases():
    p = torch.tensor([[0.0, -30.0, -30.0]]).log_softmax(-1)  # almost all mass on token 0
    q = torch.tensor([[0.0, 1.0, 2.0]]).log_softmax(-1)
    exact = float((p.exp() * (p - q)).sum())
    assert float(coarse_kl(likelihood.topk_summary(p, 3), q)[0]) == pytest.approx(exact, rel=1e-5)
    values, ids, rest = likelihood.topk_summary(p, 1)
    assert ids.tolist() == [[0]] and float(rest[0]) == pytest.approx(math.log(2) - 30, abs=1e-4)
    assert 0 < float(coarse_kl((values, ids, rest), q)[0]) <= exact
    assert float(coarse_kl((values, ids, rest), p)[0]) == 0.0


def test_training_toward_a_target_lowers_its_nll(setup):
    """A few Adam steps on the response tokens of three rows: each one's NLL falls, and the trained model
    has drifted from the base (KL > 0) on them."""
    from transformers import DataCollatorForSeq2Seq

    from tunelab.trainer import supervised_loss

    model, tokenizer, rows = setup
    targets = rows[:3]
    before, top = score(model, tokenizer, targets, topk=16)
    trained = perturbed(model, scale=0.0)
    trained.train()
    opt = torch.optim.Adam(trained.parameters(), lr=1e-2)
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)(targets)
    for _ in range(5):
        opt.zero_grad()
        supervised_loss(trained, batch).backward()
        opt.step()
    after, _ = score(trained.eval(), tokenizer, targets, base=top)
    b, a = records(before), records(after)
    assert all(x["nll"] < y["nll"] - 0.1 for x, y in zip(a, b)), (a, b)
    assert all(x["kl"] > 1e-3 for x in a), a  # coarse: the random base spreads its mass over ~300 tokens


def test_shards_merge_back_in_data_order(setup):
    model, tokenizer, rows = setup
    whole, top = score(model, tokenizer, rows, topk=4)
    shards = [list(range(r, len(rows), 3)) for r in range(3)]  # distributed.shard_indices for 3 ranks
    parts = [score(model, tokenizer, [rows[i] for i in s], topk=4) for s in shards]
    merged = likelihood.merge_shards([p[0] for p in parts], len(rows))
    assert torch.equal(merged.tokens, whole.tokens)
    assert torch.allclose(merged.nll_sum, whole.nll_sum, atol=1e-4)
    merged_top = likelihood.merge_shards([p[1] for p in parts], len(rows))
    assert torch.equal(merged_top.ids, top.ids)
    assert torch.allclose(merged_top.logprobs, top.logprobs, atol=1e-4)
    # selecting a shard of the base side gives the positions of exactly those samples
    sub = top.select(shards[1])
    assert torch.equal(sub.ids, parts[1][1].ids)


def test_base_topk_round_trips_through_safetensors(setup, tmp_path):
    model, tokenizer, rows = setup
    _, top = score(model, tokenizer, rows[:2], topk=5)
    top.save(tmp_path / "b.safetensors", {"base_model": "x"})
    back = BaseTopK.load(tmp_path / "b.safetensors")
    for name in ("tokens", "nll_sum", "logprobs", "ids", "rest"):
        assert torch.equal(getattr(back, name), getattr(top, name)), name


def test_base_log_probs_of_other_samples_are_refused(setup):
    model, tokenizer, rows = setup
    _, top = score(model, tokenizer, rows[:3], topk=4)
    with pytest.raises(ValueError, match="other samples"):
        score(model, tokenizer, rows[3:6], base=top)


def test_records_and_aggregate_are_token_weighted():
    scores = Scores(torch.tensor([2, 0, 4]), torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64),
                    torch.tensor([0.2, 0.0, 0.0], dtype=torch.float64))
    assert records(scores, [5, 6, 7]) == [{"index": 5, "tokens": 2, "nll": 1.0, "kl": 0.1},
                                          {"index": 6, "tokens": 0, "nll": None, "kl": None},
                                          {"index": 7, "tokens": 4, "nll": 1.0, "kl": 0.0}]
    agg = aggregate(scores)
    assert agg == {"nll": 1.0, "perplexity": round(math.e, 4), "kl": round(0.2 / 6, 6), "likelihood_samples": 3}


def test_rows_come_back_in_the_order_given_whatever_the_batching(setup):
    """The pass batches rows longest first (little padding); scores and top-k come back in the order given:
    reversed rows give reversed scores, and the per-position top-k follows its sample."""
    model, tokenizer, rows = setup
    scores, top = score(model, tokenizer, rows, topk=5)
    back, back_top = score(model, tokenizer, rows[::-1], topk=5)
    torch.testing.assert_close(back.nll_sum.flip(0), scores.nll_sum, rtol=1e-5, atol=1e-6)
    last = back_top.select([len(rows) - 1])  # the first row given, scored last in the reversed run
    first = top.select([0])
    assert torch.equal(last.targets, first.targets) and torch.equal(last.ids, first.ids)
    torch.testing.assert_close(last.logprobs, first.logprobs, rtol=1e-5, atol=1e-5)
