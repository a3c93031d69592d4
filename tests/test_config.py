"""Typed configs: unknown keys, types, ranges, overrides; every shipped YAML parses."""

from pathlib import Path

import pytest

from kdflow.config import DistillConfig, EvalRunConfig, load_config
from kdflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_key_lists_valid_keys_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown setting 'kd.divergance' \(did you mean 'kd.divergence'\?\); valid keys under 'kd': divergence, kd_weight"):
        load_config(DistillConfig, None, ["kd.divergance=rkl"])
    f = tmp_path / "c.yaml"
    f.write_text("methd: kd\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'methd'.*valid keys: method, output_dir"):
        load_config(DistillConfig, f)


@pytest.mark.parametrize("override,match", [
    ("train.max_steps=ten", r"'train.max_steps': expected an integer"),
    ("kd.kd_weight=1.5", r"'kd.kd_weight' must lie in \[0, 1\]"),
    ("method=distil", r"'method': 'distil' is not one of 'sft', 'kd'"),
    ("kd.temperature=0", r"'kd.temperature' must be > 0"),
    ("student.keep_layers=[0, x]", r"student.keep_layers\[1\]"),
    ("train", r"not key=value"),
])
def test_bad_values_are_errors_that_name_the_setting(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DistillConfig, None, [override])


def test_overrides_and_partial_sections_keep_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("teacher:\n  dtype: bfloat16\ntrain:\n  learning_rate: 1\n")
    cfg = load_config(DistillConfig, f, ["kd.divergence=jsd", "student.keep_layers=[0, 2]", "train.bf16=true"])
    assert cfg.teacher.name == "bundled:smollm2-135m-instruct" and cfg.teacher.dtype == "bfloat16"
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.kd.divergence == "jsd" and cfg.student.keep_layers == [0, 2] and cfg.train.bf16 is True
    assert cfg.student.lora.target_modules == ["q_proj", "v_proj"]


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(DistillConfig, tmp_path / "none.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DistillConfig, f)


def test_every_shipped_config_parses():
    from kdflow.cli import VERBS, _load

    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    by_prefix = {name: _load(v.config) for name, v in VERBS.items()}
    for path in configs:
        text = path.read_text()
        verb = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("# verb:")), "distill")
        load_config(by_prefix[verb], path)


def test_eval_config_defaults():
    cfg = load_config(EvalRunConfig, None, ["model.name=x", "data.test=t.jsonl"])
    assert cfg.model.name == "x" and cfg.eval.greedy


def test_exponent_without_a_dot_is_a_number():
    # YAML 1.1 reads 1e-5 as a string; a learning rate written that way must still work
    from kdflow.config import MiniLLMConfig

    cfg = load_config(MiniLLMConfig, None, ["minillm.learning_rate=1e-5", "minillm.clip_ratio=2E-1"])
    assert cfg.minillm.learning_rate == 1e-5 and cfg.minillm.clip_ratio == 0.2
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(MiniLLMConfig, None, ["minillm.learning_rate=fast"])


def test_lists_of_sections_from_yaml_and_overrides(tmp_path):
    from kdflow.config import CoDistillConfig, PeerSpec

    f = tmp_path / "c.yaml"
    f.write_text("peers:\n  - name: a\n    model: {init: prune_teacher, keep_layers: [0, 1]}\n"
                 "  - name: b\n    learning_rate: 1\n    model: {lora: {enabled: true}}\n")
    cfg = load_config(CoDistillConfig, f, ["peers[0].model.keep_layers=[0, 2]", "peers[1].seed=7"])
    a, b = cfg.peers
    assert isinstance(a, PeerSpec) and a.model.init == "prune_teacher" and a.model.keep_layers == [0, 2]
    assert a.learning_rate is None and a.model.lora.enabled is False  # defaults inside each item
    assert b.learning_rate == 1.0 and isinstance(b.learning_rate, float) and b.model.lora.enabled and b.seed == 7
    assert b.model.lora.target_modules == ["q_proj", "v_proj"]
    f.write_text("peers:\n  - name: a\n  - name: b\n    learning_rat: 1\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'peers\[1\].learning_rat' \(did you mean 'peers\[1\].learning_rate'\?\)"):
        load_config(CoDistillConfig, f)
    with pytest.raises(ConfigError, match=r"'peers\[0\].model.lora.r' must be >= 1"):
        load_config(CoDistillConfig, None, ["peers=[{name: a, model: {lora: {r: 0}}}]"])
    with pytest.raises(ConfigError, match=r"override 'peers\[3\]': 'peers' has 2 items here"):
        load_config(CoDistillConfig, None, ["peers=[{name: a}, {name: b}]", "peers[3].seed=1"])
    with pytest.raises(ConfigError, match=r"'peers\[0\]': expected a mapping of PeerSpec keys"):
        load_config(CoDistillConfig, None, ["peers=[a, b]"])


def test_codistill_help_documents_peer_keys(capsys):
    from kdflow.cli import main

    assert main(["codistill", "--help"]) == 0
    text = capsys.readouterr().out
    for key in ("peers[i].name", "peers[i].learning_rate", "peers[i].model.keep_layers", "peers[i].model.lora.r", "kd.variant"):
        assert f"  {key}  (" in text, key


