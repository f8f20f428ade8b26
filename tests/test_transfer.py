"""Distillation that pays: the transfer set (file and augmentation), the loss on its rows, teacher ensembles and
their combination rule, per-member logits caches, two-stage distillation from an exported student, bad input."""
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import run_main, small_config
from trainable.config import ExperimentConfig, TeacherConfig
from trainable.data import NO_LABEL, DataError, augment_texts, load_corpus, read_texts
from trainable.losses import distillation_loss
from trainable.prepare import prepare, student_inputs
from trainable.teacher import combine, get_logits, get_teacher, log_softmax

NGRAM = {"source": "ngram", "ngram": {"max_features": 20000}}
SMALL_BILSTM = {"source": "bilstm", "epochs": 1, "vocab_size": 1000, "batch_size": 64,
                "bilstm": {"embedding_dim": 16, "hidden_dim": 16}}


def _quiet(msg):
    pass


@pytest.fixture
def transfer_file(nsmc_dir, tmp_path):
    """600 unlabeled reviews in unlabeled.txt's own format (id<TAB>document, header)."""
    lines = (nsmc_dir / "unlabeled.txt").read_text(encoding="utf-8").splitlines()[:601]
    path = tmp_path / "transfer.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cfg(nsmc_dir, cache_dir, tmp_path, teacher, **data) -> ExperimentConfig:
    section = {**teacher, "max_length": 48} if isinstance(teacher, dict) else {"source": teacher, "max_length": 48}
    raw = small_config(nsmc_dir, cache_dir, tmp_path / "results", data={"train_rows": 3000, **data}, teacher=section)
    return ExperimentConfig.model_validate(raw)


# ----------------------------------------------------------------------------- the loss on transfer rows


def test_transfer_rows_get_the_distillation_term_alone():
    """Row 0 is labelled (class 1), row 1 is a transfer row. Per row: alpha * [labelled] * CE + (1 - alpha) *
    T^2 * KL; the batch loss is the mean over both rows."""
    s = torch.tensor([[0.0, 1.0], [1.0, -1.0]])
    t = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    y = torch.tensor([1, NO_LABEL])
    T, alpha = 2.0, 0.3

    def softmax(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    kl = [sum(p * math.log(p / q) for p, q in zip(softmax(tv), softmax(sv))) for tv, sv in zip(t.tolist(), s.tolist())]
    ce0 = -math.log(math.exp(1.0) / (1 + math.exp(1.0)))
    expected = (alpha * ce0 + (1 - alpha) * T * T * kl[0] + (1 - alpha) * T * T * kl[1]) / 2
    total, parts = distillation_loss(s, t, y, alpha=alpha, temperature=T)
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce0 / 2, rel=1e-5)  # averaged over all rows of the batch
    assert parts["kd"].item() == pytest.approx((kl[0] + kl[1]) / 2, rel=1e-5)


def test_batch_of_transfer_rows_only_and_alpha_one():
    s, t = torch.randn(5, 2), torch.randn(5, 2)
    y = torch.full((5,), NO_LABEL)
    total, parts = distillation_loss(s, t, y, alpha=0.2, temperature=1.0)
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)
    assert parts["ce"].item() == 0.0
    assert total.item() == pytest.approx(0.8 * kl.item(), rel=1e-5)
    total, _ = distillation_loss(s, t, y, alpha=1.0, temperature=1.0)
    assert total.item() == 0.0  # no teacher: a row without a label teaches nothing


# ----------------------------------------------------------------------------- the transfer set


def test_transfer_file_formats_and_subsets(nsmc_dir, tmp_path, transfer_file):
    tsv = read_texts(transfer_file, "document")
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(tsv) + "\n", encoding="utf-8")
    assert read_texts(plain, "document") == tsv and len(tsv) == 600
    from trainable.config import DataConfig

    base = DataConfig(dir=str(nsmc_dir), train_rows=2000, transfer_file=str(transfer_file))
    full = load_corpus(base, _quiet)
    assert len(full.transfer) == 600 and set(full.transfer.labels) == {NO_LABEL}
    sub = load_corpus(base.model_copy(update={"transfer_rows": 100}), _quiet)
    assert sub.transfer.texts == full.transfer.texts[:100]  # nested seeded subsets
    assert sub.transfer_key != full.transfer_key and sub.key == full.key  # the labelled splits are untouched
    aug = load_corpus(DataConfig.model_validate({**base.model_dump(), "transfer_rows": 100, "augment": {"samples": 2}}),
                      _quiet)
    assert len(aug.transfer) == 100 + 2 * len(aug.train) and aug.transfer_file_rows == 100


