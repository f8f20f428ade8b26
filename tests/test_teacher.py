"""The teacher: a scratch teacher learns; local save_pretrained models load; the logits cache is hit and
invalidated; bad teacher sources are refused; remote code never runs unless asked."""
import json
import shutil

import numpy as np
import pytest

from trainable.config import DataConfig, TeacherConfig
from trainable.data import load_corpus
from trainable.prepare import prepare
from trainable.teacher import TeacherError, get_logits, get_teacher, load_pretrained



def _quiet(msg):
    pass


def test_scratch_teacher_learns_and_logits_align(prepared):
    cfg, prep = prepared
    assert prep.teacher.metrics["val_acc"] > 0.62 and prep.teacher.metrics["test_acc"] > 0.62
    assert prep.logits["train"].shape == (len(prep.corpus.train), 2)
    assert prep.logits["val"].shape == (len(prep.corpus.val), 2)
    acc = (prep.logits["val"].argmax(1) == prep.corpus.val.labels).mean()
    assert acc == pytest.approx(prep.teacher.metrics["val_acc"], abs=1e-6)


def test_teacher_and_logits_cache_hit(prepared):
    cfg, prep = prepared
    msgs = []
    again = prepare(cfg, msgs.append)
    assert any("teacher: cache hit" in m for m in msgs) and any("teacher logits: cache hit" in m for m in msgs)
    assert np.array_equal(again.logits["train"], prep.logits["train"])


def test_logits_recomputed_when_data_changes(prepared, tmp_path, nsmc_dir):
    cfg, prep = prepared
    for name in ("ratings_train.txt", "ratings_test.txt"):
        lines = (nsmc_dir / name).read_text(encoding="utf-8").splitlines()[:2001]
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = DataConfig(dir=str(tmp_path), train_rows=1500)
    corpus = load_corpus(data, _quiet)
    msgs = []
    teacher = prep.teacher.members[0]
    get_logits(teacher, corpus, cfg.cache_dir, msgs.append)
    assert any("one pass" in m for m in msgs)
    with open(tmp_path / "ratings_train.txt", "a", encoding="utf-8") as f:
        f.write("424242\t완전히 새로운 리뷰\t1\n")
    changed = load_corpus(data, _quiet)
    msgs.clear()
    get_logits(teacher, changed, cfg.cache_dir, msgs.append)
    assert any("one pass" in m for m in msgs) and not any("cache hit" in m for m in msgs)


def test_logits_file_with_foreign_metadata_is_not_reused(prepared):
    import pyarrow.parquet as pq

    from trainable.teacher import logits_meta, logits_path

    cfg, prep = prepared
    teacher = prep.teacher.members[0]
    path = logits_path(logits_meta(teacher, prep.corpus.key, cfg.teacher.max_length), cfg.cache_dir)
    backup = path.read_bytes()
    tbl = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in tbl.schema.metadata.items()}
    pq.write_table(tbl.replace_schema_metadata({**meta, "checkpoint_hash": "another-teacher"}), path)
    try:
        msgs = []
        get_logits(teacher, prep.corpus, cfg.cache_dir, msgs.append)
        assert any("does not match" in m for m in msgs)
    finally:
        path.write_bytes(backup)


def test_local_save_pretrained_teacher_is_fine_tuned(prepared, tmp_path):
    """A teacher given by local path goes through the same from_pretrained code as a hub id."""
    cfg, prep = prepared
    local = tmp_path / "my-teacher"
    shutil.copytree(prep.teacher.members[0].path, local)
    tcfg = TeacherConfig(source=str(local), epochs=1, lr=1e-4, max_length=48)
    t = get_teacher(tcfg, prep.corpus, 2, tmp_path / "cache", _quiet)
    assert t.metrics["val_acc"] > 0.6
    assert json.loads((t.path / "teacher.json").read_text())["source"] == str(local)


def test_bad_teacher_sources(tmp_path, monkeypatch):
    import socket

    import huggingface_hub.constants
    import transformers

    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(TeacherError, match="is not a model folder"):
        load_pretrained(tmp_path / "not-a-model", 2)

    # An unknown hub id, offline: the cache only, so it fails at once instead of retrying the hub for ~50 s.
    # huggingface_hub reads HF_HUB_OFFLINE when first imported, so its constant is set too. Any connection
    # attempt is recorded (and refused), to show the hub is never reached for.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    tried = []

    def no_network(*args, **kwargs):
        tried.append(args)
        raise OSError("test: no network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(TeacherError, match="cannot load 'no-such-org-xyz/no-such-model'") as e:
        load_pretrained("no-such-org-xyz/no-such-model", 2)
    assert "\n" not in str(e.value)
    assert "HF_HUB_OFFLINE=1" not in str(e.value)  # offline already: nothing to suggest
    assert tried == []
    monkeypatch.undo()

    # A hub id while the network is down (simulated: the error Hugging Face raises then): the one line says what to
    # do. This fakes only the failure, not what we ship.
    def down(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                      "the cached files.\nCheck your internet connection (Failed to connect)")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # The first call that reaches for the hub is AutoConfig's (the head check); faking only the tokenizer's left
    # the real one to retry an unreachable hub for 23 s (1 + 2 + 4 + 8 + 8 s) before it failed the same way.
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", down)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", down)
    with pytest.raises(TeacherError, match="cannot load 'some-org/some-model'") as e:
        load_pretrained("some-org/some-model", 2)
    assert "\n" not in str(e.value)
    assert "couldn't connect" in str(e.value) and "set HF_HUB_OFFLINE=1" in str(e.value)
    assert "a local folder made by save_pretrained" in str(e.value)


def test_remote_code_is_not_run_unless_asked(prepared, tmp_path):
    cfg, prep = prepared
    evil = tmp_path / "evil"
    shutil.copytree(prep.teacher.members[0].path, evil)
    marker = tmp_path / "pwned"
    (evil / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    conf = json.loads((evil / "config.json").read_text())
    conf["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.Evil", "AutoConfig": "modeling_evil.C"}
    (evil / "config.json").write_text(json.dumps(conf))
    assert TeacherConfig().trust_remote_code is False
    try:
        load_pretrained(evil, 2)
    except TeacherError:
        pass
    assert not marker.exists()
    # Positive control: the same folder with trust_remote_code=True does run the code (the marker appears), so the
    # check above would see it if the default let remote code through. Loading may then fail (the module defines
    # no model): only the marker matters.
    try:
        load_pretrained(evil, 2, trust_remote_code=True)
    except Exception:
        pass
    assert marker.read_text() == "x"


def test_a_classifier_folder_with_another_number_of_labels_is_refused(prepared, tmp_path):
    """A folder saved as a 3-label classifier, for 2-label data: one line naming the folder and both counts (the
    head's shape mismatch was a traceback before)."""
    cfg, prep = prepared
    local = tmp_path / "three-labels"
    shutil.copytree(prep.teacher.members[0].path, local)
    config = json.loads((local / "config.json").read_text())
    assert any(a.endswith("ForSequenceClassification") for a in config["architectures"])
    config["id2label"] = {str(i): f"L{i}" for i in range(3)}
    config["label2id"] = {f"L{i}": i for i in range(3)}
    (local / "config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherError, match=r"is a classifier with 3 labels; the data has 2") as e:
        load_pretrained(local, 2)
    assert "\n" not in str(e.value)