@pytest.mark.parametrize("verb,overrides,match", [
    ("distill", ["kd.divergence=rkl", "kd.sparse_mode=renorm"], r"kd.divergence=rkl and kd.sparse_mode=renorm: reverse KL is infinite"),
    ("distill", ["kd.divergence=rkl", "align.unpaired=onehot_next"], r"kd.divergence=rkl and align.unpaired=onehot_next: .*set align.unpaired=mask"),
    ("distill", ["kd.divergence=srkl", "kd.skew_alpha=0", "kd.sparse_mode=renorm"], r"kd.skew_alpha=0 \(that is reverse KL\)"),
    ("codistill", ["kd.divergence=rkl", "align.unpaired=onehot_next"], r"kd.divergence=rkl and align.unpaired=onehot_next"),
    ("fedmkt", ["fedmkt.divergence=rkl", "fedmkt.sparse_mode=renorm"], r"fedmkt.divergence=rkl and fedmkt.sparse_mode=renorm"),
    ("fedmkt", ["fedmkt.divergence=rkl", "align.unpaired=onehot_next"], r"fedmkt.divergence=rkl and align.unpaired=onehot_next"),
])
def test_infinite_reverse_kl_is_refused_when_the_config_is_read(verb, overrides, match):
    """Reverse KL against targets without mass outside a few ids (renorm top-k, one-hot for unpaired
    positions) is infinite: every method refuses it before any model loads, in one line."""
    from kdflow.config import CoDistillConfig, FedMKTConfig

    cls = {"distill": DistillConfig, "codistill": CoDistillConfig, "fedmkt": FedMKTConfig}[verb]
    with pytest.raises(ConfigError, match=match) as err:
        load_config(cls, None, overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cls_name,overrides", [
    ("DistillConfig", ["kd.divergence=srkl", "kd.sparse_mode=renorm", "align.unpaired=onehot_next"]),  # alpha > 0: finite
    ("DistillConfig", ["kd.divergence=rkl"]),  # tail mode, unpaired positions masked
    ("DistillConfig", ["method=hard_token", "kd.divergence=rkl", "kd.sparse_mode=renorm"]),  # no divergence used
    ("DistillConfig", ["kd.divergence=rkl", "kd.sparse_mode=renorm", "kd.kd_weight=0"]),
    ("FedMKTConfig", ["fedmkt.divergence=rkl", "fedmkt.sparse_mode=renorm", "fedmkt.ce_weight=1"]),
])
def test_finite_divergence_settings_are_accepted(cls_name, overrides):
    import kdflow.config as config

    load_config(getattr(config, cls_name), None, overrides)


# ----------------------------------------------------------------------------------------------
# Every numeric setting is range-checked from its declaration (issue 14, item 15)


@pytest.mark.parametrize("override,match", [
    ("train.max_steps=0", r"'train.max_steps' must be -1 or >= 1, got 0"),
    ("train.max_steps=-5", r"'train.max_steps' must be -1 or >= 1, got -5"),
    ("train.num_epochs=0", r"'train.num_epochs' must be > 0, got 0.0"),
    ("data.max_train_rows=-3", r"'data.max_train_rows' must be >= 1"),
    ("data.min_response_tokens=-1", r"'data.min_response_tokens' must be >= 1"),
    ("train.weight_decay=-0.1", r"'train.weight_decay' must be >= 0"),
    ("train.max_grad_norm=-1", r"'train.max_grad_norm' must be >= 0"),
    ("train.save_steps=-10", r"'train.save_steps' must be >= 0"),
    ("train.logging_steps=0", r"'train.logging_steps' must be >= 1"),
    ("eval.max_rows=0", r"'eval.max_rows' must be >= 1"),
    ("kd.temperature=.nan", r"'kd.temperature' must be > 0, got nan, which is not a finite number"),
    ("kd.temperature=inf", r"'kd.temperature' must be > 0, got inf, which is not a finite number"),
    ("train.learning_rate=nan", r"'train.learning_rate' must be > 0, got nan"),
    ("train.adam_beta2=1.0", r"'train.adam_beta2' must lie in \[0, 1\), got 1.0"),
    ("eval.sample_seeds=[3, -1]", r"'eval.sample_seeds\[1\]' must lie in \[0, 4294967295\]"),
    ("train.lr_scheduler=cosin", r"'train.lr_scheduler': unknown scheduler 'cosin' \(did you mean 'cosine'\?\)"),
    ("train.report_to=[tensorbord]", r"'train.report_to': unknown logger 'tensorbord' \(did you mean 'tensorboard'\?\)"),
])
def test_out_of_range_numbers_and_unknown_names_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DistillConfig, None, [override])


def test_a_logger_that_is_not_installed_is_refused_up_front(monkeypatch):
    import transformers.integrations.integration_utils as iu

    monkeypatch.setattr(iu, "get_available_reporting_integrations", lambda: ["tensorboard"])
    with pytest.raises(ConfigError, match=r"'train.report_to': wandb is not installed"):
        load_config(DistillConfig, None, ["train.report_to=[wandb]"])


def test_every_numeric_setting_declares_its_range_and_help_shows_it(capsys):
    import dataclasses
    import typing

    from kdflow import config as C
    from kdflow.cli import main

    classes = [getattr(C, n) for n in dir(C) if isinstance(getattr(C, n), type) and dataclasses.is_dataclass(getattr(C, n))]
    undeclared = []
    for cls in classes:
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if any(t in (int, float) for t in [tp, *typing.get_args(tp), *[a for x in typing.get_args(tp) for a in typing.get_args(x)]]):
                if f.metadata.get("range") is None:
                    undeclared.append(f"{cls.__name__}.{f.name}")
                else:
                    C.in_range(0.5, f.metadata["range"])  # the declaration parses
    assert not undeclared
    assert main(["distill", "--help"]) == 0
    text = capsys.readouterr().out
    assert "train.learning_rate  (float > 0; default 5e-05)" in text
    assert "train.max_steps  (int -1 or >= 1; default -1)" in text
    assert "kd.kd_weight  (float in [0, 1]; default 0.5)" in text
