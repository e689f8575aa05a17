import json
import os
import subprocess

import pytest
import torch
from conftest import Forked, finish, start_ranks

from training.models.decoding import generate, pick_tokens, sample_batch
from training.models.transformer import KVCache, ModelConfig, Transformer
from training.sample import sample_seed


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    return model.eval()


def prompts_of(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (int(n),), generator=g).tolist() for n in (5, 17, 1, 9, 30, 12)]


def test_a_left_padded_row_computes_as_its_sequence_alone():
    model, prompts = tiny_model(), prompts_of()
    longest = max(len(p) for p in prompts)
    pad = torch.tensor([longest - len(p) for p in prompts])
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    with torch.no_grad():
        cache = KVCache(model.cfg, len(prompts), longest + 1, "cpu", torch.float32)
        batched = model(tokens, cache, pad=pad)
        step = model(torch.full((len(prompts), 1), 7), cache, pad=pad)[:, -1]  # one decoding step on top
        for r, p in enumerate(prompts):
            alone = model(torch.tensor([p + [7]]))[0]
            torch.testing.assert_close(batched[r, longest - len(p):], alone[:-1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(step[r], alone[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("greedy", [True, False])
def test_batched_sampling_gives_each_row_what_one_at_a_time_generation_gives(greedy):
    """Same model, same prompts, each row with the generator generate() would get: the same tokens (decoding
    stops at each row's own stop id)."""
    model, prompts = tiny_model(), prompts_of()
    stops = [5, 5, None, 11, 5, 40]
    seeds = [sample_seed(3, i, 0) for i in range(len(prompts))]
    options = {"temperature": 1.0, "top_k": 20, "top_p": 0.9, "greedy": greedy, "vocab_limit": 90}
    batched, stopped = sample_batch(model, prompts, stops, seeds, 25, **options)
    for r, prompt in enumerate(prompts):
        alone = generate(model, prompt, 25, eos_id=stops[r], generator=torch.Generator().manual_seed(seeds[r]),
                         **options)
        assert batched[r] == alone, r
        assert stopped[r] == (len(alone) < 25), r
    assert len({len(b) for b in batched}) > 1 or greedy  # rows end at different lengths
    assert all(t < 90 for row in batched for t in row)


@pytest.mark.parametrize("options", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 9},
                                     {"temperature": 1.3, "top_p": 0.8}, {"temperature": 0.9, "top_k": 20, "top_p": 0.6}])
def test_drawn_tokens_follow_the_distribution_transformers_filters_to(options):
    """Evenly spaced uniforms through pick_tokens: each token's share of the draws is its probability after
    transformers' own temperature, top-k and top-p warpers (within the grid's 1/n); padding ids are never drawn,
    not even at the ends of [0, 1)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4)) * 2
    logits[:, 45:] = 5.0  # the padding of a rounded-up vocabulary, made likely: vocab_limit must keep it out
    n = 20_000
    uniforms = torch.cat([(torch.arange(n, dtype=torch.float64) + 0.5) / n, torch.tensor([0.0, 1 - 2**-53])])
    warpers = [TemperatureLogitsWarper(options["temperature"])]
    warpers += [TopKLogitsWarper(options["top_k"])] if "top_k" in options else []
    warpers += [TopPLogitsWarper(options["top_p"])] if "top_p" in options else []
    for row in logits:
        drawn = pick_tokens(row.expand(n + 2, -1), uniforms, vocab_limit=45, **options)
        assert drawn.max() < 45
        expected = row.clone().unsqueeze(0)
        expected[:, 45:] = -float("inf")
        for warp in warpers:
            expected = warp(None, expected)
        expected = torch.softmax(expected[0], -1)
        share = torch.bincount(drawn[:n], minlength=50) / n
        assert (share - expected).abs().max() <= 1 / n + 1e-6
        assert expected[drawn[n:]].min() > 0  # the end points land on tokens that can be drawn


def test_many_rows_draw_in_chunks_as_each_row_alone_and_nan_logits_raise():
    logits = torch.randn(150, 50, generator=torch.Generator().manual_seed(5))
    uniforms = torch.rand(150, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    together = pick_tokens(logits, uniforms, top_p=0.9, top_k=30)  # more rows than one chunk
    alone = torch.cat([pick_tokens(logits[i:i + 1], uniforms[i:i + 1], top_p=0.9, top_k=30) for i in range(150)])
    assert torch.equal(together, alone) and len(set(together.tolist())) > 10
    logits[140, 7] = float("nan")  # torch.multinomial refused such a row; a search would run past the vocabulary
    with pytest.raises(FloatingPointError, match="NaN"):
        pick_tokens(logits, uniforms)


def test_parts_or_samples_of_an_older_sampler_are_refused_by_name(tmp_path):
    from preprocess.errors import UserError
    from training.sample import claim

    options = {"prompts": "abc", "n": 4, "draws": "inverse-cdf/1"}
    older = {k: v for k, v in options.items() if k != "draws"}  # written before the draw rule was recorded
    parts, out = tmp_path / "s.jsonl.parts", tmp_path / "s.jsonl"
    parts.mkdir()
    (parts / "options.json").write_text(json.dumps(older))
    with pytest.raises(UserError, match=r"drawn by another sampler \(multinomial; this one draws by inverse-cdf/1\); "
                                        "remove the directory"):
        claim(str(out), str(parts), str(tmp_path / "s.jsonl.options.json"), options)
    (parts / "options.json").write_text(json.dumps({**options, "n": 8}))
    with pytest.raises(UserError, match="other options or prompts; rerun with those"):
        claim(str(out), str(parts), str(tmp_path / "s.jsonl.options.json"), options)


def test_a_short_prompt_beside_one_near_the_context_gets_all_its_tokens():
    """The context (64) ends the long row after 5 new tokens; the short row still gets its 20, as alone."""
    model = tiny_model()
    prompts = [list(range(3, 63)), [5, 6, 7, 8, 9]]
    seeds = [sample_seed(0, i, 0) for i in range(2)]
    batched, stopped = sample_batch(model, prompts, [None, None], seeds, 20, greedy=True)
    for r, prompt in enumerate(prompts):
        assert batched[r] == generate(model, prompt, 20, greedy=True), r
    assert [len(b) for b in batched] == [5, 20] and stopped == [False, False]


def test_the_randomness_of_a_sample_depends_only_on_seed_prompt_and_sample():
    # pinned: a change to the derivation would silently change every sampled file and resumed run
    assert sample_seed(0, 4, 1) == 5841539805452095117
    assert len({sample_seed(0, 4, 1), sample_seed(0, 1, 4), sample_seed(1, 4, 1), sample_seed(0, 4, 2)}) == 4


# ---------------------------------------------------------------------------------------------- end to end

def write_prompts(path) -> str:
    lines = ["Write a line spoken by HAMLET.", {"prompt": "Write a line spoken by ROMEO."},
             {"messages": [{"role": "system", "content": "Speak in verse."},
                           {"role": "user", "content": "Write a line spoken by JULIET."}]}]
    lines += [f"Write a line spoken by {name}." for name in ("LEAR", "PUCK", "IAGO", "PORTIA", "VIOLA", "KENT",
                                                             "TITANIA")]
    with open(path, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return str(path)


def run_sample(*args, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    proc = finish(start_ranks(["-m", "training.sample", *args], nproc))
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_processes_write_the_same_file_as_one_and_a_killed_run_resumes(sft_run, tmp_path):
    import time

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    common = ["--checkpoint", sft_run, "--prompts", prompts, "--samples", "3", "--chat", "--max-new-tokens", "24",
              "--seed", "5"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    run_sample(*common, "--out", one, "--batch-size", "6")
    run_sample(*common, "--out", two, "--batch-size", "6", nproc=2)
    assert one.read_bytes() == two.read_bytes()
    records = [json.loads(line) for line in one.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(10)) and all(len(r["samples"]) == 3 for r in records)
    assert records[2]["prompt"]["messages"][0]["role"] == "system"
    assert len({s for r in records for s in r["samples"]}) > 10  # samples differ
    assert not any("<|end|>" in s for r in records for s in r["samples"])  # a reply stops at its end of turn
    (tmp_path / "one.jsonl.parts").mkdir()  # as a run stopped between its merge and its clean-up leaves it
    again = run_sample(*common, "--out", one, "--batch-size", "6")
    assert "nothing to do" in again.stdout and not (tmp_path / "one.jsonl.parts").exists()

    # killed -9 after its first batch (one prompt each), then run again: the same file, sampled once
    killed = tmp_path / "killed.jsonl"
    proc = Forked(["-m", "training.sample", *common, "--out", killed, "--batch-size", "3"])
    parts = tmp_path / "killed.jsonl.parts"
    deadline = time.time() + 300
    def finished_batch() -> bool:  # a whole part, not the temporary file it is written to first
        return parts.is_dir() and any(p.name.startswith("batch-") and p.name.endswith(".jsonl") for p in parts.iterdir())

    while not finished_batch() and time.time() < deadline:
        assert proc.poll() is None, "finished before it could be killed"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not killed.exists()
    resumed = run_sample(*common, "--out", killed, "--batch-size", "3")
    straight = tmp_path / "straight.jsonl"
    run_sample(*common, "--out", straight, "--batch-size", "3")
    assert killed.read_bytes() == straight.read_bytes()
    sampled_now = int(resumed.stdout.split("(")[1].split()[0])
    assert 0 < sampled_now < 10


def test_bad_prompts_and_changed_options_are_one_line(sft_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n{"prompt": 3}\n')
    proc = run_sample("--checkpoint", sft_run, "--prompts", bad, "--out", tmp_path / "o.jsonl", check=False)
    assert proc.returncode == 1 and f"{bad}:2: expected a JSON string or an object" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    bad.write_text('"fine"\n\n' + json.dumps("word " * 400) + "\n")  # a blank line, then more than the context
    proc = run_sample("--checkpoint", sft_run, "--prompts", bad, "--out", tmp_path / "o.jsonl", check=False)
    assert proc.returncode == 1 and f"{bad}:3: the prompt is " in proc.stderr and "context holds 64" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "o.jsonl")
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out.jsonl"
    run_sample("--checkpoint", sft_run, "--prompts", prompts, "--out", out, "--max-new-tokens", "4")
    proc = run_sample("--checkpoint", sft_run, "--prompts", prompts, "--out", out, "--max-new-tokens", "5",
                      check=False)
    assert proc.returncode == 1 and "written with other options or prompts" in proc.stderr
    assert os.path.exists(str(out) + ".options.json")
