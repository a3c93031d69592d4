"""scripts/bad_input_sweep.py: its classification, its case list, and a few real cases that need no model."""

import importlib.util
import sys

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("bad_input_sweep", ROOT / "scripts" / "bad_input_sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bad_input_sweep"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_outcomes_are_classified(sweep):
    assert sweep.classify(2, "progress\rkdflow: error: data.train x.jsonl has no rows\n") == \
        ("clear", "data.train x.jsonl has no rows")
    assert sweep.classify(0, "")[0] == "silent"
    assert sweep.classify(1, "Traceback (most recent call last):\n  ...\nKeyError: 'x'\n") == ("traceback", "KeyError: 'x'")
    assert sweep.classify(2, "kdflow: error: one\nkdflow: error: two\n")[0] == "traceback"
    assert sweep.classify(2, "Traceback (most recent call last):\nkdflow: error: late\n")[0] == "traceback"
    assert sweep.classify(137, "")[0] == "traceback"


def test_the_case_list(sweep):
    from kdflow.cli import VERBS

    names = [c.name for c in sweep.CASES]
    assert len(names) >= 60 and len(set(names)) == len(names)
    assert {c.verb for c in sweep.CASES} >= {"distill", "cache-teacher", "eval", "minillm", "codistill", "fedmkt"}
    assert all(c.verb in VERBS for c in sweep.CASES)


def test_real_cases_run_through_the_cli(sweep, tmp_path):
    ws = sweep.Workspace(tmp_path)
    cases = [sweep.Case("max-steps-0", "distill", ["train.max_steps=0"], "train.max_steps=0"),
             sweep.Case("not-utf8", "distill", ["--config", "{case}/c.yaml"], "Latin-1 config",
                        sweep.write("c.yaml", b"method: kd # \xe9\n")),
             sweep.Case("accepted", "eval", ["model.name=x", "--print-config"], "nothing wrong")]
    got = {c.name: sweep.run_case(ws, c) for c in cases}
    assert got["max-steps-0"].kind == "clear" and "'train.max_steps' must be -1 or >= 1" in got["max-steps-0"].message
    assert got["not-utf8"].kind == "clear" and got["not-utf8"].message.endswith("c.yaml:1: not UTF-8 text (byte 0xe9); "
                                                                                "save it as UTF-8")
    assert got["accepted"].kind == "silent"
    doc = sweep.markdown(list(got.values()), 1.0)
    assert "**3 cases: 2 clear, 0 tracebacks, 1 silent**" in doc and "| max-steps-0 | distill |" in doc
