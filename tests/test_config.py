"""Config and search-space validation: every bad input is one line naming the file and key, before any work."""
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search_spaces import SpaceError, load_space
from sweep.config import ConfigError, load_config, load_space_for

ROOT_SPACES = ["quickstart.yaml", "distil_bilstm.yaml", "seed_grid.yaml"]


def _write(tmp_path, obj, name="c.yaml"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj))
    return p


@pytest.mark.parametrize("name", ROOT_SPACES)
def test_shipped_spaces_load(name):
    from pathlib import Path

    cfg, _ = load_config(Path(__file__).parent.parent / "search_spaces" / name)
    space = load_space_for(cfg)
    assert space.params


def test_seed_grid_is_the_study_grid():
    from pathlib import Path

    cfg, _ = load_config(Path(__file__).parent.parent / "search_spaces" / "seed_grid.yaml", ["sweep.searcher=grid"])
    space = load_space_for(cfg)
    assert space.is_grid and space.grid_size() == 5 * 4 * 5 * 2
    assert space.expand({"dims": "h26_e8"}) == {"student.hidden_dim": 26, "student.embedding_dim": 8,
                                                "tokenizer.vocab_size": 3000, "data.mirrors": ["../shared/data/nsmc"]}
    from trainable.tasks.classify import vocab_sizes

    assert vocab_sizes(cfg, space) == [3000]  # the tokenizers classify prepares


