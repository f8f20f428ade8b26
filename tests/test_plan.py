"""The budget planner (`sweep plan`) and GPU sizing (`sweep.resources.gpu: auto`): the memory estimate's parameter
count against the real student, the packing arithmetic, ASHA's rungs against Ray's own, and the CLI as a user runs
it (a first plan calibrates, a second reads the cache, bad input exits 2)."""
import json
import time

import pytest
import yaml

from conftest import run_main
from sweep.config import ConfigError, load_config, load_space_for
from trainable.memory import GiB, MiB, estimate_trial_memory, student_params, trials_per_gpu

SHAPE = dict(vocab_size=3000, embedding_dim=64, hidden_dim=128, num_classes=2, batch_size=64, max_length=128)


# ----------------------------------------------------------------------------- memory estimate


@pytest.mark.parametrize("vocab,emb,hidden,classes,layers", [(100, 8, 16, 2, 1), (3000, 64, 128, 2, 1),
                                                            (500, 10, 12, 3, 2), (2000, 32, 48, 5, 3)])
def test_parameter_count_is_the_real_students(vocab, emb, hidden, classes, layers):
    from trainable.student import BiLSTMClassifier, count_params

    model = BiLSTMClassifier(vocab, emb, hidden, classes, layers)
    assert student_params(vocab, emb, hidden, layers, classes) == count_params(model)


def test_parameter_count_by_hand():
    # embedding 100*8, per direction 4*16*8 + 4*16*16 + 2*4*16, classifier 2*16*2 + 2
    assert student_params(100, 8, 16) == 800 + 2 * (512 + 1024 + 128) + 64 + 2 == 4194


def test_estimate_grows_with_batch_and_hidden_and_adds_up():
    base = estimate_trial_memory(**SHAPE)
    assert sum(base.breakdown.values()) == base.total
    assert base.breakdown["weights"] == base.params * 4 and base.breakdown["adam_state"] == 2 * base.params * 4
    assert base.breakdown["cuda_context"] >= 300 * MiB
    bigger_batch = estimate_trial_memory(**{**SHAPE, "batch_size": 256})
    bigger_hidden = estimate_trial_memory(**{**SHAPE, "hidden_dim": 512})
    assert bigger_batch.total > base.total and bigger_hidden.total > base.total
    assert bigger_batch.breakdown["train_activations"] == pytest.approx(4 * base.breakdown["train_activations"],
                                                                        rel=0.01)
    pooled = estimate_trial_memory(**SHAPE, pool_rows=100_000)
    assert pooled.total - base.total == 100_000 * (2 * 4 + 8)  # teacher logits (N, 2) float32 + labels (N,) int64


@pytest.mark.parametrize("gpu,trial,n,fraction", [
    (80 * GiB, 5 * GiB, 12, 0.0833),  # 64 GiB usable / 5 GiB: 12; 1/12 rounded down to Ray's unit of 1e-4
    (80 * GiB, 16 * GiB, 4, 0.25),
    (80 * GiB, 64 * GiB / 6, 6, 0.1666),  # 1/6 rounded to nearest (0.1667) would let only 5 of them fit
    (80 * GiB, 100 * MiB, 16, 0.0625),  # capped at 16 per GPU
    (10 * GiB, 8 * GiB, 1, 1.0),
])
def test_trials_per_gpu(gpu, trial, n, fraction):
    got_n, got_fraction = trials_per_gpu(trial, gpu, margin=0.2)
    assert (got_n, got_fraction) == (n, fraction)
    assert got_n * round(got_fraction * 10_000) <= 10_000  # they all fit in Ray's fixed-point accounting


def test_one_trial_too_big_for_the_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"one trial needs about 9\.00 GiB .* more than the 8\.00 GiB usable on a "
                                         r"10\.00 GiB GPU"):
        trials_per_gpu(9 * GiB, 10 * GiB, margin=0.2)


# ----------------------------------------------------------------------------- sizing a sweep's largest trial


def _cfg(make_config, **sections):
    cfg, _ = load_config(make_config(**sections))
    return cfg, load_space_for(cfg)


SPACE = {"parameters": {  # in sorted order: make_config writes the YAML with sorted keys
    "student.dropout": {"type": "categorical", "choices": [0.1, 0.3]},
    "student.embedding_dim": {"type": "int", "low": 8, "high": 96, "when": {"student.dropout": 0.3}},
    "student.hidden_dim": {"type": "int", "low": 16, "high": 256, "log": True},
    "tokenizer.vocab_size": {"type": "categorical", "choices": [2000, 3000]},
    "train.batch_size": {"type": "categorical", "choices": [32, 128]},
}}


