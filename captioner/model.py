"""The caption decoder: an LSTM whose gates see the image at every step.

Par-inject ("every", the default): the image feature v is projected once per image
(`image_proj` + dropout), and at every step the LSTM's gate pre-activations are

    gates_t = W_x·x_t + W_v·v' + W_hh·h_{t-1} + b

where x_t is the word embedding and v' the projected image. The weights are those of an `nn.LSTM`
whose input is the concatenation [x_t; v'] (`weight_ih_l0 = [W_x | W_v]`). Teacher-forced training runs
the whole caption through `nn.LSTM`, whose fused kernels beat a hand-written recurrence's per-step Python
even though that would compute the image term once (`scripts/bench/train.py` measures training
throughput). Decoding steps through `step`, which adds the precomputed image term W_v·v' and runs the
same recurrence by hand; without gradients or dropout it also looks the word term W_x·x_t up in a
(vocabulary, 4H) table instead of multiplying, which makes decoding faster (`scripts/bench/decode.py`;
docs/experiments.md, "Speed choices in the code"). `step` and `forward` give the same distributions
(tested).

Inject-first ("first", Show and Tell): v' is fed as the input of one step before `<start>` and never
again.

Tensor shapes are written as (batch, time, ...); "tokens" means the real (non-padding) positions of
a batch, packed time-major as `pack_padded_sequence` orders them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from captioner.config import ModelConfig

State = tuple[Tensor, Tensor, Tensor]  # (h (B, layers, H), c (B, layers, H), image gate term (B, 4H))


class CaptionDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.image_input not in ("every", "first"):
            raise ValueError(f"image_input must be 'every' or 'first', got {config.image_input!r}")
        if config.image_input == "first" and config.image_dim != config.embed_dim:
            raise ValueError("image_input='first' feeds the image as a word: image_dim must equal embed_dim")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.image_proj = nn.Linear(config.feature_dim, config.image_dim)
        self.dropout = nn.Dropout(config.dropout)
        lstm_input = config.embed_dim + (config.image_dim if config.image_input == "every" else 0)
        self.lstm = nn.LSTM(lstm_input, config.hidden_dim, num_layers=config.num_layers, batch_first=True,
                            dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.output = nn.Linear(config.hidden_dim, config.vocab_size)

    # ----------------------------------------------------------------------------------------- weights
    def _layer_weights(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """(W_ih (4H, in), W_hh (4H, H), bias (4H,)) of one LSTM layer; both biases summed."""
        lstm = self.lstm
        bias = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
        return getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}"), bias

    def _split_input_weights(self) -> tuple[Tensor, Tensor | None]:
        """Layer 0's input weights as (W_x (4H, E), W_v (4H, image_dim) or None)."""
        weight_ih, _, _ = self._layer_weights(0)
        embed_dim = self.config.embed_dim
        if self.config.image_input == "every":
            return weight_ih[:, :embed_dim], weight_ih[:, embed_dim:]
        return weight_ih, None

    # ------------------------------------------------------------------------------------ training
    def forward(self, image_features: Tensor, captions: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forced logits for every real next-token position.

        image_features (B, D); captions (B, T) = <start> w1 .. wn <end> <pad>..., sorted by length,
        longest first; lengths (B,) count <start> .. <end>. Returns (logits (tokens, V),
        targets (tokens,)) with padding left out, so padding costs no compute in the output layer.
        """
        steps = (lengths - 1).cpu()  # inputs are <start>..wn, targets w1..<end>
        inputs, targets = captions[:, :-1], captions[:, 1:]
        packed_targets = pack_padded_sequence(targets, steps, batch_first=True).data  # (tokens,)
        words = self.dropout(self.embed(inputs))  # (B, T-1, E)
        image = self.dropout(self.image_proj(image_features))  # (B, image_dim)
        hidden = self._run_nn_lstm(words, image, steps)  # (tokens, H)
        logits = self.output(self.dropout(hidden))  # (tokens, V)
        return logits, packed_targets

    def _run_nn_lstm(self, words: Tensor, image: Tensor, steps: Tensor) -> Tensor:
        if self.config.image_input == "every":
            inputs = torch.cat([words, image[:, None].expand(-1, words.size(1), -1)], dim=2)
            packed = pack_padded_sequence(inputs, steps, batch_first=True)
            return self.lstm(packed)[0].data
        inputs = torch.cat([image[:, None], words], dim=1)  # the image is the input of step -1
        outputs, _ = self.lstm(inputs)  # (B, 1+T, H); positions past each length are never read
        return pack_padded_sequence(outputs[:, 1:], steps, batch_first=True).data

    def lstm_dropout(self, x: Tensor) -> Tensor:
        return nn.functional.dropout(x, self.lstm.dropout, self.training)

    @staticmethod
    def _cell(gates: Tensor, h: Tensor, c: Tensor, weight_hh: Tensor) -> tuple[Tensor, Tensor]:
        gates = gates + h @ weight_hh.T  # (b, 4H)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c

    # ------------------------------------------------------------------------------------ decoding
    def init_state(self, image_features: Tensor) -> State:
        """Decoding state for a batch of images (B, D); the image gate term is computed here, once."""
        batch, hidden_dim, layers = image_features.size(0), self.config.hidden_dim, self.config.num_layers
        image = self.dropout(self.image_proj(image_features))  # (B, image_dim)
        w_x, w_v = self._split_input_weights()
        h = image.new_zeros(batch, layers, hidden_dim)
        c = image.new_zeros(batch, layers, hidden_dim)
        if w_v is not None:
            return h, c, image @ w_v.T  # (B, 4H)
        image_gates = image.new_zeros(batch, 4 * hidden_dim)
        first_input = image @ w_x.T + self._layer_weights(0)[2]
        h, c = self._step_layers(first_input, h, c)
        return h, c, image_gates

    def _step_layers(self, gates0: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """One time step through every layer. gates0 (B, 4H) is layer 0's input term."""
        new_h, new_c = [], []
        gates = gates0
        for layer in range(self.config.num_layers):
            weight_ih, weight_hh, bias = self._layer_weights(layer)
            if layer > 0:
                gates = self.lstm_dropout(new_h[-1]) @ weight_ih.T + bias
            h_l, c_l = self._cell(gates, h[:, layer], c[:, layer], weight_hh)
            new_h.append(h_l)
            new_c.append(c_l)
        return torch.stack(new_h, dim=1), torch.stack(new_c, dim=1)

    def _word_gate_table(self) -> Tensor:
        """W_x·embed(w) + b for every word w: (V, 4H), layer 0's word term of the gates, for decoding
        without dropout or gradients. Cached; rebuilt when the weights change (in-place updates bump a
        tensor's version; `.to()` and loading replace or rewrite the tensors)."""
        key = tuple((t.data_ptr(), 0 if t.is_inference() else t._version, t.dtype, t.device) for t in (
            self.embed.weight, self.lstm.weight_ih_l0, self.lstm.bias_ih_l0, self.lstm.bias_hh_l0))
        cached = getattr(self, "_word_gates", None)
        if cached is None or cached[0] != key:
            w_x, _ = self._split_input_weights()
            with torch.no_grad():
                table = self.embed.weight @ w_x.T + self._layer_weights(0)[2]
            self._word_gates = (key, table)
        return self._word_gates[1]

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """Feed one token per row (B,); return next-token log-probs (B, V) and the new state."""
        h, c, image_gates = state
        if self.training or torch.is_grad_enabled():
            w_x, _ = self._split_input_weights()
            # dropout as in forward(), so training-mode steps (SCST sampling) match teacher forcing
            gates0 = self.dropout(self.embed(tokens)) @ w_x.T + self._layer_weights(0)[2] + image_gates
        else:  # inference: a row lookup instead of a (B, E) x (E, 4H) product per step
            gates0 = self._word_gate_table().index_select(0, tokens) + image_gates
        h, c = self._step_layers(gates0, h, c)
        log_probs = torch.log_softmax(self.output(self.dropout(h[:, -1])), dim=-1)
        return log_probs, (h, c, image_gates)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
