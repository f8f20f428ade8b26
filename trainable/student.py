"""The BiLSTM student: Embedding -> bidirectional LSTM -> dropout -> Linear over [h_forward; h_backward].

The parameter count follows exactly from those three layers (`count_params` checks it against the formula),
because users compare it with published student sizes.

Batches are right-padded. A bidirectional `nn.LSTM` run over padding would start its backward direction on the
padding, so the final backward state would not be the one after each review's first token. `pack_padded_sequence`
fixes that but moves the CPU off PyTorch's fused LSTM kernel (2-3x slower here, see ../shared/PERF_NOTES.md).
For one layer we instead run the fused kernel twice through a unidirectional view of the same weights: forward over
the padded batch, backward over each review reversed in place (padding stays at the right), and read both states at
position length - 1. Deeper stacks, whose second layer needs both directions at every step, use packing.

tokenizers and trainable.data/io (they load pyarrow) are imported inside the functions that read a student folder, so
the model classes load with torch alone.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence


class BiLSTMClassifier(nn.Module):
    def __init__(self, vocab_size: int, embedding_dim: int, hidden_dim: int, num_classes: int = 2,
                 num_layers: int = 1, dropout: float = 0.3):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, num_layers, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * hidden_dim, num_classes)
        # A parameter-free helper whose weights are swapped in by functional_call; kept out of the module tree
        # (object.__setattr__) so it adds nothing to parameters() or the state dict.
        object.__setattr__(self, "_uni", nn.LSTM(embedding_dim, hidden_dim, 1, batch_first=True).requires_grad_(False))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 right-padded with 0, lengths (B,) int64 >= 1 -> logits (B, C)."""
        if self.lstm.num_layers == 1:
            h = self._encode_one_layer(tokens, lengths)
        else:
            h = self._encode_packed(tokens, lengths)
        return self.fc(self.dropout(h))  # (B, C)

    def _encode_one_layer(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        pos = torch.arange(T, device=tokens.device).expand(B, T)  # (B, T)
        last = (lengths - 1).unsqueeze(1)  # (B, 1)
        # Reverse each review's real tokens in place; padding stays at the right.
        rev_idx = torch.where(pos <= last, last - pos, pos)
        rev_tokens = tokens.gather(1, rev_idx)  # (B, T)
        w = self.lstm
        uni = self._uni.to(tokens.device) if self._uni.weight_ih_l0.device != tokens.device else self._uni
        fwd_params = {"weight_ih_l0": w.weight_ih_l0, "weight_hh_l0": w.weight_hh_l0,
                      "bias_ih_l0": w.bias_ih_l0, "bias_hh_l0": w.bias_hh_l0}
        bwd_params = {"weight_ih_l0": w.weight_ih_l0_reverse, "weight_hh_l0": w.weight_hh_l0_reverse,
                      "bias_ih_l0": w.bias_ih_l0_reverse, "bias_hh_l0": w.bias_hh_l0_reverse}
        out_f, _ = functional_call(uni, fwd_params, (self.embedding(tokens),))  # (B, T, H)
        out_b, _ = functional_call(uni, bwd_params, (self.embedding(rev_tokens),))  # (B, T, H)
        idx = last.unsqueeze(2).expand(B, 1, out_f.size(2))  # (B, 1, H)
        return torch.cat([out_f.gather(1, idx), out_b.gather(1, idx)], dim=2).squeeze(1)  # (B, 2H)

    def _encode_packed(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embedding(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)  # h_n (2 * layers, B, H)
        return torch.cat([h_n[-2], h_n[-1]], dim=1)  # (B, 2H): last layer, forward then backward


def expected_params(vocab_size: int, embedding_dim: int, hidden_dim: int, num_classes: int = 2,
                    num_layers: int = 1) -> int:
    """The parameter count implied by the three layers (PyTorch's LSTM has two bias vectors per gate set)."""
    lstm = 0
    for layer in range(num_layers):
        inp = embedding_dim if layer == 0 else 2 * hidden_dim
        lstm += 2 * (4 * hidden_dim * inp + 4 * hidden_dim * hidden_dim + 8 * hidden_dim)
    return vocab_size * embedding_dim + lstm + 2 * hidden_dim * num_classes + num_classes


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_dict_kb(model: nn.Module) -> float:
    """Size of the float32 state dict in KiB (what users compare with published student sizes)."""
    return sum(t.numel() * 4 for t in model.state_dict().values()) / 1024


class PortableBiLSTM(nn.Module):
    """The same computation as `BiLSTMClassifier` (one layer) with the two directions as plain unidirectional
    LSTMs, so it traces to TorchScript for serving without this package. Built from a trained student."""

    def __init__(self, student: BiLSTMClassifier):
        super().__init__()
        if student.lstm.num_layers != 1:
            raise ValueError("PortableBiLSTM supports one-layer students")
        e, h = student.lstm.input_size, student.lstm.hidden_size
        self.embedding = copy.deepcopy(student.embedding)
        self.fwd = nn.LSTM(e, h, 1, batch_first=True)
        self.bwd = nn.LSTM(e, h, 1, batch_first=True)
        with torch.no_grad():
            for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
                getattr(self.fwd, name).copy_(getattr(student.lstm, name))
                getattr(self.bwd, name).copy_(getattr(student.lstm, name + "_reverse"))
        self.fc = copy.deepcopy(student.fc)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        pos = torch.arange(T, device=tokens.device).unsqueeze(0).expand(B, T)
        last = (lengths - 1).unsqueeze(1)
        rev_tokens = tokens.gather(1, torch.where(pos <= last, last - pos, pos))
        out_f, _ = self.fwd(self.embedding(tokens))
        out_b, _ = self.bwd(self.embedding(rev_tokens))
        idx = last.unsqueeze(2).expand(B, 1, out_f.size(2))
        return self.fc(torch.cat([out_f.gather(1, idx), out_b.gather(1, idx)], dim=2).squeeze(1))


# ----------------------------------------------------------------------------- student folders

STUDENT_ARCH = "BiLSTMClassifier"


def is_student_folder(path) -> bool:
    """A folder written by `sweep export` (or a BiLSTM teacher built here): config.json naming the architecture."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("architecture") == STUDENT_ARCH
    except (OSError, ValueError, AttributeError):
        return False


def load_student_folder(path):
    """(model in eval mode, tokenizers.Tokenizer, meta) from a student folder: `student.pt` (a plain state dict,
    loaded with weights_only=True), `tokenizer.json`, `config.json`."""
    from tokenizers import Tokenizer

    path = Path(path)
    meta = json.loads((path / "config.json").read_text())
    model = BiLSTMClassifier(meta["vocab_size"], meta["embedding_dim"], meta["hidden_dim"], meta["num_classes"],
                             meta["num_layers"], meta["dropout"])
    model.load_state_dict(torch.load(path / "student.pt", map_location="cpu", weights_only=True))
    model.eval()
    return model, Tokenizer.from_file(str(path / "tokenizer.json")), meta


def init_from_lm(model: BiLSTMClassifier, folder: str | Path, tokenizer_file: str | Path) -> str:
    """Copy an exported LSTM language model (task lm) into a student: its embedding (the vocabularies must be the
    same tokenizer and the embedding sizes equal) and, when the hidden sizes match, its LSTM into the student's
    forward direction (layer 0). The backward direction and the classifier keep their initial weights. Returns a
    line saying what was copied."""
    from .data import DataError
    from .io import sha256_file

    folder = Path(folder)
    meta_path, weights_path = folder / "config.json", folder / "lm.pt"
    if not meta_path.is_file() or not weights_path.is_file():
        raise DataError(f"student.init_from: {folder} is not an exported language model (expected config.json and "
                         f"lm.pt from `sweep export` of an lm sweep)")
    if sha256_file(folder / "tokenizer.json") != sha256_file(tokenizer_file):
        raise DataError(f"student.init_from: the student's tokenizer is not the language model's; set "
                         f"tokenizer.file: {folder / 'tokenizer.json'}")
    lm = torch.load(weights_path, map_location="cpu", weights_only=True)
    emb = lm["embedding.weight"]
    if tuple(emb.shape) != tuple(model.embedding.weight.shape):
        raise DataError(f"student.init_from: the LM's embedding is {tuple(emb.shape)}, the student's "
                         f"{tuple(model.embedding.weight.shape)} (set student.embedding_dim to the LM's)")
    copied = ["embedding"]
    with torch.no_grad():
        model.embedding.weight.copy_(emb)
        names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
        if all(tuple(lm[f"lstm.{n}"].shape) == tuple(getattr(model.lstm, n).shape) for n in names):
            for n in names:
                getattr(model.lstm, n).copy_(lm[f"lstm.{n}"])
            copied.append("forward LSTM")
    return f"student: initialised {' and '.join(copied)} from the language model {folder}"
