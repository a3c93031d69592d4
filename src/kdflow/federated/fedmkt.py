"""FedMKT: federated mutual knowledge transfer between a server LLM and client small models.

One round (methods.md §8), as plain steps. The in-process runner (`run_fedmkt`) composes them on
one machine; the Flower app calls the same steps on each side of the wire.

  client_local_step   1. train the client's LoRA on its private data (CE)
                      2. top-k log-probs + per-sample CE on the public set -> payload
  server_step         4. align each client's distributions into the server's vocabulary
                      5. DualMinCE (or another rule) chooses, per sample, whom to learn from
                      6. train the server's LoRA on lambda*CE + (1-lambda)*KD(selected)
                      7. the server's own top-k + CE on the public set -> broadcast payload
  client_update_step  9-11. align, select, train the client on lambda*CE + (1-lambda)*KD(selected)

Only LoRA adapters train; base weights stay frozen. Payloads are arrays (`payload.py`): top-k
ids and log-probs over the public set, and per-sample CE — never private text, ids or weights.
Each party keeps its optimizer across rounds (`fedmkt.reset_optimizer` restores the reference
code's fresh optimizer per phase).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdflow.config import AlignConfig, DataConfig, FedMKTConfig, ModelSpec, PartyConfig, TrainConfig
from kdflow.data import Rows
from kdflow.errors import ConfigError
from kdflow.federated import payload as wire
from kdflow.selection import OWN, SELECTIONS, SKIP, weighted
from kdflow.losses import HeadLossSpec, get_divergence, head_losses, shifted_masks
from kdflow.models import (apply_lora, build_student, freeze, input_device, load_model, load_tokenizer, place, run_device,
                           selected_hidden, to_device, tokenizer_fingerprint)
from kdflow.teacher_cache import batch_targets, topk_from_logits
from kdflow.loop import adamw, train_examples


# ----------------------------------------------------------------------------------------------
# Parties


@dataclass
class Party:
    name: str
    model: Any  # peft model: frozen base + trainable LoRA adapter
    tok: Any
    lr: float
    public: list[dict[str, Any]] = field(default_factory=list)  # the public set in this party's tokenization
    private: list[dict[str, Any]] = field(default_factory=list)
    optimizer: Any = None
    public_rows: Rows | None = None  # the shared public rows (text), for cross-tokenizer alignment
    _fingerprint: str | None = field(default=None, repr=False)
    _answer_chars: np.ndarray | None = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = tokenizer_fingerprint(self.tok)
        return self._fingerprint

    def positions(self) -> list[int]:
        """Answer positions per public sample: the rows of every payload about the public set."""
        return [sum(1 for t in e["labels"][1:] if t != -100) for e in self.public]


@dataclass
class Peer:
    """A party known only through its messages (the other side of a Flower link): what a receiver
    needs to read its payloads — its name, vocabulary size and tokenizer fingerprint."""

    name: str
    vocab_size: int
    fingerprint: str


def remote_party(name: str, tok: Any, public_rows: Rows, data_cfg: DataConfig) -> Party:
    """A party known through its tokenizer only (the other side of a Flower link, with another
    tokenizer): what carrying its payloads across tokenizers needs — its tokenization of the shared
    public set — and no model."""
    from kdflow.data import encode_rows

    party = Party(name, None, tok, 0.0)
    party.public = encode_rows(public_rows, tok, data_cfg)
    party.public_rows = public_rows
    return party


def _first_difference(a: Any, b: Any, prefix: str) -> str | None:
    """The first setting (dotted key: a vs b) where two nested dicts of settings differ."""
    for key in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            found = _first_difference(va, vb, f"{prefix}{key}.")
            if found:
                return found
        elif va != vb:
            return f"{prefix}{key}: {va!r} vs {vb!r}"
    return None


def check_config(cfg: FedMKTConfig, baselines: bool = True) -> None:
    """What can be refused from the settings alone, before any model loads.

    Averaging adapters (fedmkt.fedavg, the fedavg baseline) is only meaningful between copies of one
    model: the same base and the same LoRA layout. Clients that differ would average unrelated
    weights (or fail on shapes after every round has run), so they are refused here.
    """
    from kdflow.config import to_dict

    def spec(c: PartyConfig) -> dict[str, Any]:
        return {"model": to_dict(c.model), "prune_from": c.prune_from}

    for i, c in enumerate(cfg.clients):
        if c.adapt.method != "none":
            raise ConfigError(f"clients[{i}].adapt.method={c.adapt.method}: only the server is adapted before the rounds (on "
                              "the public set); a client's private training is its adaptation. Remove it")
    if cfg.server.adapt.method != "none" and cfg.server.model.init != "pretrained":
        raise ConfigError(f"server.adapt with server.model.init={cfg.server.model.init}: adaptation fine-tunes a pretrained "
                          "model; set server.adapt.method=none or give the server a pretrained model")
    for key, party in [("server", cfg.server)] + [(f"clients[{i}]", c) for i, c in enumerate(cfg.clients)]:
        if party.model.device not in ("auto", "cpu"):
            raise ConfigError(f"{key}.model.device={party.model.device}: a party's model trains on the process's device "
                              "(auto) or on the cpu; choose GPUs with CUDA_VISIBLE_DEVICES")
    first = cfg.clients[0] if cfg.clients else None
    for c in cfg.clients[1:]:
        diff = _first_difference(spec(first), spec(c), "")
        if diff is None:
            continue
        why = f"clients '{first.name}' and '{c.name}' differ in {diff}"
        if cfg.fedmkt.fedavg:
            raise ConfigError(f"fedmkt.fedavg=true averages the clients' adapters, which needs the same model and LoRA "
                              f"settings for every client, but {why}; set fedmkt.fedavg=false or give every client one model")
        if baselines and "fedavg" in cfg.baselines:
            raise ConfigError(f"baseline fedavg averages the clients' adapters, which needs the same model and LoRA "
                              f"settings for every client, but {why}; remove fedavg from baselines")


def load_base(spec: PartyConfig, cache: dict[str, Any], seed: int = 0, data: DataConfig | None = None,
              public_rows: Rows | None = None) -> tuple[Any, Any]:
    """(frozen base model, tokenizer) for a party; models to prune from are loaded once and shared.

    Random weights (model.init=config) are drawn from `seed`, so a party builds the same base
    whether it is built alone (a Flower client) or beside the others (the in-process runner). The
    base goes to the party's device (model.device), where its adapter is added and trained. A server
    with `adapt` starts from its base fine-tuned on `public_rows` (`adapted_base`).
    """
    m = adapted_base(spec, data, public_rows)
    role = f"party {spec.name}"
    if m.init == "pretrained":
        device = run_device(m, f"{role} model")
        return place(freeze(load_model(m, device)), role=role, device=device), load_tokenizer(m)
    if not spec.prune_from:
        raise ConfigError(f"party '{spec.name}': model.init={m.init} needs prune_from (the model to take layers/config from)")
    src = ModelSpec(name=spec.prune_from, dtype=m.dtype)
    if spec.prune_from not in cache:
        cache[spec.prune_from] = (load_model(src), load_tokenizer(src))
    base, tok = cache[spec.prune_from]
    torch.manual_seed(seed)
    return place(freeze(build_student(m, base, src)), m, role), tok


def adapted_base(spec: PartyConfig, data: DataConfig | None, public_rows: Rows | None) -> Any:
    """The party's model spec, or (`adapt`, the server only) the same spec naming its base model
    fine-tuned on the public set, trained once by `kdflow.teachers.prepare_teacher` and reused (the
    folder is keyed by the model, the public rows, the data settings and `adapt`)."""
    import dataclasses

    from kdflow.config import TeacherSpec
    from kdflow.teachers import prepare_teacher

    m = spec.model
    if spec.adapt.method == "none":
        return m
    if data is None or public_rows is None:
        raise ConfigError(f"party '{spec.name}': adapt needs the public rows (only the server adapts, on the public set)")
    base = TeacherSpec(**{f.name: getattr(m, f.name) for f in dataclasses.fields(ModelSpec)}, adapt=spec.adapt)
    adapted = prepare_teacher(base, data, public_rows)
    print(f"[kdflow] party {spec.name}: base model adapted on the {len(public_rows)} public rows: {adapted.name}")
    return dataclasses.replace(m, name=adapted.name, gguf_file=None, revision=None)


def make_party(spec: PartyConfig, base: Any, tok: Any, seed: int) -> Party:
    if not spec.model.lora.enabled:
        raise ConfigError(f"party '{spec.name}': FedMKT trains LoRA adapters only; set model.lora.enabled=true")
    torch.manual_seed(seed)
    model = apply_lora(copy.deepcopy(base), spec.model.lora)
    model.eval()
    return Party(spec.name, model, tok, spec.learning_rate)


def make_optimizer(party: Party, train: TrainConfig) -> Any:
    params = [p for p in party.model.parameters() if p.requires_grad]
    return adamw(params, lr=party.lr, betas=(train.adam_beta1, train.adam_beta2), weight_decay=train.weight_decay)


def optimizer_for(party: Party, train: TrainConfig, reset: bool) -> Any:
    if party.optimizer is None or reset:
        party.optimizer = make_optimizer(party, train)
    return party.optimizer


# ----------------------------------------------------------------------------------------------
# What a party says about the public set


@torch.no_grad()
def public_outputs(party: Party, k: int, temperature: float, batch_size: int = 16) -> wire.PublicOutputs:
    """Top-k log-probs at every answer position of the public set, and each sample's mean answer CE."""
    from kdflow.data import collate

    party.model.eval()
    ids, lps, tails, ces = [], [], [], []
    V = party.vocab_size
    for s in range(0, len(party.public), batch_size):
        batch = collate(party.public[s:s + batch_size], party.tok.pad_token_id)
        ce_mask, _ = shifted_masks(batch["labels"], batch["attention_mask"])
        hidden, head = selected_hidden(party.model, batch["input_ids"], batch["attention_mask"], ce_mask)
        logits = head(hidden).float()[..., :V]
        per_pos = F.cross_entropy(logits, batch["labels"][:, 1:][ce_mask].to(logits.device), reduction="none").cpu()
        start = 0
        for n in ce_mask.sum(-1).tolist():
            ces.append(float(per_pos[start:start + n].mean()) if n else 0.0)
            start += n
        # computed where the model runs; only the k columns come back to build the payload
        i, lp, tail = (x.cpu() for x in topk_from_logits(logits, k, temperature))
        ids.append(i.numpy())
        lps.append(lp.numpy())
        tails.append(tail.numpy())
    counts = party.positions()
    return wire.PublicOutputs(np.concatenate(ids), np.concatenate(lps), np.concatenate(tails),
                              np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), np.array(ces, dtype=np.float32))


