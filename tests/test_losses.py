"""Divergences against naive references and invariants; the (sum, count) contract."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdflow.losses import (DIVERGENCES, ce_sum, generalized_jsd, get_divergence, hard_token_sum, kd_sum,
                           shifted_masks, skew_kl, skew_reverse_kl)

torch.manual_seed(0)


def naive(name: str, p_logits: torch.Tensor, q_logits: torch.Tensor, param: float = 0.5) -> torch.Tensor:
    """Straight from the formulas, in float64, one position at a time."""
    out = []
    for pl, ql in zip(p_logits.double(), q_logits.double()):
        p = torch.softmax(pl, -1).tolist()
        q = torch.softmax(ql, -1).tolist()
        kl = lambda a, b: sum(ai * math.log(ai / bi) for ai, bi in zip(a, b) if ai > 0)
        if name == "fkl":
            v = kl(p, q)
        elif name == "rkl":
            v = kl(q, p)
        elif name == "jsd":
            m = [param * pi + (1 - param) * qi for pi, qi in zip(p, q)]
            v = param * kl(p, m) + (1 - param) * kl(q, m)
        elif name == "skl":
            v = kl(p, [param * pi + (1 - param) * qi for pi, qi in zip(p, q)])
        elif name == "srkl":
            v = kl(q, [param * qi + (1 - param) * pi for pi, qi in zip(p, q)])
        elif name == "tv":
            v = 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
        out.append(v)
    return torch.tensor(out, dtype=torch.float64)


def logp(x: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(x.float(), -1)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_divergence_matches_naive_reference(name):
    t, s = torch.randn(7, 23) * 3, torch.randn(7, 23) * 3
    param = 0.3 if name == "jsd" else 0.1
    fn = get_divergence(name, jsd_beta=param, skew_alpha=param)
    got = fn(logp(t), logp(s))
    assert got.shape == (7,)
    assert torch.allclose(got.double(), naive(name, t, s, param), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_identical_distributions_give_zero_and_others_positive(name):
    x = torch.randn(5, 17) * 4
    fn = get_divergence(name)
    assert fn(logp(x), logp(x)).abs().max() < 1e-6
    assert (fn(logp(x), logp(torch.randn(5, 17))) > 0).all()


def test_generalized_jsd_tends_to_zero_at_endpoints_without_jump():
    t, s = logp(torch.randn(4, 11) * 2), logp(torch.randn(4, 11) * 2)
    assert generalized_jsd(t, s, 0.0).abs().max() < 1e-7
    assert generalized_jsd(t, s, 1.0).abs().max() < 1e-7
    # continuous: close to the endpoint the value is close to the endpoint's value, not a KL
    assert generalized_jsd(t, s, 1e-4).max() < 1e-3
    assert generalized_jsd(t, s, 1 - 1e-4).max() < 1e-3


def test_skew_divergences_at_their_limits():
    t, s = logp(torch.randn(4, 11)), logp(torch.randn(4, 11))
    assert torch.allclose(skew_kl(t, s, 0.0), DIVERGENCES["fkl"](t, s), atol=1e-6)
    assert torch.allclose(skew_reverse_kl(t, s, 0.0), DIVERGENCES["rkl"](t, s), atol=1e-6)
    assert skew_kl(t, s, 1.0).abs().max() < 1e-6


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_neg_inf_logits_give_no_nan(name):
    t = torch.randn(3, 9)
    t[:, :2] = -float("inf")  # a masked vocabulary slice: zero teacher probability
    s = torch.randn(3, 9)
    out = get_divergence(name)(logp(t), logp(s))
    assert not torch.isnan(out).any()
    if name == "rkl":  # KL(q||p) is truly infinite where p = 0 < q
        assert torch.isinf(out).all()
    else:
        assert torch.isfinite(out).all()


def test_kd_sum_applies_temperature_inside_and_tau_squared_outside():
    t, s = torch.randn(6, 13), torch.randn(6, 13)
    fkl = get_divergence("fkl")
    total, n = kd_sum(s, t, fkl, temperature=2.0)
    ref = fkl(logp(t / 2.0), logp(s / 2.0)).sum() * 4.0
    assert n == 6 and torch.allclose(total, ref)


def test_all_masked_gives_zero_not_nan_and_a_usable_gradient():
    s = torch.randn(0, 13, requires_grad=True)
    total, n = kd_sum(s, torch.randn(0, 13), get_divergence("fkl"), 2.0)
    assert n == 0 and float(total.detach()) == 0.0
    total.backward()
    c, m = ce_sum(torch.randn(0, 5, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert m == 0 and float(c.detach()) == 0.0


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_chunked_equals_unchunked_values_and_gradients(name):
    t = torch.randn(37, 29)
    s1 = torch.randn(37, 29, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    fn = get_divergence(name)
    a, _ = kd_sum(s1, t, fn, 1.5)
    b, _ = kd_sum(s2, t, fn, 1.5, chunk_tokens=8)
    a.backward()
    b.backward()
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


def test_padded_head_compares_only_tokenizer_vocabulary():
    t, s = torch.randn(5, 20), torch.randn(5, 20)
    fn = get_divergence("fkl")
    ref, _ = kd_sum(s, t, fn, 1.0)
    # heads padded to different sizes with arbitrary extra rows: same value once cut to 20
    t_pad = torch.cat([t, torch.randn(5, 12) * 5], -1)
    s_pad = torch.cat([s, torch.randn(5, 4) * 5], -1)
    got, _ = kd_sum(s_pad, t_pad, fn, 1.0, vocab_size=20)
    assert torch.allclose(ref, got)
    with pytest.raises(ValueError, match="vocab_size"):
        kd_sum(s_pad, t_pad, fn, 1.0)


def test_hard_token_is_ce_against_teacher_argmax():
    t, s = torch.randn(8, 10), torch.randn(8, 10)
    total, n = hard_token_sum(s, t)
    assert n == 8
    assert torch.allclose(total, F.cross_entropy(s, t.argmax(-1), reduction="sum"))


def test_sum_count_contract_is_invariant_to_splitting():
    """Summing (sum, count) over any split and dividing once equals the whole batch's mean."""
    t = torch.randn(30, 16)
    s = torch.randn(30, 16, requires_grad=True)
    fn = get_divergence("jsd")
    whole, n = kd_sum(s, t, fn, 2.0)
    (whole / n).backward()
    g_whole = s.grad.clone()
    s.grad = None
    parts = [(0, 3), (3, 20), (20, 30)]  # unequal micro-batches
    total = sum(kd_sum(s[a:b], t[a:b], fn, 2.0)[1] for a, b in parts)
    for a, b in parts:
        part, _ = kd_sum(s[a:b], t[a:b], fn, 2.0)
        (part / total).backward()
    assert torch.allclose(s.grad, g_whole, atol=1e-7)
    # per-micro-batch means (the bug) would give another gradient
    s.grad = None
    for a, b in parts:
        part, cnt = kd_sum(s[a:b], t[a:b], fn, 2.0)
        (part / cnt / len(parts)).backward()
    assert not torch.allclose(s.grad, g_whole, atol=1e-4)


def test_shifted_masks_response_and_all():
    labels = torch.tensor([[-100, -100, 5, 6, 2, -100], [-100, 7, 2, -100, -100, -100]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    ce, kd = shifted_masks(labels, attn, "response")
    assert ce.tolist() == [[False, True, True, True, False], [True, True, False, False, False]]
    assert torch.equal(ce, kd)
    _, kd_all = shifted_masks(labels, attn, "all")
    assert kd_all.tolist() == [[True, True, True, True, False], [True, True, False, False, False]]