def test_augmentation_is_seeded_and_follows_its_rules():
    texts = ["이 영화 정말 너무 재미있고 감동적이었다 최고", "별로"]
    a = augment_texts(texts, 3, 0.5, 0.5, 3, seed=1)
    assert a == augment_texts(texts, 3, 0.5, 0.5, 3, seed=1) and len(a) == 6
    assert augment_texts(texts, 2, 1.0, 0.0, 3, 0) == ["[MASK] " * 6 + "[MASK]"] * 2 + ["[MASK]"] * 2
    cut = augment_texts(texts[:1], 50, 0.0, 1.0, 3, 0)
    assert all(1 <= len(c.split()) <= 3 and c in texts[0] for c in cut)


def test_bad_transfer_files(nsmc_dir, tmp_path):
    from trainable.config import DataConfig

    with pytest.raises(DataError, match="transfer_file: nope.txt not found"):
        load_corpus(DataConfig(dir=str(nsmc_dir), train_rows=500, transfer_file="nope.txt"), _quiet)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok line\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"bad.txt:2: expected UTF-8"):
        read_texts(bad, "document")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="no text rows"):
        read_texts(empty, "document")
    csv = tmp_path / "t.csv"
    csv.write_text("id,text\n1,좋다\n", encoding="utf-8")
    with pytest.raises(DataError, match="missing column 'document'"):
        read_texts(csv, "document")


# ----------------------------------------------------------------------------- logits of the transfer rows


def test_transfer_logits_cached_and_recomputed_when_the_file_changes(nsmc_dir, tmp_path, transfer_file):
    cfg = _cfg(nsmc_dir, tmp_path / "cache", tmp_path, NGRAM, transfer_file=str(transfer_file))
    msgs = []
    first = prepare(cfg, msgs.append)
    assert first.logits["transfer"].shape == (600, 2)
    assert sum("teacher logits: wrote" in m for m in msgs) == 2  # labelled splits, transfer rows
    msgs.clear()
    again = prepare(cfg, msgs.append)
    assert sum("teacher logits: cache hit" in m for m in msgs) == 2 and not any("wrote" in m for m in msgs)
    assert np.array_equal(again.logits["transfer"], first.logits["transfer"])
    with open(transfer_file, "a", encoding="utf-8") as f:
        f.write("99999999\t이 영화 진짜 최악이다 돈 아깝다\n")
    msgs.clear()
    changed = prepare(cfg, msgs.append)
    assert sum("teacher logits: cache hit" in m for m in msgs) == 1  # the labelled splits' logits are kept
    assert sum("teacher logits: wrote" in m for m in msgs) == 1
    assert changed.logits["transfer"].shape == (601, 2)
    # The same reviews get the same logits (the transfer set's order is seeded by row count, so compare by text).
    by_text = dict(zip(first.corpus.transfer.texts, map(tuple, first.logits["transfer"])))
    for text, row in zip(changed.corpus.transfer.texts, changed.logits["transfer"]):
        if text in by_text:
            assert np.allclose(row, by_text[text], atol=1e-5)