def test_largest_trial_takes_every_bound_and_the_config_value_a_conditional_leaves(make_config):
    from sweep.counts import smallest
    from sweep.resources import size_gpu

    cfg, space = _cfg(make_config, student={"embedding_dim": 120, "hidden_dim": 64},
                      sweep={"space": SPACE, "resources": {"gpu": "auto"}})
    big = size_gpu(cfg, space, None).largest
    # embedding_dim is sampled only with dropout 0.3; other trials keep the config's 120, the largest
    assert (big["hidden_dim"], big["embedding_dim"], big["batch_size"], big["vocab_size"]) == (256, 120, 128, 3000)
    assert big["max_length"] == 48 and big["num_layers"] == 1 and big["pool_rows"] == 3600
    small = [smallest(cfg, space, k) for k in ("student.hidden_dim", "student.embedding_dim", "train.batch_size",
                                               "tokenizer.vocab_size")]
    assert small == [16, 8, 32, 2000]


def test_gpu_auto_packs_the_largest_trial_into_the_gpu_it_is_given(make_config):
    from sweep.plan import Rows
    from sweep.resources import size_gpu

    cfg, space = _cfg(make_config, sweep={"space": SPACE, "resources": {"gpu": "auto"}})
    assert cfg.sweep.resources.gpu == "auto"
    rows = Rows(labelled=3600, val=400, test=1000, transfer_file=0, augmented=0)
    sizing = size_gpu(cfg, space, 80 * GiB, rows)
    est = estimate_trial_memory(vocab_size=3000, embedding_dim=96, hidden_dim=256, num_classes=2, batch_size=128,
                                max_length=48, eval_batch_size=512, pool_rows=3600)
    assert sizing.estimate == est
    assert (sizing.per_gpu, sizing.fraction) == trials_per_gpu(est.total, 80 * GiB) == (16, 0.0625)
    two = size_gpu(cfg, space, int(est.total / 0.8 * 2.5), rows)  # room for 2.5 trials: 2
    assert (two.per_gpu, two.fraction) == (2, 0.5)
    assert "0.5 GPU per trial" in two.line() and "estimate" in two.line()
    assert json.loads(json.dumps(two.to_json()))["breakdown_bytes"]["cuda_context"] > 0
    with pytest.raises(ConfigError, match="sweep.resources.gpu: auto: one trial needs about"):
        size_gpu(cfg, space, 256 * MiB, rows)


def test_gpu_auto_without_a_gpu_runs_on_cpu_and_says_so(make_config, tmp_path):
    from sweep.resources import GPU_SIZING_FILE, auto_gpu

    cfg, space = _cfg(make_config, sweep={"space": SPACE, "resources": {"gpu": "auto"}})
    lines = []
    assert auto_gpu(cfg, space, lines.append, tmp_path, cluster_has_gpu=False) == 0.0
    assert len(lines) == 1 and lines[0].startswith("resources: gpu auto: no GPU in the cluster; running on CPU")
    saved = json.loads((tmp_path / GPU_SIZING_FILE).read_text())
    assert saved["gpu_per_trial"] == 0.0 and saved["gpu_bytes"] is None and saved["pool_rows"] == 3600


@pytest.mark.parametrize("value,ok", [("auto", True), (0.25, True), (2, True), ("half", False), (-1, False)])
def test_gpu_accepts_a_number_or_auto(make_config, value, ok):
    path = make_config(sweep={"resources": {"gpu": value}})
    if ok:
        assert load_config(path)[0].sweep.resources.gpu == value
    else:
        with pytest.raises(ConfigError, match="sweep.resources.gpu: "):
            load_config(path)


# ----------------------------------------------------------------------------- trial-epochs under ASHA


