"""MiniLLM (methods.md §5): rollouts, returns, importance weights, the loss, and the `kdflow minillm` run.

Every numeric check compares against a straightforward reference (loops, probabilities in
float64, unpadded single-row forward passes), never against stored numbers.
"""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from kdflow.cli import main
from kdflow.config import MiniLLMConfig, load_config
from kdflow.data import left_pad
from kdflow.methods.minillm import policy_loss_sums, step_gradients
from kdflow.rollout import length_normalized_returns, mixed_sample, pack_right

from conftest import tiny_llama, write_jsonl


def peaky(tok, seed, layers, hidden, scale=8.0):
    """A tiny random model whose next-token distributions are far from uniform (scaled embeddings)."""
    m = tiny_llama(tok, layers=layers, hidden=hidden, seed=seed)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(scale)
    return m.eval()


@pytest.fixture(scope="module")
def pair(bpe_tok):
    return peaky(bpe_tok, 2, 2, 32), peaky(bpe_tok, 1, 2, 48)


def prompts_batch(tok):
    texts = ["Define the noun \"cat\" in one short phrase.", "hello", "What is a word, and how would you define its meaning?"]
    prompts = [tok(t).input_ids for t in texts]
    assert len({len(p) for p in prompts}) == 3  # different lengths: left padding matters
    return prompts


def sample(student, teacher, tok, prompts, **kw):
    ids, mask = left_pad(prompts, tok.pad_token_id)
    args = dict(max_new_tokens=10, mix_alpha=0.2, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                vocab_size=len(tok), generator=torch.Generator().manual_seed(kw.pop("seed", 0)))
    args.update(kw)
    return mixed_sample(student, teacher, ids, mask, **args)


def ragged(student, teacher, tok, prompts, seed, **kw):
    """A rollout whose rows end at different lengths: a token drawn early in row 0 is declared EOS
    (same seed and shapes, hence the same draws as the free-running rollout). Returns (rollout, free, eos)."""
    free = sample(student, teacher, tok, prompts, stop_at_eos=False, max_new_tokens=12, seed=seed)
    eos = int(free.response_ids[0, 3])
    ro = sample(student, teacher, tok, prompts, max_new_tokens=12, seed=seed, eos_id=eos, keep_teacher_logprobs=True, **kw)
    assert len(set(ro.lengths.tolist())) > 1 and ro.response_ids.shape[1] > int(ro.lengths.min())
    return ro, free, eos


@torch.no_grad()
def row_logits(model, ids, vocab):
    """float64 logits of one unpadded sequence: the plainest possible reference."""
    return model(torch.tensor([ids])).logits[0, :, :vocab].double()


# ----------------------------------------------------------------------------------------------
# Returns


def reference_returns(rewards, lengths):
    out = torch.zeros_like(rewards, dtype=torch.float64)
    for b, T in enumerate(lengths):
        for t in range(T):
            later = [float(rewards[b, u]) for u in range(t + 1, T)]
            out[b, t] = sum(later) / len(later) if later else 0.0
    return out


def test_returns_are_means_over_the_remaining_tokens_and_ignore_padding():
    torch.manual_seed(0)
    lengths = [7, 1, 4, 10]
    mask = torch.tensor([[t < L for t in range(10)] for L in lengths])
    rewards = torch.randn(4, 10)
    got = length_normalized_returns(rewards, mask)
    assert torch.allclose(got.double(), reference_returns(rewards, lengths), atol=1e-6)
    assert got[1, 0] == 0 and all(got[b, L - 1] == 0 for b, L in enumerate(lengths))  # no later tokens: 0
    # Padding holds garbage here (even inf); returns must not see it, and are exactly 0 there.
    garbage = torch.where(mask, rewards, torch.full_like(rewards, float("inf")))
    got2 = length_normalized_returns(garbage, mask)
    assert torch.equal(got, got2) and bool((got2[~mask] == 0).all())
    # The test can fail: normalising by the absolute position, or by the padded width, gives other numbers.
    by_width = torch.stack([(rewards * mask)[:, t + 1:].sum(-1) / max(10 - t - 1, 1) for t in range(10)], -1) * mask
    assert not torch.allclose(got, by_width, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# The sampler


def test_cached_rollout_equals_uncached_and_single_row_forward(bpe_tok, pair):
    student, teacher = pair
    prompts = prompts_batch(bpe_tok)
    V = len(bpe_tok)
    cached = sample(student, teacher, bpe_tok, prompts, keep_teacher_logprobs=True, stop_at_eos=False)
    plain = sample(student, teacher, bpe_tok, prompts, keep_teacher_logprobs=True, stop_at_eos=False, use_cache=False)
    assert torch.equal(cached.response_ids, plain.response_ids)
    assert torch.allclose(cached.teacher_logprobs, plain.teacher_logprobs, atol=1e-5)
    assert torch.allclose(cached.student_logp, plain.student_logp, atol=1e-5)
    for i, p in enumerate(prompts):  # left-padded + cached == each row alone, no padding, no cache
        y = cached.response_ids[i].tolist()
        s = F.log_softmax(row_logits(student, p + y, V), -1)[len(p) - 1:-1]
        t = F.log_softmax(row_logits(teacher, p + y, V), -1)[len(p) - 1:-1]
        assert torch.allclose(cached.teacher_logprobs[i].double(), t, atol=1e-4)
        assert torch.allclose(cached.student_logp[i].double(), s.gather(-1, torch.tensor(y)[:, None]).squeeze(-1), atol=1e-4)
    # pack_right lines up the training forward with the sampler's positions
    ids, mask, positions = pack_right(cached, bpe_tok.pad_token_id)
    with torch.no_grad():
        logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1][positions][:, :V]
    logq = F.log_softmax(logits.float(), -1).gather(-1, cached.response_ids[cached.response_mask][:, None]).squeeze(-1)
    assert torch.allclose(logq, cached.student_logp[cached.response_mask], atol=1e-4)


