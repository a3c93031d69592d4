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


# ----------------------------------------------------------------------------------------------
# Sparse (top-k) teachers and the fused, chunked head losses

from kdflow.losses import (DenseTeacher, HeadLossSpec, TopKTargets, check_sparse_divergence, head_losses,
                           sparse_pair, topk_kd_sum)


def topk_of(t_logits, k, temperature=1.0):
    lp = F.log_softmax(t_logits / temperature, -1)
    top = lp.topk(k, -1)
    return TopKTargets(top.indices, top.values)


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_topk_with_the_whole_vocabulary_equals_the_dense_loss(name, mode):
    # seed 0 gives a teacher whose k = V log-probs sum to slightly less than 1 in float32: the
    # rounding residue must not become tail mass (it made forward KL infinite)
    torch.manual_seed(0)
    t, s = torch.randn(6, 19) * 2, torch.randn(6, 19) * 2
    fn = get_divergence(name)
    dense, _ = kd_sum(s, t, fn, 2.0)
    sparse, n = topk_kd_sum(s, topk_of(t, 19, 2.0), fn, 2.0, mode)
    assert n == 6 and torch.allclose(dense, sparse, atol=1e-4, rtol=1e-4)


def naive_sparse(name, t_logits, s_logits, k, mode):
    """k + 1 buckets built by hand in float64 from full softmaxes."""
    out = []
    for tl, sl in zip(t_logits.double(), s_logits.double()):
        p, q = torch.softmax(tl, -1), torch.softmax(sl, -1)
        ids = p.topk(k).indices
        pk, qk = p[ids], q[ids]
        if mode == "renorm":
            pk = pk / pk.sum()
            P = torch.cat([pk, torch.zeros(1, dtype=torch.float64)])
        else:
            P = torch.cat([pk, (1 - pk.sum()).reshape(1)])
        Q = torch.cat([qk, (1 - qk.sum()).reshape(1)])
        out.append(float(get_divergence(name)(torch.log(P).unsqueeze(0), torch.log(Q).unsqueeze(0))))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_topk_losses_against_a_hand_built_bucket_reference(name, mode):
    if name == "rkl" and mode == "renorm":
        with pytest.raises(ValueError, match="infinite"):
            check_sparse_divergence(name, mode)
        return
    t, s = torch.randn(5, 30) * 2, torch.randn(5, 30) * 2
    targets = topk_of(t, 7)
    ts, ss = sparse_pair(F.log_softmax(s, -1), targets, mode)
    got = get_divergence(name)(ts, ss)
    assert torch.allclose(got.double(), naive_sparse(name, t, s, 7, mode), atol=1e-5, rtol=1e-4)


def test_empty_slots_and_invalid_rows_contribute_nothing():
    t, s = torch.randn(4, 12), torch.randn(4, 12)
    full = topk_of(t, 5)
    ids, lp = full.ids.clone(), full.logp.clone()
    ids[:, 3:] = -1  # only 3 real slots
    padded = TopKTargets(ids, lp.masked_fill(ids < 0, 0.0))
    three = topk_of(t, 3)
    a, _ = topk_kd_sum(s, padded, get_divergence("fkl"), 1.0, "tail")
    b, _ = topk_kd_sum(s, three, get_divergence("fkl"), 1.0, "tail")
    assert torch.allclose(a, b, atol=1e-6)
    masked = TopKTargets(three.ids, three.logp, valid=torch.tensor([True, False, True, False]))
    c, n = topk_kd_sum(s, masked, get_divergence("fkl"), 1.0, "tail")
    d0, _ = topk_kd_sum(s[[0]], three.rows(torch.tensor([0])), get_divergence("fkl"), 1.0, "tail")
    d2, _ = topk_kd_sum(s[[2]], three.rows(torch.tensor([2])), get_divergence("fkl"), 1.0, "tail")
    assert n == 2 and torch.allclose(c, d0 + d2)


