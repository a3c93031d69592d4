"""A teacher behind an HTTP server: the client (teacher.server) and `kdflow serve-teacher`.

The wire format is the subset of vLLM's OpenAI-compatible completions API that returns a model's
next-token log-probs over given token sequences (vLLM docs: CompletionRequest / CompletionResponseChoice):

    POST /v1/completions  {"model": M, "prompt": [[id, ...], ...], "max_tokens": 1, "prompt_logprobs": k,
                           "return_token_ids": true, "add_special_tokens": false}
    -> {"choices": [{"index": i, "prompt_token_ids": [...],
                     "prompt_logprobs": [null, {"<id>": {"logprob": x, "rank": r, ...}, ...}, ...]}, ...]}

Entry j of prompt_logprobs (j >= 1) is the distribution of token j given tokens < j: its top k
(vLLM caps k at the server's --max-logprobs, 20 by default) plus the token actually there. A
training position i (predicting token i + 1) is entry i + 1. These log-probs are at temperature 1.

Every answer is validated before use: one choice per prompt, the prompt tokens echoed back equal to
those sent, one entry per position, ids inside the vocabulary, finite log-probs <= 0, the actual
token present, at least k ids. A request that times out, fails, or answers something invalid is
retried with exponential backoff; after `retries` retries the run stops with one line naming the
server and what went wrong. Only JSON is read from the network: nothing is unpickled or executed.

`kdflow serve-teacher` answers the same subset from a local transformers teacher (http.server, one
request at a time, bounded request size and k) for users without vLLM and for the tests.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kdflow.errors import KDFlowError

MAX_ANSWER_BYTES = 512 * 2**20


class TeacherServerError(KDFlowError):
    """The teacher server could not give valid log-probs (after the retries)."""


class _Invalid(Exception):
    """One answer that cannot be used; retried, then reported."""

    final = False  # the server refused the request itself (HTTP 4xx): asking again gets the same answer


@dataclass
class PromptTopK:
    """The teacher's top-k at positions 0 .. L-2 of one sequence of length L (position i predicts token i + 1)."""

    ids: Any  # [L-1, k] int64
    logp: Any  # [L-1, k] float32, at temperature 1, descending