def send(out: wire.PublicOutputs, sender: Party, receiver_expects: list[int], k: int,
         divergence: str = "fkl", logp_format: str = "float16") -> tuple[wire.PublicOutputs, int]:
    """Encode, count the bytes, and decode with the receiver's checks: the in-process runner uses the
    same wire format (and the same validation) as the Flower app."""
    arrays = wire.encode(out, sender.vocab_size, logp_format)
    decoded = wire.decode(arrays, sender=sender.name, vocab_size=sender.vocab_size, k=k, positions=receiver_expects,
                          finite_support=divergence == "rkl", logp_format=logp_format)
    return decoded, wire.nbytes(arrays)


# ----------------------------------------------------------------------------------------------
# Sender distributions in the receiver's positions and vocabulary


class Bridges:
    """Cross-tokenizer alignment between parties, built once per (sender, receiver) tokenizer pair."""

    def __init__(self, data_cfg: DataConfig, align_cfg: AlignConfig):
        self.data_cfg, self.align_cfg = data_cfg, align_cfg
        self._pairs: dict[tuple[str, str], Any] = {}

    def get(self, sender: Party, receiver: Party) -> Any:
        from kdflow.align.targets import CrossTokenizer

        key = (sender.fingerprint, receiver.fingerprint)
        if key not in self._pairs:
            self._pairs[key] = CrossTokenizer(sender.tok, receiver.tok, self.data_cfg, self.align_cfg)
        return self._pairs[key]