def test_student_inputs_take_the_trials_transfer_rows(nsmc_dir, tmp_path, transfer_file):
    cfg = _cfg(nsmc_dir, tmp_path / "cache", tmp_path, NGRAM, transfer_file=str(transfer_file))
    prep = prepare(cfg, _quiet)
    enc = prep.encoded[cfg.tokenizer.vocab_size]
    data, logits = student_inputs(prep.encoded, prep.logits, cfg)
    assert len(data.transfer) == 600 and len(logits) == len(enc.train) + 600
    assert np.array_equal(logits[len(enc.train):], prep.logits["transfer"])
    few = cfg.model_copy(update={"data": cfg.data.model_copy(update={"transfer_rows": 50})})
    data, logits = student_inputs(prep.encoded, prep.logits, few)
    assert len(data.transfer) == 50 and np.array_equal(logits[len(enc.train):], prep.logits["transfer"][:50])
    assert np.array_equal(data.transfer.tokens, enc.transfer.take(np.arange(50)).tokens)
    twin = cfg.model_copy(update={"train": cfg.train.model_copy(update={"alpha": 1.0})})
    data, logits = student_inputs(prep.encoded, prep.logits, twin)
    assert data.transfer is None and logits is None  # no teacher: no transfer rows either

    from trainable.loop import train_student

    run = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1, "alpha": 0.1})})
    data, logits = student_inputs(prep.encoded, prep.logits, run)
    r = train_student(run.student, run.train, data, logits, log=_quiet)
    assert r.epochs == 1 and 0.5 < r.val_acc <= 1.0
    with pytest.raises(ValueError, match="transfer rows need teacher logits"):
        train_student(run.student, run.train.model_copy(update={"alpha": 1.0}), data, None, log=_quiet)


# ----------------------------------------------------------------------------- ensembles


def test_ensemble_logits_are_the_weighted_mean_of_member_log_probabilities(nsmc_dir, tmp_path, transfer_file):
    cfg = _cfg(nsmc_dir, tmp_path / "cache", tmp_path, [NGRAM, SMALL_BILSTM], transfer_file=str(transfer_file))
    cfg = cfg.model_copy(update={"teacher": TeacherConfig.model_validate(
        {**cfg.teacher.model_dump(), "weights": [3.0, 1.0]})})
    prep = prepare(cfg, _quiet)
    members = [get_logits(t, prep.corpus, cfg.cache_dir, _quiet) for t in prep.teacher.members]
    assert prep.teacher.weights == [0.75, 0.25]
    for split in ("train", "val", "test", "transfer"):
        expected = 0.75 * log_softmax(members[0][split]) + 0.25 * log_softmax(members[1][split])
        assert np.allclose(prep.logits[split], expected, atol=1e-5)
        assert np.isfinite(prep.logits[split]).all()
    # Chosen on validation: weights on the grid, and never worse there than the best member alone.
    chosen, w = combine(members, None, prep.corpus.val.labels)
    assert abs(sum(w) - 1) < 1e-9 and all(abs(10 * x - round(10 * x)) < 1e-9 for x in w)
    val_acc = lambda lg: (lg.argmax(1) == prep.corpus.val.labels).mean()  # noqa: E731
    assert val_acc(chosen["val"]) >= max(val_acc(m["val"]) for m in members)
    single, w1 = combine(members[:1], None, prep.corpus.val.labels)
    assert w1 == [1.0] and np.array_equal(single["train"], members[0]["train"])  # one teacher: its logits as is


def test_exported_student_teaches_the_next_stage(nsmc_dir, tmp_path):
    """A BiLSTM teacher is saved as a student folder; a folder like that (what `sweep export` writes) is a teacher
    source of its own, so a sweep's best student can teach the next sweep."""
    cfg = _cfg(nsmc_dir, tmp_path / "cache", tmp_path, SMALL_BILSTM)
    prep = prepare(cfg, _quiet)
    folder = tmp_path / "stage1"
    shutil.copytree(prep.teacher.members[0].path, folder)
    stage2 = TeacherConfig(source=str(folder), max_length=48)
    t = get_teacher(stage2, prep.corpus, 2, tmp_path / "cache2", _quiet)
    assert t.kind == "student"
    assert np.allclose(get_logits(t, prep.corpus, tmp_path / "cache2", _quiet)["val"], prep.logits["val"], atol=1e-5)


# ----------------------------------------------------------------------------- bad configs, from the CLI


