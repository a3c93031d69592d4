"""A teacher behind HTTP (issue 15, item 2): the client against a real server on 127.0.0.1.

`kdflow serve-teacher`'s server answers what a local teacher computes (top-k ids and log-probs);
a cache built through it matches one built locally, kd/gkd train from it online, and every kind of
server failure (timeout, 500, malformed JSON, ids outside the vocabulary, tokens echoed wrongly)
ends, after the retries, in one clear line.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from kdflow.cli import main
from kdflow.config import DataConfig
from kdflow.data import collate, encode_rows, read_rows
from kdflow.losses import shifted_masks
from kdflow.serving import TeacherClient, TeacherServerError, cache_compute, make_server, served_targets
from kdflow.teacher_cache import same_tokenizer_targets

K = 8


@pytest.fixture(scope="module")
def served(tiny_dirs, bpe_tok):
    """serve-teacher's server for the tiny teacher, on a free loopback port, in a thread."""
    from kdflow.config import ModelSpec
    from kdflow.models import freeze, load_model

    teacher = freeze(load_model(ModelSpec(name=str(tiny_dirs["teacher"]))))
    server = make_server(teacher, len(bpe_tok), "tiny", port=0, max_logprobs=32)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", teacher, server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def batch(bpe_tok, tiny_data):
    rows = read_rows(str(tiny_data["train"])).head(6)
    return collate(encode_rows(rows, bpe_tok, DataConfig()), bpe_tok.pad_token_id)


def test_served_top_k_equals_the_local_teachers(served, batch, bpe_tok):
    url, teacher, _ = served
    client = TeacherClient(url, "tiny", len(bpe_tok), concurrency=2, batch_size=4)
    remote = cache_compute(client, K, "response")(batch)
    local = same_tokenizer_targets(teacher, len(bpe_tok), K, 1.0, "response")(batch)
    assert len(remote) == len(local) == 6
    n = overlap = 0
    worst = 0.0
    for r, l in zip(remote, local):
        assert r["ids"].shape == l["ids"].shape
        for a, b in zip(r["ids"].tolist(), l["ids"].tolist()):
            overlap += len(set(a) & set(b))
            n += len(b)
        worst = max(worst, float((r["logp"] - l["logp"]).abs().max()), float((r["tail_logp"] - l["tail_logp"]).abs().max()))
    assert overlap / n >= 0.99
    assert worst < 1e-3  # fp32 on both sides; the tail derived from the top k rather than summed
    # the online path (kd / gkd) gets the same rows, as TopKTargets
    _, kd_mask = shifted_masks(batch["labels"], batch["attention_mask"])
    t = served_targets(client, batch, kd_mask, K)
    assert t.ids.shape == (int(kd_mask.sum()), K)
    assert torch.equal(t.ids, torch.cat([x["ids"] for x in remote]))


def test_cache_teacher_and_gkd_through_serve_teacher(tmp_path, served, tiny_dirs, tiny_data, capsys):
    url = served[0]
    common = [f"teacher.name={tiny_dirs['teacher']}", f"student.name={tiny_dirs['student']}", "student.init=pretrained",
              f"data.train={tiny_data['train']}", "data.max_train_rows=8", "kd.temperature=1.0",
              f"teacher.server.url={url}", "teacher.server.model=tiny", "teacher.check.mode='off'"]
    local = tmp_path / "local_cache"
    remote = tmp_path / "remote_cache"
    assert main(["cache-teacher", *common[:-2], "teacher.check.mode='off'", f"teacher_cache.dir={local}",
                 f"teacher_cache.k={K}"]) == 0
    assert main(["cache-teacher", *common, f"teacher_cache.dir={remote}", f"teacher_cache.k={K}"]) == 0
    m_local = json.loads((local / "manifest.json").read_text())
    m_remote = json.loads((remote / "manifest.json").read_text())
    assert m_remote["positions"] == m_local["positions"] > 0
    assert m_remote["key"]["teacher"].endswith("|served=tiny")  # not mistaken for the local teacher's cache
    run = ["distill", *common, "train.max_steps=2", "train.batch_size=4", "train.report_to=[none]", "train.save_steps=0",
           "evaluate_before=false", "evaluate_teacher=false", "kd.kd_weight=1.0"]
    assert main([*run, "method=kd", f"output_dir={tmp_path / 'kd'}", f"teacher_cache.dir={remote}",
                 f"teacher_cache.k={K}"]) == 0
    assert main([*run, "method=gkd", "gkd.lmbda=1", "gkd.max_new_tokens=4", f"align.top_k={K}",
                 f"output_dir={tmp_path / 'gkd'}"]) == 0
    log = json.loads((tmp_path / "gkd" / "log_history.json").read_text())
    assert any(h.get("kd", 0) > 0 for h in log)
    # a k above the server's limit: refused by the server, said in one line without pointless retries
    capsys.readouterr()
    assert main([*run, "method=gkd", "align.top_k=64", f"output_dir={tmp_path / 'gkd64'}"]) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert err.count("kdflow: error:") == 1 and line.startswith("kdflow: error: teacher.server http://127.0.0.1:")
    assert "refused: HTTP 400" in line and "prompt_logprobs must be an integer from 0 to 32" in line
    # a server's log-probs are at temperature 1: another KD temperature is refused, before anything loads
    capsys.readouterr()
    assert main([*run, "method=kd", "kd.temperature=2.0", f"output_dir={tmp_path / 'hot'}"]) == 2
    err = capsys.readouterr().err
    assert "kd.temperature=2 with teacher.server" in err and err.count("\n") == 1