def _check_cross(sender: Party | Peer, receiver: Party, bridges: Bridges | None) -> None:
    """Parties with different tokenizers: what carrying knowledge between them needs."""
    if isinstance(sender, Peer):
        raise ConfigError(f"parties '{sender.name}' and '{receiver.name}' use different tokenizers, and '{sender.name}' is "
                          "known only by its messages: carrying its distributions needs its tokenizer (over Flower it is "
                          "exchanged once and the sender becomes a `remote_party`); in-process, run `kdflow fedmkt`")
    if bridges is None or receiver.public_rows is None or sender.public_rows is None:
        raise ConfigError(f"parties '{sender.name}' and '{receiver.name}' use different tokenizers: pass the public rows "
                          "and alignment settings (kdflow.align) to carry distributions between them")


def answer_chars(party: Party, data_cfg: DataConfig) -> np.ndarray:
    """Per public sample, the characters of the answer that the party's answer positions cover (at
    least 1): the answer's length, or for an answer cut at data.max_length, up to the end of its last
    kept token (in proportion to the kept tokens when the tokenizer gives no character offsets)."""
    if party._answer_chars is None:
        from kdflow.data import Encoder, row_turns
        from kdflow.errors import AlignmentError

        enc, chars = Encoder(party.tok, data_cfg), []
        rows = party.public_rows
        for row, where, ex in zip(rows.items, rows.locations, party.public):
            turns = row_turns(row, where, data_cfg)
            n, kept = len(turns.response), len(ex["input_ids"]) - ex["prompt_len"]
            full = len(enc.response_ids(turns))
            if kept < full:
                try:
                    spans = enc.response_encoding(turns, spans=True).spans
                    n = min(n, spans[kept - 1][1]) if kept else 0
                except AlignmentError:
                    n = n * kept // full
            chars.append(max(n, 1))
        party._answer_chars = np.asarray(chars, dtype=np.float64)
    return party._answer_chars