@pytest.mark.parametrize("grace,rf,max_t", [(2, 2, 6), (1, 3, 9), (1, 2, 16), (2, 3, 20), (3, 2, 3), (1, 2.5, 10)])
def test_asha_rungs_are_rays(grace, rf, max_t):
    from ray.tune.schedulers.async_hyperband import _Bracket

    from sweep.plan import asha_rungs

    rays = sorted({int(-(-m // 1)) for m, _ in _Bracket(grace, max_t, rf, 0)._rungs} - set(range(max_t, 10**6)))
    assert asha_rungs(grace, rf, max_t) == rays


def test_asha_trial_epochs():
    from sweep.plan import asha_trial_epochs

    # 16 trials to epoch 2; 1 + 15/2 = 8.5 go on to epoch 4; 1 + 7.5/2 = 4.75 to epoch 6
    assert asha_trial_epochs(16, 6, 2, 2, 6) == 16 * 2 + 8.5 * 2 + 4.75 * 2
    assert asha_trial_epochs(16, 2, 2, 2, 2) == 32  # no rung before the end: nobody is stopped
    assert asha_trial_epochs(1, 6, 2, 2, 6) == 6  # a lone trial is always promoted


# ----------------------------------------------------------------------------- the CLI


PLAN_SPACE = {"parameters": {"student.hidden_dim": {"type": "int", "low": 16, "high": 64, "log": True},
                             "student.embedding_dim": {"type": "categorical", "choices": [8, 32]}}}


def test_plan_prints_trials_epochs_and_time_then_uses_its_calibration_cache(make_config, tmp_path):
    cfg = make_config(train={"epochs": 4, "batch_size": 64, "threads": 1},
                      sweep={"space": PLAN_SPACE, "num_samples": 8, "twins": 2,
                             "scheduler": {"grace_period": 1, "reduction_factor": 2}})
    raw = yaml.safe_load(cfg.read_text())
    cfg.write_text(yaml.safe_dump({**raw, "cache_dir": str(tmp_path / "cache")}))  # an empty calibration cache
    t0 = time.perf_counter()
    first = run_main("plan", str(cfg))
    first_s = time.perf_counter() - t0
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert "trials: 8 search + up to 2 finalist trials (0 reruns, 2 no-teacher twins)" in out
    assert "ASHA decides at epoch(s) 1, 2" in out
    # 8 trials to epoch 1, 1 + 7/2 = 4.5 on to epoch 2, 1 + 3.5/2 = 2.75 on to epoch 4: 18; the twins 2 x 4
    assert "trial-epochs: 40 worst case (all trials all epochs), 26 expected with ASHA" in out
    assert ("rows per epoch: 3,600 trained on (the largest trial; 3,600 labelled), 1,400 evaluated (validation "
            "400, test 1,000)") in out
    assert "timed now" in out and "wall time: ~" in out and "plus preparation" in out
    assert "plan: timing E8/H16/batch 64" in first.stderr
    assert json.loads((tmp_path / "cache" / "calibration.json").read_text())["entries"]

    t0 = time.perf_counter()
    second = run_main("plan", str(cfg))
    second_s = time.perf_counter() - t0
    assert second.returncode == 0, second.stderr
    assert "(cached, through the real training loop)" in second.stdout and "timing" not in second.stderr
    assert second_s < first_s


@pytest.mark.parametrize("args,expected", [
    (["/nonexistent/sweep.yaml"], "file not found"),
    (["CFG", "--set", "sweep.bogus=1"], "sweep.bogus: unknown key"),
    (["CFG", "--set", "sweep.resources.gpu=lots"], "sweep.resources.gpu: expected a number of GPUs"),
])
def test_plan_bad_input_exits_2_with_one_line(make_config, args, expected):
    cfg = make_config(sweep={"space": PLAN_SPACE})
    r = run_main("plan", *[str(cfg) if a == "CFG" else a for a in args])
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], r.stderr


def test_run_prints_the_plan_and_gpu_auto_runs_on_cpu_without_a_gpu(make_config, tmp_path, local_ray):
    cfg = make_config(train={"epochs": 1, "batch_size": 64, "threads": 1, "alpha": 1.0},
                      sweep={"num_samples": 1, "twins": 0, "resources": {"gpu": "auto"},
                             "space": {"parameters": {"student.hidden_dim": {"type": "categorical", "choices": [16]}}}})
    r = run_main("run", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    plan = [ln for ln in r.stderr.splitlines() if ln.startswith("plan: ")]
    assert "plan: 1 search + 0 finalist trials, 1 trial-epochs expected with ASHA (1 at most)" in plan[-2]
    assert plan[-1].startswith("plan: ~") and "expected" in plan[-1]
    assert "resources: gpu auto: no GPU in the cluster; running on CPU" in r.stderr
    assert "1 CPU + 0 GPU per trial" in r.stderr
    folder = tmp_path / "results" / "t"
    assert json.loads((folder / "gpu_sizing.json").read_text())["gpu_per_trial"] == 0.0
    assert "- GPU sizing (gpu: auto): largest trial ~" in (folder / "report.md").read_text()  # the report states it
    assert yaml.safe_load((folder / "config.yaml").read_text())["sweep"]["resources"]["gpu"] == "auto"
