"""Masked-LM pre-training of the scratch teacher (trainable/pretrain.py) on real unlabeled NSMC reviews: the MLM
loss falls, the weights land in the classifier's encoder, the cache is hit by the same inputs and missed by other
texts, steps=0 does nothing, and a diverging loss raises."""
import itertools

import numpy as np
import pytest
import torch

from trainable.config import PretrainConfig, TeacherConfig
from trainable import teacher
from trainable.data import Corpus, Table
from trainable.pretrain import _read_encoder, pretrain_encoder

MAX_LENGTH = 48
CFG = PretrainConfig(steps=40, batch_size=32, lr=1e-3, warmup_ratio=0.1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: a model this small gains nothing from two, and two threads on busy shared cores can be
    fifty times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def texts(nsmc_dir) -> list[str]:
    """The first 2,000 unlabeled reviews, read in place."""
    with open(nsmc_dir / "unlabeled.txt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t", 1) for line in itertools.islice(f, 1, 2001)]
    return [r[1] if len(r) > 1 else "" for r in rows]


def _build(texts: list[str], arch: str):
    """A fresh tiny classifier and its tokenizer, made by the teacher's own builder (train_wordpiece is deterministic:
    the same texts give the same vocabulary in every build, so the pre-training cache can hit)."""
    table = Table(np.arange(len(texts)), texts, np.zeros(len(texts), dtype=np.int64))
    corpus = Corpus(train=table, val=table, test=table, key="test", files=("", ""))
    cfg = TeacherConfig(preset="tiny", arch=arch, vocab_size=2000, max_length=MAX_LENGTH)
    return teacher.build_scratch(cfg, corpus, num_classes=2, max_positions=MAX_LENGTH + 2)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["electra", "bert"])
def test_pretrain_learns_caches_and_reloads(texts, arch, tmp_path):
    model, tok = _build(texts, arch)
    init = _state(model.base_model)
    msgs = []
    metrics = pretrain_encoder(model, tok, texts, CFG, max_length=MAX_LENGTH, seed=0, cache_dir=tmp_path,
                               log=msgs.append)
    assert metrics["steps"] == CFG.steps and len(metrics["loss_curve"]) == CFG.steps  # 40 steps: one per point
    first, last = np.mean(metrics["loss_curve"][:5]), np.mean(metrics["loss_curve"][-5:])
    assert last < first - 0.5, (first, last)  # starts near ln(2000) = 7.6
    assert not any("cache hit" in m for m in msgs)

    trained = _state(model.base_model)
    moved = [k for k in init if not k.startswith("pooler.") and not torch.equal(init[k], trained[k])]
    assert "embeddings.word_embeddings.weight" in moved and "encoder.layer.1.output.dense.weight" in moved
    (folder,) = (tmp_path / "pretrained").iterdir()
    cached = _read_encoder(folder)
    assert all(torch.equal(cached[k], trained[k]) for k in cached)
    assert set(trained) - set(cached) == ({"pooler.dense.weight", "pooler.dense.bias"} if arch == "bert" else set())

    # A freshly built model with the same inputs: loaded from the cache, not trained.
    again, tok2 = _build(texts, arch)
    msgs.clear()
    assert pretrain_encoder(again, tok2, texts, CFG, max_length=MAX_LENGTH, seed=0, cache_dir=tmp_path,
                            log=msgs.append) == metrics
    assert any("cache hit" in m for m in msgs) and not any("pretrain step" in m for m in msgs)
    assert _equal(_state(again.base_model), trained)


def test_other_texts_miss_the_cache(texts, tmp_path):
    cfg = PretrainConfig(steps=3, batch_size=16)
    model, tok = _build(texts, "electra")
    pretrain_encoder(model, tok, texts[:1000], cfg, max_length=MAX_LENGTH, seed=0, cache_dir=tmp_path, log=print)
    model, tok = _build(texts, "electra")
    msgs = []
    pretrain_encoder(model, tok, texts[1000:], cfg, max_length=MAX_LENGTH, seed=0, cache_dir=tmp_path,
                     log=msgs.append)
    assert not any("cache hit" in m for m in msgs)
    assert len(list((tmp_path / "pretrained").iterdir())) == 2


def test_zero_steps_is_a_no_op(texts, tmp_path):
    model, tok = _build(texts[:200], "electra")
    init = _state(model)
    assert pretrain_encoder(model, tok, texts[:200], PretrainConfig(steps=0), max_length=MAX_LENGTH, seed=0,
                            cache_dir=tmp_path) == {}
    assert _equal(_state(model), init) and not (tmp_path / "pretrained").exists()


def test_diverging_loss_raises_and_caches_nothing(texts, tmp_path):
    model, tok = _build(texts[:500], "electra")
    cfg = PretrainConfig(steps=5, batch_size=16, lr=1e30, warmup_ratio=0.0)
    with pytest.raises(FloatingPointError, match="MLM loss is"):
        pretrain_encoder(model, tok, texts[:500], cfg, max_length=MAX_LENGTH, seed=0, cache_dir=tmp_path,
                         log=lambda m: None)
    assert not (tmp_path / "pretrained").exists() or not any((tmp_path / "pretrained").iterdir())