class Fake(BaseHTTPRequestHandler):
    mode = "ok"
    calls = 0

    def log_message(self, *a):
        pass

    def do_POST(self):
        type(self).calls += 1
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompts = req["prompt"]
        if self.mode == "timeout":
            time.sleep(0.6)
            return
        if self.mode == "500":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"Internal Server Error")
            return
        choices = []
        if req.get("max_tokens", 1) > 1:  # a generation: a few ids per prompt
            gen = [7, 8, 9] if self.mode != "wrong_id" else [7, 999999]
            choices = [{"index": i, "prompt_token_ids": p, "token_ids": gen, "text": ""} for i, p in enumerate(prompts)]
            prompts = []
        for i, p in enumerate(prompts):
            entries = [None] + [{str(t): {"logprob": -0.1}, **{str((t + d) % 50): {"logprob": -3.0 - d}
                                                             for d in range(1, req["prompt_logprobs"])}}
                                for t in p[1:]]
            if self.mode == "wrong_id":
                entries[1] = {"999999": {"logprob": -0.1}, **entries[1]}
            if self.mode == "nan":
                entries[1][str(p[1])] = {"logprob": float("nan")}
            echoed = list(p) if self.mode != "echo" else [p[0]] + p
            choices.append({"index": i, "prompt_token_ids": echoed, "prompt_logprobs": entries})
        body = json.dumps({"choices": choices}).encode()
        if self.mode == "malformed":
            body = body[:-7]
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except BrokenPipeError:  # the client gave up waiting (mode timeout)
            pass


@pytest.fixture(scope="module")
def fake():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Fake)  # a timed-out request does not hold up the retry
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("mode,says", [
    ("timeout", "no answer within teacher.server.timeout=0.3 s"), ("500", "HTTP 500"),
    ("malformed", "the answer is not JSON"), ("wrong_id", "token id 999999 is outside the vocabulary of 50"),
    ("nan", "is not a finite number"), ("echo", "the tokens echoed back differ from those sent")])
def test_server_failures_retry_then_stop_with_one_line(fake, mode, says):
    Fake.mode, Fake.calls = mode, 0
    client = TeacherClient(fake, None, 50, timeout=0.3, retries=2, backoff=0.01, concurrency=1)
    with pytest.raises(TeacherServerError) as e:
        client.prompt_topk([[1, 2, 3, 4]], 3)
    msg = str(e.value)
    assert says in msg and "after 3 attempts" in msg and "\n" not in msg
    assert Fake.calls == 3
    Fake.mode = "ok"
    (got,) = client.prompt_topk([[1, 2, 3, 4]], 3)  # the same client, a sound answer: accepted
    assert got.ids[:, 0].tolist() == [2, 3, 4] and torch.allclose(got.logp[:, 0], torch.tensor(-0.1))


def test_generation_through_a_server_is_validated(fake):
    Fake.mode = "ok"
    client = TeacherClient(fake, None, 50, retries=0, concurrency=1, batch_size=2)
    assert client.generate([[1, 2], [3], [4, 5, 6]], 8, 1.0, 1.0, 0) == [[7, 8, 9]] * 3
    Fake.mode = "wrong_id"
    with pytest.raises(TeacherServerError, match="generated token_ids are missing or outside the vocabulary"):
        client.generate([[1, 2]], 8, 1.0, 1.0, 0)
    Fake.mode = "ok"


def test_serve_teacher_bounds_requests(served):
    import urllib.error
    import urllib.request

    url = served[0]

    def post(body):
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    assert post({"prompt": [[1, 2]], "prompt_logprobs": 33})[0] == 400  # over max_logprobs
    assert post({"prompt": "text", "prompt_logprobs": 2})[0] == 400  # token ids only
    assert post({"prompt": [[10**6]], "prompt_logprobs": 2})[0] == 400  # outside the vocabulary
    assert post({"prompt": [[1, 2]], "prompt_logprobs": 2, "model": "other"})[0] == 404
    code, said = post({"prompt": [[1, 2]], "max_tokens": 16})  # a generation (seqkd): refused, not answered empty
    assert code == 400 and "prompt log-probs only" in said["error"]["message"]
    code, ok = post({"prompt": [[1, 2, 3]], "prompt_logprobs": 2})
    assert code == 200 and ok["choices"][0]["prompt_token_ids"] == [1, 2, 3]


def test_serve_teacher_refuses_a_public_address_and_stops_when_idle(tiny_dirs, capsys):
    assert main(["serve-teacher", f"teacher.name={tiny_dirs['teacher']}", "serve.host=0.0.0.0"]) == 2
    assert "serve.allow_remote" in capsys.readouterr().err
    t0 = time.time()
    assert main(["serve-teacher", f"teacher.name={tiny_dirs['teacher']}", "serve.port=0", "serve.idle_timeout=0.5"]) == 0
    assert time.time() - t0 < 30 and "no request for 0.5 s: stopping" in capsys.readouterr().out