def selection_scores(receiver: Party, receiver_out: wire.PublicOutputs, senders: list[Party | Peer],
                     sender_outs: list[wire.PublicOutputs], bridges: Bridges | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample answer NLL of the receiver [N] and of every sender [K, N], in one unit, for selection.

    Within one tokenizer it is the payload's `ce`, the mean over answer tokens. Across tokenizers the
    same answer is a different number of tokens for each party (11, 13 or 15), so per-token means are
    not comparable: every party's NLL is then summed over its answer tokens (ce x its positions) and
    divided by the answer characters those tokens cover (methods.md §8). The wire keeps the per-token
    mean either way; the receiver converts.
    """
    if all(s.fingerprint == receiver.fingerprint for s in senders):
        return receiver_out.ce, np.stack([o.ce for o in sender_outs])
    for s in senders:
        if s.fingerprint != receiver.fingerprint:
            _check_cross(s, receiver, bridges)

    def per_char(party: Party | Peer, out: wire.PublicOutputs) -> np.ndarray:
        # A sender with the receiver's tokenizer covers the characters the receiver's tokens do (the
        # same tokenization of the same public set): a Peer known only by its messages needs no more.
        party = receiver if party.fingerprint == receiver.fingerprint else party
        if party.public_rows is None:
            raise ConfigError(f"party '{party.name}': pass the public rows to compare answer NLL across tokenizers")
        nll = out.ce.astype(np.float64) * np.diff(out.offsets)
        return (nll / answer_chars(party, bridges.data_cfg)).astype(np.float32)

    return per_char(receiver, receiver_out), np.stack([per_char(s, o) for s, o in zip(senders, sender_outs)])


def transfer(out: wire.PublicOutputs, sender: Party | Peer, receiver: Party, n: int, bridges: Bridges | None = None) -> dict[str, torch.Tensor]:
    """Sample n's top-k rows of `sender`, carried to `receiver`'s answer positions and vocabulary.

    Same tokenizer: the rows are the receiver's rows. Otherwise each receiver answer position takes
    the sender position whose next token begins at the same character (kdflow.align), the sender's
    ids go through the MinED map with duplicate ids' probabilities added, and unpaired positions
    leave the KD term (or get a one-hot on their own next token, align.unpaired=onehot_next).
    """
    ids, lp, tail = out.sample(n)
    if sender.fingerprint == receiver.fingerprint:
        return {"ids": torch.from_numpy(ids), "logp": torch.from_numpy(lp),
                "tail_logp": torch.from_numpy(tail), "valid": torch.ones(len(ids), dtype=torch.bool)}
    _check_cross(sender, receiver, bridges)
    from kdflow.data import row_turns

    rows = receiver.public_rows
    turns = row_turns(rows.items[n], rows.locations[n], bridges.data_cfg)
    t = bridges.get(sender, receiver).carry_rows(turns, receiver.public[n], sender.public[n], torch.from_numpy(ids),
                                                 torch.from_numpy(lp), torch.from_numpy(tail))
    return {"ids": t.ids, "logp": t.logp, "tail_logp": t.tail_logp, "valid": t.valid}


def _merge(parts: list[tuple[dict[str, torch.Tensor], float]], k: int) -> dict[str, torch.Tensor]:
    """A weighted mixture of top-k distributions over the same rows, kept to its k largest ids."""
    rows = parts[0][0]["ids"].shape[0]
    out_ids, out_lp = torch.full((rows, k), -1, dtype=torch.long), torch.full((rows, k), -float("inf"))
    tails = torch.stack([w * p["tail_logp"].exp() for p, w in parts]).sum(0)
    for r in range(rows):
        mass: dict[int, float] = {}
        for p, w in parts:
            for i, v in zip(p["ids"][r].tolist(), p["logp"][r].exp().tolist()):
                if i >= 0:
                    mass[i] = mass.get(i, 0.0) + w * v
        top = sorted(mass.items(), key=lambda kv: -kv[1])[:k]
        dropped = sum(mass.values()) - sum(v for _, v in top)
        tails[r] += dropped
        for j, (i, v) in enumerate(top):
            out_ids[r, j], out_lp[r, j] = i, float(np.log(max(v, 1e-45)))
    valid = torch.stack([p["valid"] for p, _ in parts]).all(0)
    return {"ids": out_ids, "logp": out_lp, "tail_logp": torch.log(tails.clamp(min=1e-45)), "valid": valid}


def select_targets(receiver: Party, receiver_out: wire.PublicOutputs, senders: list[Party | Peer],
                   sender_outs: list[wire.PublicOutputs], rule: str, k: int,
                   bridges: Bridges | None = None) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per public sample, the KD target the receiver learns from (as `teacher_*` example fields).

    `teacher_valid` marks the rows in the KD term, `teacher_counted` the rows in its denominator
    (methods.md §0): a sample the rule leaves out keeps the rows the sender it was compared with would
    cover, so the KD term's per-token weight does not grow when fewer samples are selected; a row no
    alignment pairs leaves both.
    """
    receiver_ce, sender_ce = selection_scores(receiver, receiver_out, senders, sender_outs, bridges)
    best = sender_ce.argmin(0)
    examples, counts = [], {"skipped": 0, "own": 0, **{s.name: 0 for s in senders}}
    if rule == "weighted":
        mix, sample_w = weighted(receiver_ce, sender_ce)
    else:
        choice = SELECTIONS[rule](receiver_ce, sender_ce)
    for n, ex in enumerate(receiver.public):
        if rule == "weighted":
            t = _merge([(transfer(o, s, receiver, n, bridges), float(mix[j, n]))
                        for j, (s, o) in enumerate(zip(senders, sender_outs))], k)
            t["weight"] = torch.full((t["ids"].shape[0],), float(sample_w[n]))
            counts[senders[int(mix[:, n].argmax())].name] += 1
        elif choice[n] == SKIP:
            j = int(best[n])
            t = transfer(sender_outs[j], senders[j], receiver, n, bridges)
            t["counted"], t["valid"] = t["valid"], torch.zeros_like(t["valid"])
            counts["skipped"] += 1
        elif choice[n] == OWN:
            ids, lp, tail = receiver_out.sample(n)
            t = {"ids": torch.from_numpy(ids), "logp": torch.from_numpy(lp), "tail_logp": torch.from_numpy(tail),
                 "valid": torch.ones(len(ids), dtype=torch.bool)}
            counts["own"] += 1
        else:
            j = int(choice[n])
            t = transfer(sender_outs[j], senders[j], receiver, n, bridges)
            counts[senders[j].name] += 1
        t.setdefault("counted", t["valid"])
        examples.append({**ex, **{f"teacher_{key}": v for key, v in t.items()}})
    total = max(len(receiver.public), 1)
    return examples, {key: v / total for key, v in counts.items()}


# ----------------------------------------------------------------------------------------------
# Training phases


def train_baseline(party: Party, examples: list[dict[str, Any]], cfg: FedMKTConfig, role: str) -> list[dict[str, float]]:
    """A CE-only baseline (standalone, private_public, public_only, centralized): the epochs the party
    trains in the whole FedMKT run (rounds x server_epochs for the server's role, rounds x
    private_epochs for a client's), under a seed apart from the rounds' (cfg.seed + 7). The in-process
    simulation and the Flower server and clients all call this, so their baselines are the same runs."""
    if role not in ("server", "client"):
        raise ValueError(f"train_baseline: role must be 'server' or 'client', not {role!r}")
    f = cfg.fedmkt
    epochs = f.rounds * (f.server_epochs if role == "server" else f.private_epochs)
    return train_phase(party, examples, cfg, epochs, False, seed=cfg.seed + 7)


def train_phase(party: Party, examples: list[dict[str, Any]], cfg: FedMKTConfig, epochs: int, with_kd: bool,
                seed: int) -> list[dict[str, float]]:
    """Train the party's adapter: CE only, or ce_weight*CE + (1 - ce_weight)*KD(selected targets)."""
    f = cfg.fedmkt
    spec = HeadLossSpec(kind="soft" if with_kd else "none", divergence=get_divergence(f.divergence),
                        temperature=f.temperature, sparse_mode=f.sparse_mode, vocab_size=party.vocab_size)

    def count_tokens(batch: dict[str, Any]) -> dict[str, int]:
        ce_mask, _ = shifted_masks(batch["labels"], batch["attention_mask"])
        counts = {"ce": int(ce_mask.sum())}
        if with_kd:
            counts["kd"] = int(sum(int(v.sum()) for v in batch["teacher_counted"]))
        return counts

    def loss_sums(model: Any, batch: dict[str, Any]) -> dict[str, tuple[torch.Tensor, int]]:
        batch = to_device(batch, input_device(model))  # the party's model may sit on a GPU (load_base)
        ce_mask, _ = shifted_masks(batch["labels"], batch["attention_mask"])
        hidden, head = selected_hidden(model, batch["input_ids"], batch["attention_mask"], ce_mask)
        targets = batch["labels"][:, 1:][ce_mask]
        teacher = batch_targets(batch) if with_kd else None
        return head_losses(hidden, head, targets, torch.ones_like(targets, dtype=torch.bool), teacher, spec)

    weights = {"ce": f.ce_weight, "kd": 1.0 - f.ce_weight} if with_kd else {"ce": 1.0}
    # LoRA dropout draws from torch's global generator: seeding it here makes each phase a function
    # of (adapter, optimizer, data, seed) alone, so a Flower client that runs each phase in a fresh
    # process reproduces the in-process runner.
    torch.manual_seed(seed)
    return train_examples(party.model, optimizer_for(party, cfg.train, f.reset_optimizer), examples,
                          pad_id=party.tok.pad_token_id, batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
                          epochs=epochs, seed=seed, loss_sums=loss_sums, count_tokens=count_tokens, term_weights=weights,
                          bf16=cfg.train.bf16, max_grad_norm=cfg.train.max_grad_norm)


def client_local_step(client: Party, cfg: FedMKTConfig, round_idx: int) -> tuple[wire.PublicOutputs, list[dict]]:
    """Steps 1-2 on a client: private training, then its top-k + CE on the public set."""
    logs = train_phase(client, client.private, cfg, cfg.fedmkt.private_epochs, False, seed=cfg.seed + 1000 * round_idx)
    return public_outputs(client, cfg.fedmkt.top_k, cfg.fedmkt.temperature, cfg.eval.batch_size), logs


def server_step(server: Party, server_out: wire.PublicOutputs, clients: list[Party | Peer], client_outs: list[wire.PublicOutputs],
                cfg: FedMKTConfig, round_idx: int, train_server: bool = True,
                bridges: Bridges | None = None) -> tuple[wire.PublicOutputs, dict[str, Any]]:
    """Steps 4-7: align and select the clients' knowledge, train the server, recompute its outputs."""
    info: dict[str, Any] = {}
    if train_server:
        examples, info["selected"] = select_targets(server, server_out, clients, client_outs, cfg.fedmkt.selection,
                                                    cfg.fedmkt.top_k, bridges)
        info["logs"] = train_phase(server, examples, cfg, cfg.fedmkt.server_epochs, True, seed=cfg.seed + 1000 * round_idx + 1)
        server_out = public_outputs(server, cfg.fedmkt.top_k, cfg.fedmkt.temperature, cfg.eval.batch_size)
    return server_out, info


def client_update_step(client: Party, client_out: wire.PublicOutputs, server: Party | Peer, server_out: wire.PublicOutputs,
                       cfg: FedMKTConfig, round_idx: int, bridges: Bridges | None = None) -> dict[str, Any]:
    """Steps 9-11 on a client: align the server's distributions, select, train on the public set."""
    examples, selected = select_targets(client, client_out, [server], [server_out], cfg.fedmkt.selection,
                                        cfg.fedmkt.top_k, bridges)
    logs = train_phase(client, examples, cfg, cfg.fedmkt.public_epochs, True, seed=cfg.seed + 1000 * round_idx + 2)
    return {"selected": selected, "logs": logs}


def average_adapters(states: list[dict[str, torch.Tensor]], sizes: list[int]) -> dict[str, torch.Tensor]:
    """FedAvg of adapter state dicts, weighted by private data size."""
    if not states or any(set(s) != set(states[0]) for s in states):
        raise ConfigError("fedavg needs adapters with the same parameters (homogeneous clients)")
    w = torch.tensor(sizes, dtype=torch.float32)
    w = w / w.sum()
    return {k: sum(wi * s[k].float() for wi, s in zip(w.tolist(), states)).to(states[0][k].dtype) for k in states[0]}


def fedavg(clients: list[Party]) -> None:
    """Average the clients' adapters, weighted by private data size (homogeneous clients only)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    avg = average_adapters([get_peft_model_state_dict(c.model) for c in clients], [len(c.private) for c in clients])
    for c in clients:
        set_peft_model_state_dict(c.model, avg)


# ----------------------------------------------------------------------------------------------
# The final models: folders every verb loads


def base_location(spec: PartyConfig, data: DataConfig | None = None, public_rows: Rows | None = None) -> str | None:
    """Where a party's base model lives (a local folder or Hub id; a bundled or GGUF model's converted
    folder; an adapted server's adapted folder), or None when it exists only in memory (pruned or
    built from a config), so that an adapter alone could not be loaded onto it."""
    from kdflow.models import _load_location

    m = adapted_base(spec, data, public_rows)
    return _load_location(m)[0] if m.init == "pretrained" else None


def save_final(party: Party, base: str | None, folder: Path, merged: bool) -> dict[str, str]:
    """The party's final model in `folder`: `adapter/` (peft's adapter_model.safetensors and
    adapter_config.json, naming its base, plus the tokenizer) that PeftModel, `kdflow eval
    lora_adapter=` and `kdflow distill teacher.lora_adapter=` load onto the base; `base/` beside it
    when the base exists only in memory (pruned or config-built parties); and, with `merged`,
    `merged/`: the LoRA merged into a plain model folder. Returns folder kind -> path."""
    from kdflow.models import save_model
    from kdflow.report import atomic_folder, write_json

    cfg_peft = party.model.peft_config["default"]
    with atomic_folder(folder) as tmp:
        if base is None:
            save_model(copy.deepcopy(party.model).unload(), party.tok, tmp / "base")
            base = str(folder / "base")
        old, cfg_peft.base_model_name_or_path = cfg_peft.base_model_name_or_path, base
        try:
            party.model.save_pretrained(tmp / "adapter")
        finally:
            cfg_peft.base_model_name_or_path = old
        party.tok.save_pretrained(tmp / "adapter")
        if merged:
            save_model(party.model, party.tok, tmp / "merged")
        written = {"base": base, "adapter": str(folder / "adapter"), **({"merged": str(folder / "merged")} if merged else {})}
        write_json(tmp / "final.json", {"party": party.name, **written})
    return written


def final_commands(name: str, written: dict[str, str]) -> list[str]:
    """How to use a final model (for the report)."""
    lines = [f"`kdflow eval model.name={written['base']} lora_adapter={written['adapter']}`"]
    if "merged" in written:
        lines.append(f"`kdflow eval model.name={written['merged']}`")
    return lines


# ----------------------------------------------------------------------------------------------
# A party's trainable state on disk (round checkpoints; a Flower client between messages)


def save_party_state(party: Party, folder: Path) -> None:
    """Adapter (safetensors) and optimizer state (torch.save of tensors and numbers only) into `folder`."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(party.model).items()},
              str(folder / f"{party.name}.adapter.safetensors"))
    if party.optimizer is not None:
        torch.save(party.optimizer.state_dict(), folder / f"{party.name}.optimizer.pt")


def load_party_state(party: Party, folder: Path, train: TrainConfig) -> None:
    """The inverse of `save_party_state`; the optimizer file is read with weights_only=True (no pickled code)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(party.model, load_file(str(folder / f"{party.name}.adapter.safetensors")))
    opt_path = folder / f"{party.name}.optimizer.pt"
    if opt_path.is_file():
        party.optimizer = make_optimizer(party, train)
        party.optimizer.load_state_dict(torch.load(opt_path, weights_only=True))