def _head_setup(n=23, h=8, v=40, kd_every=2):
    torch.manual_seed(5)
    head = torch.nn.Linear(h, v, bias=False)
    t_head = torch.nn.Linear(12, v + 3, bias=False)  # a teacher head padded to another size
    hidden = torch.randn(n, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[::5] = -100  # rows outside CE
    kd_rows = torch.arange(n) % kd_every == 0
    t_hidden = torch.randn(int(kd_rows.sum()), 12)
    return head, t_head, hidden, targets, kd_rows, t_hidden


@pytest.mark.parametrize("kind", ["soft", "hard"])
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_head_losses_chunked_equal_reference_values_and_gradients(kind, teacher_kind):
    head, t_head, hidden, targets, kd_rows, t_hidden = _head_setup()
    V = 40
    t_logits = t_head(t_hidden).detach()[:, :V]
    fn = get_divergence("jsd")
    # reference: plain full logits and the simple loss functions
    logits = head(hidden)
    in_ce = targets != -100
    ce_ref, _ = ce_sum(logits[in_ce], targets[in_ce])
    if teacher_kind == "dense":
        teacher = DenseTeacher(t_hidden, t_head)
        kd_ref = (kd_sum(logits[kd_rows], t_logits, fn, 2.0)[0] if kind == "soft"
                  else hard_token_sum(logits[kd_rows], t_logits)[0])
    else:
        teacher = topk_of(t_logits, 6, 2.0 if kind == "soft" else 1.0)
        kd_ref = (topk_kd_sum(logits[kd_rows], teacher, fn, 2.0, "tail")[0] if kind == "soft"
                  else F.cross_entropy(logits[kd_rows], teacher.ids[:, 0], reduction="sum"))
    (ce_ref + 0.3 * kd_ref).backward()
    g_ref = hidden.grad.clone()
    w_ref = head.weight.grad.clone()
    for chunk in (0, 4, 7):
        hidden.grad = None
        head.weight.grad = None
        spec = HeadLossSpec(kind=kind, divergence=fn, temperature=2.0, sparse_mode="tail", vocab_size=V, chunk_tokens=chunk)
        out = head_losses(hidden, head, targets, kd_rows, teacher, spec)
        assert out["ce"][1] == int(in_ce.sum()) and out["kd"][1] == int(kd_rows.sum())
        assert torch.allclose(out["ce"][0], ce_ref, atol=1e-4) and torch.allclose(out["kd"][0], kd_ref, atol=1e-4)
        (out["ce"][0] + 0.3 * out["kd"][0]).backward()
        assert torch.allclose(hidden.grad, g_ref, atol=1e-5), chunk
        assert torch.allclose(head.weight.grad, w_ref, atol=1e-5), chunk


@pytest.mark.parametrize("name", ["fkl", "skl", "jsd"])
def test_topk_covering_the_vocabulary_with_rounded_mass_stays_finite(name):
    """Top-k over the whole vocabulary whose probabilities sum to slightly under 1 (float rounding, or
    float16 storage): the derived tail bucket must not meet the student's exact zero outside mass."""
    t, s = torch.randn(5, 11, generator=torch.Generator().manual_seed(3)) * 3, torch.randn(5, 11) * 3
    lp = F.log_softmax(t, -1).topk(11, -1)
    targets = TopKTargets(lp.indices, lp.values - 1e-6)  # sum p = 1 - 1e-6
    fn = get_divergence(name)
    sparse, _ = topk_kd_sum(s, targets, fn, 1.0, "tail")
    dense, _ = kd_sum(s, t, fn, 1.0)
    assert torch.isfinite(sparse) and torch.allclose(sparse, dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [0, 5])
def test_ce_over_a_padded_head_is_the_same_for_sft_and_kd(chunk):
    """A student head larger than the tokenizer (padded rows with large logits): the CE of a CE-only
    run (sft) equals the CE term of a KD run, and both are the CE over the tokenizer's logits only."""
    head, t_head, hidden, targets, kd_rows, t_hidden = _head_setup()
    V = 40
    padded = torch.nn.Linear(8, V + 6, bias=False)
    with torch.no_grad():
        padded.weight[:V] = head.weight
        padded.weight[V:] = 4.0 * hidden.detach().mean(0)  # padded rows that would take real mass
    in_ce = targets != -100
    ref = F.cross_entropy(head(hidden)[in_ce], targets[in_ce], reduction="sum")
    sft = head_losses(hidden, padded, targets, kd_rows, None, HeadLossSpec(vocab_size=V, chunk_tokens=chunk))
    kd = head_losses(hidden, padded, targets, kd_rows, DenseTeacher(t_hidden, t_head),
                     HeadLossSpec(kind="soft", divergence=get_divergence("fkl"), vocab_size=V, chunk_tokens=chunk))
    assert torch.allclose(sft["ce"][0], ref, atol=1e-4) and torch.allclose(kd["ce"][0], ref, atol=1e-4)


def test_reverse_kl_is_infinite_against_targets_without_mass_outside_their_ids():
    """Why the config refuses rkl with renorm or onehot_next: against a one-hot row (tail mode included)
    or a renormalised top-k row, reverse KL is infinite; skew reverse KL with alpha > 0 is not."""
    s = torch.randn(3, 12)
    onehot = TopKTargets(torch.tensor([[4, -1], [0, -1], [7, -1]]), torch.tensor([[0.0, -math.inf]] * 3),
                         tail_logp=torch.full((3,), -math.inf))
    renorm = topk_of(torch.randn(3, 12), 3)
    for targets, mode in ((onehot, "tail"), (onehot, "renorm"), (renorm, "renorm")):
        assert torch.isinf(topk_kd_sum(s, targets, get_divergence("rkl"), 1.0, mode)[0])
        assert torch.isinf(topk_kd_sum(s, targets, get_divergence("srkl", skew_alpha=0.0), 1.0, mode)[0])
        assert torch.isfinite(topk_kd_sum(s, targets, get_divergence("srkl", skew_alpha=0.1), 1.0, mode)[0])
    assert torch.isfinite(topk_kd_sum(s, renorm, get_divergence("rkl"), 1.0, "tail")[0])
    with pytest.raises(ValueError, match="align.unpaired=onehot_next"):
        check_sparse_divergence("rkl", "tail", "onehot_next")
    check_sparse_divergence("rkl", "tail", "mask")