@pytest.mark.parametrize("raw,expected", [
    ({"train": {"epochz": 3}}, "train.epochz: unknown key"),
    ({"bogus": 1}, "bogus: unknown key"),
    ({"train": {"epochs": "3"}}, "train.epochs: Input should be a valid integer"),
    ({"train": {"epochs": 0}}, "train.epochs: Input should be greater than 0"),
    ({"train": {"batch_size": -1}}, "train.batch_size"),
    ({"student": {"hidden_dim": 0}}, "student.hidden_dim"),
    ({"train": {"temperature": 0}}, "train.temperature"),
    ({"train": {"alpha": 1.5}}, "train.alpha: Input should be less than or equal to 1"),
    ({"train": {"alpha": -0.1}}, "train.alpha"),
    ({"sweep": {"num_samples": 0}}, "sweep.num_samples"),
    ({"sweep": {"resources": {"gpu": -0.5}}}, "sweep.resources.gpu"),
    ({"sweep": {"resources": {"gpu": 1.5}}}, "whole number"),
    ({"sweep": {"searcher": "bayes"}}, "sweep.searcher"),
    ({"teacher": {"trust_remote_code": "yes"}}, "teacher.trust_remote_code"),
    ({"name": "../escape"}, "name: String should match pattern"),
    ({"train": {"scheduler": "cyclic", "base_lr": 0.1, "lr": 0.01}}, "base_lr"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, raw, expected):
    p = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and expected in msg and "\n" not in msg


def test_malformed_yaml_names_the_line(tmp_path):
    p = _write(tmp_path, "name: x\ntrain:\n  epochs: [1, 2\n  lr: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: malformed YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n", "list.yaml"))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_and_scientific_notation(tmp_path):
    p = _write(tmp_path, "train:\n  lr: 1e-3\n")
    cfg, _ = load_config(p, ["train.epochs=7", "student.hidden_dim=32", "train.betas=[0.8, 0.9]"])
    assert cfg.train.lr == 1e-3 and cfg.train.epochs == 7 and cfg.student.hidden_dim == 32
    assert cfg.train.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_config(p, ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(p, ["train.epochs"])


@pytest.mark.parametrize("param,expected", [
    ({"student.hidden_dim": {"type": "int", "low": 64, "high": 16}}, "parameter student.hidden_dim: low (64.0) > high (16.0)"),
    ({"student.hidden_dim": {"type": "int", "low": -4, "high": 16}}, "parameter student.hidden_dim: student.hidden_dim"),
    ({"train.temperature": {"type": "float", "low": 0.0, "high": 4.0}}, "parameter train.temperature: train.temperature"),
    ({"train.alpha": {"type": "float", "low": 0.0, "high": 1.5}}, "parameter train.alpha: train.alpha"),
    ({"train.alpha": {"type": "categorical", "choices": []}}, "non-empty 'choices'"),
    ({"train.lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}, "log-scaled parameter needs low > 0"),
    ({"train.lr": {"type": "float", "low": 1, "high": 2, "lgo": True}}, "unknown key 'lgo'"),
    ({"train.nope": {"type": "int", "low": 1, "high": 2}}, "train.nope: unknown key"),
    ({"train.base_lr": {"type": "float", "low": 1e-5, "high": 1e-4, "when": {"train.scheduler": "cyclic"}}},
     "not an earlier parameter"),
    ({"train.epochs": {"type": "int", "low": 1.5, "high": 3}}, "whole-number bounds"),
])
def test_bad_search_space(tmp_path, param, expected):
    space = _write(tmp_path, {"parameters": param}, "space.yaml")
    p = _write(tmp_path, {"sweep": {"space": "space.yaml"}})
    with pytest.raises(SpaceError) as e:
        load_config(p)  # the space is checked with the config, before any work
    assert str(space) in str(e.value) and expected in str(e.value) and "\n" not in str(e.value)


def test_grid_with_a_non_grid_space_is_refused(tmp_path):
    _write(tmp_path, {"parameters": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}}, "space.yaml")
    with pytest.raises(ConfigError, match="grid search needs unconditional categorical"):
        load_config(_write(tmp_path, {"sweep": {"space": "space.yaml", "searcher": "grid"}}))


def test_conditional_sampling_only_samples_active_parameters():
    import optuna

    space = load_space({"parameters": {
        "train.scheduler": {"type": "categorical", "choices": ["step", "cyclic"]},
        "train.base_lr": {"type": "float", "low": 1e-5, "high": 1e-4, "log": True, "when": {"train.scheduler": "cyclic"}},
        "train.alpha": {"type": "float", "low": 0.0, "high": 1.0},
        "train.temperature": {"type": "float", "low": 1.0, "high": 5.0, "when": {"train.alpha": {"lt": 1.0}}},
    }, "fixed": {"train.epochs": 2}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    fn = space.define_by_run()
    seen = []
    for _ in range(30):
        t = study.ask()
        out = fn(t)
        seen.append(out)
        assert ("train.base_lr" in out) == (out["train.scheduler"] == "cyclic")
        assert out["train.epochs"] == 2
        study.tell(t, 0.5)
    assert {o["train.scheduler"] for o in seen} == {"step", "cyclic"}


KEYS = st.sampled_from(["name", "train", "train.epochs", "train.lr", "student.hidden_dim", "sweep.searcher",
                        "sweep.resources.gpu", "data.train_rows", "teacher.source", "zzz", "sweep.space"])
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=8),
                   st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(KEYS, VALUES, max_size=4))
def test_fuzzed_overrides_are_accepted_or_refused_cleanly(tmp_path, overrides):
    """Whatever the input, the loader returns a config or raises ConfigError/SpaceError with one line."""
    p = _write(tmp_path, {})
    args = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in overrides.items()]
    try:
        cfg, _ = load_config(p, args)
        load_space_for(cfg)
    except (ConfigError, SpaceError) as e:
        assert "\n" not in str(e) and str(e)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_fuzzed_yaml_text_is_accepted_or_refused_cleanly(tmp_path, text):
    p = tmp_path / "f.yaml"
    p.write_text(text)
    try:
        load_config(p)
    except ConfigError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize("base_alpha,space,expected", [
    (1.0, None, False),
    (0.5, None, True),
    (1.0, {"parameters": {"student.hidden_dim": {"type": "categorical", "choices": [8, 16]}}}, False),
    (1.0, {"parameters": {"train.alpha": {"type": "float", "low": 0.0, "high": 1.0}}}, True),
    (0.5, {"parameters": {"train.alpha": {"type": "categorical", "choices": [1.0]}}}, False),
    (0.5, {"parameters": {"x": {"type": "categorical", "choices": [8]}}, "fixed": {"train.alpha": 1.0}}, False),
    # a bundle that turns distillation on for some trials, while the base config has it off
    (1.0, {"parameters": {"mode": {"type": "categorical", "choices": {
        "plain": {"student.hidden_dim": 8}, "kd": {"student.hidden_dim": 8, "train.alpha": 0.5}}}}}, True),
])
def test_the_teacher_is_prepared_exactly_when_some_trial_distils(base_alpha, space, expected):
    from trainable.tasks.classify import needs_teacher

    assert needs_teacher(base_alpha, load_space(space) if space else None) is expected


def test_a_spaces_fixed_values_reach_the_config_and_a_conflicting_set_is_refused(tmp_path):
    """Fixed values hold for every trial, so preparation (data.*) and ASHA's max_t (train.epochs) must see them:
    before, a space fixing train.epochs: 10 ran under a scheduler sized for the config's epochs."""
    from sweep.tuner import make_scheduler

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"parameters": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2}},
                                     "fixed": {"train.epochs": 7, "data.train_rows": 1234}}))
    cfg, _ = load_config(space)
    assert cfg.train.epochs == 7 and cfg.data.train_rows == 1234
    assert make_scheduler(cfg, tmp_path)._max_t == 7
    cfg, _ = load_config(space, ["train.epochs=7", "train.lr=0.001"])  # agreeing or unrelated --set: fine
    assert cfg.train.epochs == 7
    with pytest.raises(ConfigError, match=r"^--set train.epochs: the search space .*space.yaml fixes it to 7"):
        load_config(space, ["train.epochs=3"])


def test_a_space_names_the_keys_it_samples_bundles_expanded_fixed_left_out():
    """What the sweep's HParams table lists as columns (sweep.tuner.write_hparams_experiment)."""
    from search_spaces import load_space

    space = load_space({"parameters": {
        "dims": {"type": "categorical", "choices": {"small": {"student.hidden_dim": 16, "student.embedding_dim": 8},
                                                     "big": {"student.hidden_dim": 64, "student.embedding_dim": 32}}},
        "train.alpha": {"type": "float", "low": 0.0, "high": 1.0},
        "train.temperature": {"type": "float", "low": 1.0, "high": 4.0, "when": {"train.alpha": {"lt": 1.0}}}},
        "fixed": {"train.lr": 0.001}})
    assert space.searched_keys() == ["student.hidden_dim", "student.embedding_dim", "train.alpha", "train.temperature"]