class TeacherClient:
    """Top-k next-token log-probs of token sequences from an OpenAI-compatible completions server."""

    def __init__(self, url: str, model: str | None, vocab_size: int, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 1.0, concurrency: int = 2, batch_size: int = 8):
        self.url = url.rstrip("/")
        self.model = model
        self.vocab_size = vocab_size
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.concurrency, self.batch_size = max(1, concurrency), max(1, batch_size)
        self.requests = 0
        self.retried = 0

    @classmethod
    def from_spec(cls, spec: Any, vocab_size: int) -> "TeacherClient":
        s = spec.server
        return cls(s.url, s.model, vocab_size, s.timeout, s.retries, s.backoff, s.concurrency, s.batch_size)

    # -- transport
    def _post(self, path: str, body: dict[str, Any]) -> Any:
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read(MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as e:
            detail = e.read(300).decode("utf-8", "replace").strip().replace("\n", " ")
            err = _Invalid(f"HTTP {e.code}{': ' + detail if detail else ''}")
            err.final = 400 <= e.code < 500 and e.code not in (408, 429)
            raise err from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                raise _Invalid(f"no answer within teacher.server.timeout={self.timeout:g} s") from None
            raise _Invalid(f"cannot connect ({reason})") from None
        if len(raw) > MAX_ANSWER_BYTES:
            raise _Invalid(f"answer larger than {MAX_ANSWER_BYTES // 2**20} MiB")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _Invalid(f"the answer is not JSON ({e.msg if hasattr(e, 'msg') else e})") from None

    def _with_retries(self, what: str, fn: Any) -> Any:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                self.requests += 1
                return fn()
            except _Invalid as e:
                last = str(e)
                if e.final:
                    raise TeacherServerError(f"teacher.server {self.url}: {what} refused: {last}") from None
        raise TeacherServerError(f"teacher.server {self.url}: {what} failed after {self.retries + 1} attempts: {last} "
                                 f"(check that the server runs and serves teacher.name's model; teacher.server.retries "
                                 f"and teacher.server.timeout set the patience)")

    # -- the log-probs
    def prompt_topk(self, seqs: list[list[int]], k: int) -> list[PromptTopK]:
        """The top-k at every position of each sequence, in order; requests run `concurrency` at a time."""
        chunks = [seqs[s:s + self.batch_size] for s in range(0, len(seqs), self.batch_size)]
        if self.concurrency == 1 or len(chunks) == 1:
            parts = [self._chunk(c, k) for c in chunks]
        else:
            with ThreadPoolExecutor(self.concurrency) as pool:
                parts = list(pool.map(lambda c: self._chunk(c, k), chunks))
        return [x for part in parts for x in part]

    def _chunk(self, seqs: list[list[int]], k: int) -> list[PromptTopK]:
        body = {"prompt": seqs, "max_tokens": 1, "prompt_logprobs": k, "return_token_ids": True,
                "add_special_tokens": False, "temperature": 1.0}
        if self.model:
            body["model"] = self.model
        return self._with_retries(f"prompt log-probs of {len(seqs)} sequences",
                                  lambda: parse_prompt_logprobs(self._post("/v1/completions", body), seqs, k,
                                                                self.vocab_size))

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list[list[int]]:
        """Answers the served model writes after each prompt (token ids, EOS not included)."""
        out: list[list[int]] = []
        for s in range(0, len(prompts), self.batch_size):
            chunk = prompts[s:s + self.batch_size]
            body = {"prompt": chunk, "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                    "seed": seed + s, "return_token_ids": True, "add_special_tokens": False}
            if self.model:
                body["model"] = self.model
            out += self._with_retries(f"generation for {len(chunk)} prompts",
                                      lambda: parse_generations(self._post("/v1/completions", body), chunk,
                                                                self.vocab_size))
        return out


def _choices(answer: Any, n: int) -> list[dict[str, Any]]:
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
        raise _Invalid("the answer has no 'choices' list")
    choices = answer["choices"]
    if len(choices) != n:
        raise _Invalid(f"{len(choices)} choices for {n} prompts")
    by_index: dict[int, dict[str, Any]] = {}
    for c in choices:
        i = c.get("index") if isinstance(c, dict) else None
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n or i in by_index:
            raise _Invalid("the choices' 'index' fields are not 0..n-1")
        by_index[i] = c
    return [by_index[i] for i in range(n)]


def _echo_check(choice: dict[str, Any], sent: list[int], i: int) -> None:
    echoed = choice.get("prompt_token_ids")
    if echoed is None:
        raise _Invalid("the server did not echo the prompt tokens (prompt_token_ids; vLLM returns them with "
                       "return_token_ids, since 0.10.2)")
    if echoed != sent:
        raise _Invalid(f"prompt {i}: the tokens echoed back differ from those sent (the server re-tokenised or "
                       "added special tokens)")


def parse_prompt_logprobs(answer: Any, seqs: list[list[int]], k: int, vocab_size: int) -> list[PromptTopK]:
    """Validated top-k per position from a completions answer (see the module docstring)."""
    import torch

    out = []
    for i, (choice, sent) in enumerate(zip(_choices(answer, len(seqs)), seqs)):
        _echo_check(choice, sent, i)
        entries = choice.get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(sent):
            got = len(entries) if isinstance(entries, list) else "no"
            raise _Invalid(f"prompt {i}: {got} prompt_logprobs entries for {len(sent)} tokens")
        L = len(sent)
        kk = min(k, vocab_size)
        ids = torch.full((max(L - 1, 0), kk), -1, dtype=torch.long)
        logp = torch.full((max(L - 1, 0), kk), -math.inf, dtype=torch.float32)
        for j in range(1, L):
            entry = entries[j]
            if not isinstance(entry, dict):
                raise _Invalid(f"prompt {i}, position {j}: no log-probs")
            pairs = []
            for key, v in entry.items():
                try:
                    tid = int(key)
                except (TypeError, ValueError):
                    raise _Invalid(f"prompt {i}, position {j}: token id {str(key)[:20]!r} is not an integer") from None
                if not 0 <= tid < vocab_size:
                    raise _Invalid(f"prompt {i}, position {j}: token id {tid} is outside the vocabulary of {vocab_size}")
                lp = v.get("logprob") if isinstance(v, dict) else v
                if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp) or lp > 1e-3:
                    raise _Invalid(f"prompt {i}, position {j}: log-prob {lp!r} of token {tid} is not a finite number <= 0")
                pairs.append((float(lp), tid))
            if sent[j] not in {t for _, t in pairs}:
                raise _Invalid(f"prompt {i}, position {j}: the log-prob of the token sent there ({sent[j]}) is missing")
            if len(pairs) < kk:
                raise _Invalid(f"prompt {i}, position {j}: {len(pairs)} log-probs, fewer than k={k} (start vLLM with "
                               f"--max-logprobs {k} or more)")
            pairs.sort(key=lambda p: (-p[0], p[1]))
            top = pairs[:kk]  # vLLM adds the actual token beyond the top k when it is not among them
            ids[j - 1] = torch.tensor([t for _, t in top])
            logp[j - 1] = torch.tensor([min(x, 0.0) for x, _ in top])
        out.append(PromptTopK(ids, logp))
    return out


def parse_generations(answer: Any, prompts: list[list[int]], vocab_size: int) -> list[list[int]]:
    out = []
    for i, (choice, sent) in enumerate(zip(_choices(answer, len(prompts)), prompts)):
        _echo_check(choice, sent, i)
        ids = choice.get("token_ids")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
                                                for t in ids):
            raise _Invalid(f"prompt {i}: the generated token_ids are missing or outside the vocabulary")
        out.append(ids)
    return out


