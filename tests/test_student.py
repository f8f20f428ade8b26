"""The BiLSTM student: exact parameter count, and equivalence with a reference run of each review alone."""
import pytest
import torch

from trainable.student import BiLSTMClassifier, PortableBiLSTM, count_params, expected_params, state_dict_kb


@pytest.mark.parametrize("v,e,h,layers", [(3000, 64, 128, 1), (2000, 8, 26, 1), (9000, 128, 256, 1), (500, 16, 16, 2)])
def test_parameter_count_follows_from_the_layers(v, e, h, layers):
    m = BiLSTMClassifier(v, e, h, num_layers=layers)
    assert count_params(m) == expected_params(v, e, h, num_layers=layers)
    assert state_dict_kb(m) == pytest.approx(count_params(m) * 4 / 1024)
    assert set(dict(m.named_parameters())) == {n for n in m.state_dict()}  # no hidden buffers or extra layers


def _padded_batch(vocab=300, lengths=(12, 3, 7, 1, 9, 12)):
    torch.manual_seed(0)
    tokens = torch.randint(2, vocab, (len(lengths), max(lengths)))
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0
    return tokens, torch.tensor(lengths)


@pytest.mark.parametrize("layers", [1, 2])
def test_matches_reference_bidirectional_lstm_per_review(layers):
    """Padding must not leak into either direction: compare with nn.LSTM run on each review alone."""
    m = BiLSTMClassifier(300, 16, 24, num_layers=layers).eval()
    tokens, lengths = _padded_batch()
    out = m(tokens, lengths)
    ref = []
    for i, n in enumerate(lengths):
        _, (h, _) = m.lstm(m.embedding(tokens[i:i + 1, :n]))
        ref.append(m.fc(torch.cat([h[-2], h[-1]], dim=1)))
    torch.testing.assert_close(out, torch.cat(ref), atol=1e-5, rtol=1e-5)


def test_gradients_match_reference():
    m = BiLSTMClassifier(300, 16, 24, dropout=0.0)
    tokens, lengths = _padded_batch()
    m(tokens, lengths).sum().backward()
    fast = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    total = 0
    for i, n in enumerate(lengths):
        _, (h, _) = m.lstm(m.embedding(tokens[i:i + 1, :n]))
        total = total + m.fc(torch.cat([h[-2], h[-1]], dim=1)).sum()
    total.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, atol=1e-5, rtol=1e-4)


def test_portable_copy_traces_and_matches():
    m = BiLSTMClassifier(300, 16, 24).eval()
    traced = torch.jit.trace(PortableBiLSTM(m).eval(), _padded_batch())
    tokens, lengths = _padded_batch(lengths=(20, 5, 1))
    torch.testing.assert_close(traced(tokens, lengths), m(tokens, lengths))