@pytest.mark.parametrize("alpha,temperature", [(0.3, 1.0), (0.2, 0.7), (1.0, 1.0)])
def test_importance_weights_match_a_hand_computation(bpe_tok, pair, alpha, temperature):
    student, teacher = pair
    prompts = prompts_batch(bpe_tok)
    V = len(bpe_tok)
    ro = sample(student, teacher, bpe_tok, prompts, mix_alpha=alpha, temperature=temperature, stop_at_eos=False, seed=3)
    for i, p in enumerate(prompts):
        y = ro.response_ids[i].tolist()
        s, t = row_logits(student, p + y, V)[len(p) - 1:-1], row_logits(teacher, p + y, V)[len(p) - 1:-1]
        for j, tok_id in enumerate(y):
            q = torch.softmax(s[j], -1)[tok_id]
            sampled = alpha * torch.softmax(t[j] / temperature, -1)[tok_id] + (1 - alpha) * torch.softmax(s[j] / temperature, -1)[tok_id]
            assert math.isclose(float(ro.importance_weight[i, j]), float(q / sampled), rel_tol=2e-4)
            assert math.isclose(float(ro.teacher_logp[i, j]), float(torch.log_softmax(t[j], -1)[tok_id]), abs_tol=1e-4)


def chi_square_z(counts, probs):
    """Wilson-Hilferty z-score of Pearson's statistic (bins with expectation < 5 merged into one)."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    x2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    return ((x2 / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


def test_teacher_mixed_sampling_frequencies_match_the_mixture(bpe_tok, pair):
    student, teacher = pair
    V = len(bpe_tok)
    prompt = bpe_tok("Define the noun cat").input_ids
    q = torch.softmax(row_logits(student, prompt, V)[-1], -1)
    p = torch.softmax(row_logits(teacher, prompt, V)[-1], -1)
    assert float((p - q).abs().sum()) / 2 > 0.5  # the two distributions are far apart: the test has power
    n = 16000
    ids = torch.tensor([prompt]).repeat(n, 1)
    ro = mixed_sample(student, teacher, ids, torch.ones_like(ids), max_new_tokens=1, mix_alpha=0.2,
                      eos_id=bpe_tok.eos_token_id, pad_id=bpe_tok.pad_token_id, vocab_size=V,
                      generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(ro.response_ids[:, 0], minlength=V).double()
    assert abs(chi_square_z(counts, 0.2 * p + 0.8 * q)) < 3.5
    for wrong in (q, p, 0.4 * p + 0.6 * q):  # the student alone, the teacher alone, another mixture
        assert chi_square_z(counts, wrong) > 8


def test_rows_stop_at_eos_and_padding_never_reaches_the_gradient(bpe_tok, pair):
    student, teacher = pair
    prompts = prompts_batch(bpe_tok)
    ro, free, eos = ragged(student, teacher, bpe_tok, prompts, seed=5)
    for i in range(len(prompts)):
        row = free.response_ids[i].tolist()
        L = row.index(eos) + 1 if eos in row else len(row)
        assert int(ro.lengths[i]) == L and ro.response_ids[i, :L].tolist() == row[:L]
        assert bool(ro.response_mask[i, :L].all()) and not bool(ro.response_mask[i, L:].any())
        assert bool((ro.response_ids[i, L:] == bpe_tok.pad_token_id).all())
    assert float(ro.importance_weight[~ro.response_mask].abs().sum()) == 0
    s = load_config(MiniLLMConfig, None, []).minillm

    def grads(r):
        model = tiny_llama(bpe_tok, layers=2, hidden=32, seed=9)
        rets = length_normalized_returns(r.teacher_logp - r.student_logp, r.response_mask)
        step_gradients(model, r, rets, None, s, bpe_tok.pad_token_id, len(bpe_tok))
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    clean = grads(ro)
    pad = ~ro.response_mask
    ro.response_ids[pad] = 7
    ro.student_logp[pad], ro.teacher_logp[pad], ro.mixed_logp[pad] = 3.0, -50.0, -9.0
    ro.teacher_logprobs[pad] = 0.0
    dirty = grads(ro)
    assert all(torch.equal(clean[n], dirty[n]) for n in clean)


# ----------------------------------------------------------------------------------------------
# The loss


def test_single_step_term_equals_the_token_level_reverse_kl():
    torch.manual_seed(0)
    N, V = 6, 50
    s_logits = (3 * torch.randn(N, V, dtype=torch.float64)).requires_grad_()
    t_logp = F.log_softmax(3 * torch.randn(N, V, dtype=torch.float64), -1)
    tokens = torch.randint(0, V, (N,))
    w = torch.rand(N, dtype=torch.float64) + 0.5
    ret = torch.randn(N, dtype=torch.float64)
    old = F.log_softmax(s_logits.detach(), -1).gather(-1, tokens[:, None]).squeeze(-1)

    def naive_kl(logits):  # sum over v of q_v (log q_v - log p_v), from probabilities, one row at a time
        rows = []
        for n in range(N):
            q = torch.exp(logits[n]) / torch.exp(logits[n]).sum()
            p = torch.exp(t_logp[n])
            rows.append(sum(q[v] * (torch.log(q[v]) - torch.log(p[v])) for v in range(V)))
        return torch.stack(rows)

    for importance in (False, True):
        sums, _ = policy_loss_sums(s_logits, tokens, old, w, ret, t_logp, 0.2, importance)
        ref = (w * naive_kl(s_logits)).sum() if importance else naive_kl(s_logits).sum()
        assert sums["single_step"][1] == N
        assert torch.allclose(sums["single_step"][0].double(), ref.float().double(), rtol=1e-5)
        g, = torch.autograd.grad(sums["single_step"][0], s_logits)
        g_ref, = torch.autograd.grad(ref, s_logits)
        assert torch.allclose(g.double(), g_ref, atol=1e-5)


def test_policy_gradient_term_and_its_clipping():
    torch.manual_seed(1)
    N, V = 5, 30
    logits = torch.randn(N, V, requires_grad=True)
    t_logp = F.log_softmax(torch.randn(N, V), -1)
    tokens = torch.randint(0, V, (N,))
    w = torch.rand(N) + 0.5
    ret = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0])
    logq_of = lambda: F.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)  # noqa: E731
    logq = logq_of().detach()
    # Ratio 1 (first inner epoch): the gradient is -sum_t w_t R_t grad log q(y_t), Eq. 6's second term.
    sums, stats = policy_loss_sums(logits, tokens, logq, w, ret, t_logp, 0.2)
    g, = torch.autograd.grad(sums["pg"][0], logits)
    g_ref, = torch.autograd.grad(-(w * ret * logq_of()).sum(), logits)
    assert torch.allclose(g, g_ref, atol=1e-6) and stats["clipped"] == 0
    # Ratio 1.5 for every token: clipped (zero gradient) where the return is positive, because the
    # surrogate already gained all it may; unclipped where it is negative (the max keeps the worse).
    old = logq - math.log(1.5)
    sums, stats = policy_loss_sums(logits, tokens, old, w, ret, t_logp, 0.2)
    g, = torch.autograd.grad(sums["pg"][0], logits)
    pos = ret > 0
    assert torch.allclose(g[pos], torch.zeros_like(g[pos]))
    g_unclipped, = torch.autograd.grad(-(w * ret * torch.exp(logq_of() - old)).sum(), logits)
    assert torch.allclose(g[~pos], g_unclipped[~pos], atol=1e-6) and stats["clipped"] == N
    assert torch.allclose(sums["pg"][0], (w * torch.maximum(-ret * 1.5, -ret * 1.2)).sum(), atol=1e-5)


def test_micro_batches_leave_the_step_gradient_unchanged(bpe_tok, pair, tiny_data):
    from kdflow.data import read_rows
    from kdflow.methods.minillm import lm_examples_of

    student, teacher = pair
    ro, _, _ = ragged(student, teacher, bpe_tok, prompts_batch(bpe_tok) + [bpe_tok("a").input_ids], seed=2)
    rets = length_normalized_returns(ro.teacher_logp - ro.student_logp, ro.response_mask)
    cfg = load_config(MiniLLMConfig, None, ["minillm.lm_coef=0.3"])
    lm = lm_examples_of(read_rows(str(tiny_data["train"])).head(3), bpe_tok, cfg)

    def grads(micro):
        model = tiny_llama(bpe_tok, layers=2, hidden=32, seed=4)
        cfg.minillm.micro_batch_size = micro
        logs = step_gradients(model, ro, rets, lm, cfg.minillm, bpe_tok.pad_token_id, len(bpe_tok))
        return {n: p.grad.clone() for n, p in model.named_parameters()}, logs

    whole, logs = grads(0)
    assert logs["lm"] > 0 and logs["single_step"] > 0
    for micro in (1, 3):
        split, _ = grads(micro)
        assert all(torch.allclose(whole[n], split[n], atol=1e-6, rtol=1e-4) for n in whole), micro


# ----------------------------------------------------------------------------------------------
# `kdflow minillm`


def run_args(tiny_dirs, tiny_data, out, *extra):
    return ["minillm", f"teacher.name={tiny_dirs['teacher']}", f"student.name={tiny_dirs['student']}",
            f"data.train={tiny_data['train']}", f"data.test={tiny_data['test']}", f"output_dir={out}",
            "minillm.rollout_batch_size=4", "minillm.batch_size=2", "minillm.inner_epochs=1", "minillm.max_new_tokens=6",
            "minillm.learning_rate=1.0e-3", "eval.max_rows=4", "eval.batch_size=4", "eval.max_new_tokens=4", *extra]


def test_two_step_minillm_run_from_a_pruned_teacher_writes_its_outputs(tmp_path, tiny_dirs, tiny_data, capsys):
    out = tmp_path / "run"
    lm = write_jsonl(tmp_path / "lm.jsonl", [{"text": "a word is a unit of language"}, {"text": "the cat sat on the mat"}])
    rc = main(run_args(tiny_dirs, tiny_data, out, "minillm.max_steps=2", "student.init=prune_teacher",
                       "student.keep_layers=[0, 3]", "eval.sample_seeds=[1, 2]", "minillm.lm_coef=0.5",
                       f"minillm.lm_data={lm}", "evaluate_teacher=false"))
    assert rc == 0, capsys.readouterr().err
    assert "| student (after) |" in capsys.readouterr().out
    for name in ("config.yaml", "metrics.json", "report.md", "loss_curve.png", "reward_curve.png", "log_history.json",
                 "student/config.json", "checkpoint-2/loop_state.json"):
        assert (out / name).exists(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "minillm" and m["train"]["steps"] == 2 and m["train"]["sampled_tokens"] > 0
    after = m["eval"]["student (after)"]
    for key in ("rougeL", "sampled_rougeL", "sampled_rougeL_std", "sampled_length", "sampled_distinct_1", "sampled_distinct_2"):
        assert key in after
    hist = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in hist] == [1, 2]
    assert all(k in hist[0] for k in ("single_step", "pg", "lm", "rollout_reward", "rollout_importance_weight"))
    assert hist[0]["ratio"] == pytest.approx(1.0, abs=1e-4)  # first update on fresh samples: q_theta = q_rollout
    assert "mix_alpha: 0.2" in (out / "config.yaml").read_text()
    assert "Rouge-L | length | distinct-1" in (out / "report.md").read_text()
    # the saved student reloads through the public path
    from safetensors.torch import load_file

    assert main(["eval", f"model.name={out / 'student'}", f"data.test={tiny_data['test']}", "eval.max_rows=2",
                 "eval.max_new_tokens=3"]) == 0
    assert load_file(str(out / "checkpoint-2" / "model.safetensors"))  # the checkpoint holds the trained weights


def test_resume_gives_the_same_student_as_an_uninterrupted_run(tmp_path, tiny_dirs, tiny_data, capsys):
    from safetensors.torch import load_file

    # 4 prompts per rollout, 2 per step, 2 inner epochs: 4 updates per rollout, 2 rollouts
    common = ["minillm.max_steps=8", "minillm.save_steps=4", "evaluate_before=false", "evaluate_teacher=false",
              "data.test=", "minillm.inner_epochs=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(run_args(tiny_dirs, tiny_data, straight, *common)) == 0
    assert main(run_args(tiny_dirs, tiny_data, resumed, *common)) == 0
    assert (resumed / "checkpoint-4").is_dir() and (resumed / "checkpoint-8").is_dir()
    # Interrupted after the first rollout: only checkpoint-4 survives.
    for name in ("checkpoint-8", "student"):
        shutil.rmtree(resumed / name)
    (resumed / "metrics.json").unlink()
    capsys.readouterr()
    assert main(run_args(tiny_dirs, tiny_data, resumed, *common)) == 0
    assert "resuming from" in capsys.readouterr().out
    a = load_file(str(straight / "student" / "model.safetensors"))
    b = load_file(str(resumed / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    hist = json.loads((resumed / "log_history.json").read_text())
    assert [h["step"] for h in hist] == list(range(1, 9)) and hist[4]["rollout"] == 1
    # the trained student differs from its start, so the comparison above means something
    start = load_file(str(tiny_dirs["student"] / "model.safetensors"))
    assert any(not torch.allclose(start[k], a[k]) for k in a if k in start)
    # other settings in the same folder: refused instead of mixed
    assert main(run_args(tiny_dirs, tiny_data, resumed, *common[1:], "minillm.max_steps=12")) == 2
    assert "other settings (minillm.max_steps differ)" in capsys.readouterr().err
    # a checkpoint without its RNG state would resume, but not exactly: refused in one line
    (resumed / "checkpoint-8" / "random_states_0.pkl").unlink()
    assert main(run_args(tiny_dirs, tiny_data, resumed, *common)) == 2
    assert "lacks random_states_0.pkl, the RNG state of process 0" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["minillm.batch_size=3"], "minillm.batch_size=3 must divide minillm.rollout_batch_size=4"),
    (["minillm.lm_coef=0.5"], "minillm.lm_coef > 0 needs minillm.lm_data"),
    (["minillm.mix_alpha=1.5"], "'minillm.mix_alpha' must lie in [0, 1]"),
    (["minillm.clip_ratio=0"], "'minillm.clip_ratio' must be > 0"),
    (["minillm.mix_alpa=0.1"], "did you mean 'minillm.mix_alpha'"),
])
def test_bad_settings_stop_with_one_line(tmp_path, tiny_dirs, tiny_data, capsys, extra, message):
    assert main(run_args(tiny_dirs, tiny_data, tmp_path / "bad", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_lm_row_names_the_file_and_line(tmp_path, tiny_dirs, tiny_data, capsys):
    lm = write_jsonl(tmp_path / "lm.jsonl", [{"text": "fine"}, {"body": "no text here"}])
    assert main(run_args(tiny_dirs, tiny_data, tmp_path / "bad", "minillm.lm_coef=0.5", f"minillm.lm_data={lm}")) == 2
    assert f"{lm}:2: an lm_data row needs a 'text' field" in capsys.readouterr().err


def test_logged_reward_is_the_exact_expected_reward_under_the_student(bpe_tok, pair):
    """The rollout reward is mean over response positions of E_q[log p - log q] = -KL(q || p), computed
    from the full distributions at each sampled prefix, not the mean of log p - log q over tokens
    drawn from the teacher mixture (biased towards tokens the teacher likes)."""
    from kdflow.methods.minillm import rollout_statistics

    student, teacher = pair
    prompts = prompts_batch(bpe_tok)
    V = len(bpe_tok)
    ro = sample(student, teacher, bpe_tok, prompts, mix_alpha=0.5, stop_at_eos=False, max_new_tokens=8, seed=4)
    kls = []
    for i, p in enumerate(prompts):
        y = ro.response_ids[i].tolist()
        s = F.log_softmax(row_logits(student, p + y, V), -1)[len(p) - 1:-1]
        t = F.log_softmax(row_logits(teacher, p + y, V), -1)[len(p) - 1:-1]
        kls += (s.exp() * (s - t)).sum(-1).tolist()
    exact = -sum(kls) / len(kls)
    sampled = float((ro.teacher_logp - ro.student_logp)[ro.response_mask].mean())
    assert abs(sampled - exact) > 1e-3  # the biased estimate really differs here
    assert rollout_statistics(ro, bpe_tok.eos_token_id)["reward"] == pytest.approx(exact, abs=1e-4)


def test_rollouts_use_the_current_cache_argument(bpe_tok, pair):
    """No `past_key_values` deprecation warning from transformers 5 (the KV cache is passed as `cache`)."""
    import warnings

    student, teacher = pair
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ro = sample(student, teacher, bpe_tok, prompts_batch(bpe_tok), stop_at_eos=False, max_new_tokens=3)
    assert ro.response_ids.shape[1] == 3