def tail_logp(logp: Any) -> Any:
    """log of the mass outside the k ids, from their log-probs: log(1 - sum p), floored where rounding
    (a bf16 server) makes the k ids cover everything."""
    import math

    import torch

    from kdflow.losses import _log1mexp

    return _log1mexp(torch.logsumexp(logp.float(), dim=-1)).clamp(min=math.log(1e-12))


# ----------------------------------------------------------------------------------------------
# What methods ask of a served teacher


def served_targets(client: TeacherClient, batch: dict[str, Any], kd_mask: Any, k: int) -> Any:
    """TopKTargets at the KD rows (row-major order) of a collated batch, the teacher behind `client`."""
    import torch

    from kdflow.losses import TopKTargets

    per_example = served_per_example(client, batch, kd_mask, k)
    ids = torch.cat([e["ids"] for e in per_example]) if per_example else torch.zeros((0, k), dtype=torch.long)
    logp = torch.cat([e["logp"] for e in per_example]) if per_example else torch.zeros((0, k))
    tail = torch.cat([e["tail_logp"] for e in per_example]) if per_example else torch.zeros(0)
    device = batch["labels"].device
    return TopKTargets(ids.to(device), logp.to(device), None, tail.to(device))


def served_per_example(client: TeacherClient, batch: dict[str, Any], kd_mask: Any, k: int) -> list[dict[str, Any]]:
    """Per example of a collated batch: the teacher's top-k (ids, logp, tail_logp) at its KD positions."""
    seqs = [ids[:int(n)].tolist() for ids, n in zip(batch["input_ids"].cpu(), batch["attention_mask"].sum(-1).cpu())]
    answers = client.prompt_topk(seqs, k)
    out = []
    for a, mask in zip(answers, kd_mask.cpu()):
        rows = mask[:a.ids.shape[0]]
        if int(mask[a.ids.shape[0]:].sum()) != 0:
            raise TeacherServerError("a KD position lies past the sequence the server scored")
        out.append({"ids": a.ids[rows], "logp": a.logp[rows], "tail_logp": tail_logp(a.logp[rows])})
    return out


def cache_compute(client: TeacherClient, k: int, token_scope: str) -> Any:
    """build_cache's per-batch function for a served teacher (same_tokenizer_targets' counterpart)."""
    from kdflow.losses import shifted_masks

    def targets(batch: dict[str, Any]) -> list[dict[str, Any]]:
        _, kd_mask = shifted_masks(batch["labels"], batch["attention_mask"], token_scope)
        return served_per_example(client, batch, kd_mask, k)

    return targets


# ----------------------------------------------------------------------------------------------
# kdflow serve-teacher