@pytest.mark.parametrize("teacher, expected", [
    ({"source": []}, "teacher: source: an empty list"),
    ({"source": ["ngram", {"source": "bilstm", "epochs": -1}]}, "source[1]: epochs"),
    ({"source": ["ngram", {"preset": "tiny"}]}, "source[1]: a member mapping needs its own 'source'"),
    ({"source": ["ngram", "ngram"], "weights": [1.0]}, "weights: 1 given for 2 teacher(s)"),
    ({"source": ["ngram", {"source": "ngram", "colour": "red"}]}, "source[1]: colour"),
])
def test_bad_teacher_lists_exit_2(make_config, tmp_path, teacher, expected):
    path = make_config(teacher=teacher)
    r = run_main("train", str(path), "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "out").exists()


def test_missing_transfer_file_exits_2_and_leaves_nothing(make_config, tmp_path):
    path = make_config(data={"transfer_file": "no-such-file.txt"}, teacher=NGRAM, train={"alpha": 0.5})
    r = run_main("train", str(path), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: data.transfer_file: no-such-file.txt not found")
    assert not (tmp_path / "out").exists()
    raw = yaml.safe_load(path.read_text())
    raw["data"]["transfer_file"] = str(tmp_path / "bad.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    path.write_text(yaml.safe_dump(raw))
    r = run_main("train", str(path), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "bad.parquet: expected a Parquet file" in r.stderr


@pytest.mark.slow
def test_sweep_over_transfer_rows(make_config, tmp_path, transfer_file, local_ray):
    """A real sweep: the transfer set is prepared once for the most rows any trial takes, and each trial trains on
    its own `data.transfer_rows` (recorded per epoch); a no-teacher trial trains on the labelled rows alone."""
    import json

    space = {"parameters": {"data.transfer_rows": {"type": "categorical", "choices": [100, 300]},
                            "train.alpha": {"type": "categorical", "choices": [0.2, 1.0]}}}
    path = make_config(data={"transfer_file": str(transfer_file), "train_rows": 2000}, teacher=NGRAM,
                       train={"epochs": 1}, sweep={"space": space, "searcher": "grid", "scheduler": {"kind": "none"},
                                                  "twins": 0,
                                                  "max_concurrent": 2})
    r = run_main("run", str(path))
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp_path / "results" / "t"
    assert json.loads((folder / "teacher.json").read_text())["transfer_rows"] == 300
    seen = set()
    for params_file in folder.glob("*/params.json"):
        params = json.loads(params_file.read_text())
        last = json.loads((params_file.parent / "result.json").read_text().splitlines()[-1])
        want = 0 if params["train.alpha"] == 1.0 else params["data.transfer_rows"]
        assert last["transfer_rows"] == want
        seen.add((params["data.transfer_rows"], params["train.alpha"]))
    assert seen == {(100, 0.2), (300, 0.2), (100, 1.0), (300, 1.0)}


def test_scratch_teacher_pretrains_on_the_transfer_text(nsmc_dir, tmp_path, transfer_file):
    """teacher.pretrain: masked-LM on the transfer set + training text before fine-tuning, cached by hash: a new
    fine-tuning setting reuses the pre-trained encoder (same tokenizer from the tokenizer cache)."""
    raw = small_config(nsmc_dir, tmp_path / "cache", tmp_path / "results",
                       data={"train_rows": 1000, "transfer_file": str(transfer_file)},
                       teacher={"preset": "tiny", "epochs": 1, "max_length": 32, "vocab_size": 1000,
                                "pretrain": {"steps": 8, "batch_size": 16}})
    cfg = ExperimentConfig.model_validate(raw)
    msgs = []
    prep = prepare(cfg, msgs.append)
    assert prep.teacher.members[0].metrics["pretrain"]["steps"] == 8
    assert any("pretrain: masked-LM" in m for m in msgs)
    raw["teacher"]["lr"] = 3e-4  # another fine-tuning: a new teacher, the same pre-trained encoder
    msgs.clear()
    prepare(ExperimentConfig.model_validate(raw), msgs.append)
    assert any("pretrain: cache hit" in m for m in msgs) and not any("pretrain: masked-LM" in m for m in msgs)