def make_server(model: Any, vocab_size: int, name: str, host: str = "127.0.0.1", port: int = 0, max_logprobs: int = 64,
                max_prompts: int = 64, max_tokens: int = 4096, max_body_bytes: int = 8 * 2**20) -> Any:
    """An HTTP server (not yet serving) answering /health, /v1/models and prompt log-probs of /v1/completions."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import torch
    import torch.nn.functional as F

    from kdflow.models import input_device

    lock = threading.Lock()

    def score(prompts: list[list[int]], k: int) -> list[dict[str, Any]]:
        choices = []
        with lock, torch.no_grad():
            for i, ids in enumerate(prompts):
                x = torch.tensor([ids], device=input_device(model))
                logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, :, :vocab_size].float()
                lp = F.log_softmax(logits, dim=-1).cpu()
                top = lp.topk(min(k, vocab_size), dim=-1)
                entries: list[Any] = [None]
                for j in range(1, len(ids)):
                    d = {str(int(t)): {"logprob": float(v), "rank": r + 1}
                         for r, (t, v) in enumerate(zip(top.indices[j - 1], top.values[j - 1]))}
                    actual = str(ids[j])
                    if actual not in d:
                        row = lp[j - 1]
                        d[actual] = {"logprob": float(row[ids[j]]), "rank": int((row > row[ids[j]]).sum()) + 1}
                    entries.append(d)
                choices.append({"index": i, "text": "", "prompt_token_ids": ids, "prompt_logprobs": entries,
                                "token_ids": [], "finish_reason": "length"})
        return choices

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet: the client reports what matters
            pass

        def _send(self, code: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, msg: str) -> None:
            self._send(code, {"error": {"message": msg, "code": code}})

        def do_GET(self) -> None:
            self.server.kdflow_requests += 1
            if self.path == "/health":
                self._send(200, {})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            else:
                self._error(404, f"no such path {self.path[:100]}")

        def do_POST(self) -> None:
            self.server.kdflow_requests += 1
            if self.path != "/v1/completions":
                return self._error(404, f"no such path {self.path[:100]}")
            try:
                n = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                n = -1
            if not 0 < n <= max_body_bytes:
                return self._error(413, f"the request body must be 1 to {max_body_bytes} bytes")
            try:
                req = json.loads(self.rfile.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return self._error(400, "the request is not JSON")
            if not isinstance(req, dict):
                return self._error(400, "the request must be a JSON object")
            if req.get("model") not in (None, name):
                return self._error(404, f"model {str(req.get('model'))[:100]!r} is not served here (serving {name!r})")
            prompts = req.get("prompt")
            if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
                prompts = [prompts]
            ok = (isinstance(prompts, list) and 0 < len(prompts) <= max_prompts
                  and all(isinstance(p, list) and 0 < len(p) <= max_tokens
                          and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in p)
                          for p in prompts))
            if not ok:
                return self._error(400, f"prompt must be 1 to {max_prompts} lists of 1 to {max_tokens} token ids in "
                                        f"[0, {vocab_size}) (this server takes token ids, not text)")
            if req.get("max_tokens", 1) not in (0, 1, None):
                return self._error(400, "this server (kdflow serve-teacher) answers prompt log-probs only, not "
                                        "generations: send max_tokens 1, or serve the teacher with vLLM for seqkd")
            k = req.get("prompt_logprobs")
            if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= max_logprobs:
                return self._error(400, f"prompt_logprobs must be an integer from 0 to {max_logprobs} (this server "
                                        "answers prompt log-probs only)")
            choices = score(prompts, max(k, 1))
            self._send(200, {"id": "cmpl-kdflow", "object": "text_completion", "created": int(time.time()),
                             "model": name, "choices": choices,
                             "usage": {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0,
                                       "total_tokens": sum(map(len, prompts))}})

    server = HTTPServer((host, port), Handler)
    server.kdflow_requests = 0
    return server


def run_serve_teacher(cfg: Any) -> None:
    """`kdflow serve-teacher`: serve the configured teacher until stopped (or serve.idle_timeout / max_requests)."""
    import ipaddress

    from kdflow.errors import ConfigError
    from kdflow.teachers import get_teacher

    s = cfg.serve
    try:
        loopback = ipaddress.ip_address(s.host).is_loopback
    except ValueError:
        loopback = s.host == "localhost"
    if not loopback and not s.allow_remote:
        raise ConfigError(f"serve.host={s.host} would expose the teacher beyond this machine, without authentication; "
                          "use 127.0.0.1, or set serve.allow_remote=true on a trusted network")
    if cfg.teacher.server.url:
        raise ConfigError("serve-teacher serves a local teacher: remove teacher.server.url")
    from kdflow.data import read_rows

    rows = read_rows(cfg.data.train, "data.train") if cfg.data.train else None
    ready = get_teacher(cfg.teacher, cfg.data, rows)
    model = ready.model()
    name = s.model_name or cfg.teacher.name
    server = make_server(model, len(ready.tokenizer), name, s.host, s.port, s.max_logprobs, s.max_prompts,
                         s.max_tokens)
    if s.idle_timeout > 0:
        server.timeout = s.idle_timeout
    host, port = server.server_address[:2]
    print(f"[kdflow] serving teacher {name!r} on http://{host}:{port} (POST /v1/completions with prompt_logprobs <= "
          f"{s.max_logprobs}; GET /health)", flush=True)
    try:
        while s.max_requests <= 0 or server.kdflow_requests < s.max_requests:
            before = server.kdflow_requests
            server.handle_request()
            if s.idle_timeout > 0 and server.kdflow_requests == before:
                print(f"[kdflow] no request for {s.idle_timeout:g} s: stopping", flush=True)
                break
    finally:
        server.server_close()
