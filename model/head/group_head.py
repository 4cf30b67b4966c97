"""The group head: what the engine puts between the base model's final hidden states and its
LM head for rows of grouped questions. Two trained parts, either of which may be absent:
cross-sequence attention (CSA, with its gate) and the LM-head adapter. A head without CSA (the
"adapter-only" training control) is a `GroupHead` whose config has `use_csa` False.

Cross-sequence attention: each row of a group looks at the other rows' newest hidden state just
before the LM head, so questions about one passage can inform each other. For the final normed
hidden states h [B, d] of the newest token of every row:
    Q, K, V = h Wq, h Wk, h Wv                    (num_heads heads, no bias)
    a = softmax(Q K^T / sqrt(d_head) + mask) V Wo  (mask: same group, other row, row active)
    g = sigmoid(W2 GELU(W1 [LN(h); LN(a); LN(h) * LN(a)] + b1) + b2)   (per dimension)
    h' = h + g * a
Wo starts at zero, so an untrained head is exactly the identity. A row with no other active
row in its group (a group of one, or the last unfinished row) gets a = 0, hence h' = h.

The LM-head adapter has two optional parts, both the identity until trained and both leaving
the base LM head untouched (which matters for models that tie it to the input embeddings):
a residual MLP on the LM head's input, h'' = h' + W4 GELU(W3 LN(h') + b3) + b4 (W4, b4 start at
zero), applied at the end of `forward` for every row (groups of one too); and a low-rank delta
(h'' A) B added to the logits by `head_delta` (B starts at zero).

A checkpoint is a directory with `csa.safetensors` and `config.json` (the config's fields and,
under "meta", the training metadata); the shipped ones store the weights in fp16. The weights'
names are the attribute names below, so they must not change without converting checkpoints.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from model.head.files import CONFIG_FILE, WEIGHTS_FILE, CheckpointMismatchError

# the layers of cross-sequence attention and its gate (the rest of a head is the adapter)
CROSS_ATTENTION_LAYERS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "norm_h", "norm_a", "gate_in", "gate_out",
)


@dataclass(frozen=True)
class GroupHeadConfig:
    hidden_size: int
    num_heads: int = 8
    gate_bias_init: float = -3.0
    adapter_rank: int = 0  # 0: no low-rank logits delta
    head_mlp: int = 0  # hidden width of the residual MLP on the LM head's input; 0: none
    vocab_size: int = 0  # the adapter's output size; needed when adapter_rank > 0
    use_csa: bool = True  # False: the LM-head adapter alone (the training control)
    base_model: str = ""
    # values sampled from the base model's weights (model.weights.loading.weights_signature); empty:
    # not checked
    base_signature: tuple[float, ...] = ()

    @property
    def gate_hidden(self) -> int:
        return max(1, self.hidden_size // 4)


def read_checkpoint_config(directory: str | Path) -> tuple[GroupHeadConfig, dict]:
    """-> (config, training metadata) of the checkpoint in `directory`."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no CSA checkpoint at {directory} (missing {CONFIG_FILE})")
    fields = json.loads(path.read_text())
    meta = fields.pop("meta", {})
    fields["base_signature"] = tuple(fields.get("base_signature", ()))
    return GroupHeadConfig(**fields), meta


# how far a sampled weight may move and still be the same base model's: bf16 and fp16 keep 8
# and 11 significant bits of it, another base model differs in the leading ones
SIGNATURE_TOLERANCE = 2**-7


def signatures_match(expected: tuple[float, ...], actual: tuple[float, ...]) -> bool:
    """Whether two `weights_signature`s are of the same weights, whatever dtype each was
    loaded in."""
    return len(expected) == len(actual) and all(
        abs(a - b) <= SIGNATURE_TOLERANCE * max(abs(a), abs(b)) + 1e-6
        for a, b in zip(expected, actual))


class GroupHead(nn.Module):
    def __init__(self, config: GroupHeadConfig, meta: dict | None = None):
        super().__init__()
        if config.hidden_size % config.num_heads:
            raise ValueError(
                f"hidden size {config.hidden_size} is not divisible by {config.num_heads} heads"
            )
        self.config = config
        # training arguments, history, metrics: informational, saved with the checkpoint
        self.meta = dict(meta or {})
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = d // config.num_heads
        if config.use_csa:  # an adapter-only head carries no attention or gate weights
            self.q_proj = nn.Linear(d, d, bias=False)
            self.k_proj = nn.Linear(d, d, bias=False)
            self.v_proj = nn.Linear(d, d, bias=False)
            self.o_proj = nn.Linear(d, d, bias=False)
            self.norm_h = nn.LayerNorm(d)
            self.norm_a = nn.LayerNorm(d)
            self.gate_in = nn.Linear(3 * d, config.gate_hidden)
            self.gate_out = nn.Linear(config.gate_hidden, d)
        rank = config.adapter_rank
        if rank and config.vocab_size < 1:
            raise ValueError("an LM-head adapter needs the vocabulary size")
        self.adapter_down = nn.Linear(d, rank, bias=False) if rank else None
        self.adapter_up = nn.Linear(rank, config.vocab_size, bias=False) if rank else None
        self.head_mlp = (
            nn.Sequential(
                nn.LayerNorm(d), nn.Linear(d, config.head_mlp), nn.GELU(),
                nn.Linear(config.head_mlp, d),
            )
            if config.head_mlp
            else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.config.use_csa:
            nn.init.zeros_(self.o_proj.weight)
            nn.init.constant_(self.gate_out.bias, self.config.gate_bias_init)
        if self.adapter_up is not None:
            nn.init.zeros_(self.adapter_up.weight)
        if self.head_mlp is not None:
            nn.init.zeros_(self.head_mlp[-1].weight)
            nn.init.zeros_(self.head_mlp[-1].bias)

    def forward(
        self, h: torch.Tensor, group_ids: torch.Tensor, active: torch.Tensor
    ) -> torch.Tensor:
        """h: [B, d]; group_ids: [B] (rows with equal ids form a group); active: [B] bool.
        Returns the LM head's input [B, d]: CSA leaves inactive rows and rows without peers
        unchanged; the head MLP, when there is one, then applies to every row."""
        mixed = self.cross_attend(h, group_ids, active) if self.config.use_csa else h
        return mixed if self.head_mlp is None else mixed + self.head_mlp(mixed)

    def cross_attend(
        self, h: torch.Tensor, group_ids: torch.Tensor, active: torch.Tensor
    ) -> torch.Tensor:
        """The cross-sequence attention alone: h [B, d] -> h + g * a [B, d]."""
        batch = h.shape[0]
        # allowed[i, j]: row i may attend to row j
        allowed = (group_ids[:, None] == group_ids[None, :]) & active[None, :] & active[:, None]
        allowed &= ~torch.eye(batch, dtype=torch.bool, device=h.device)
        has_peer = allowed.any(dim=-1)
        if not bool(has_peer.any()):
            return h
        q, k, v = (
            proj(h).view(batch, self.num_heads, self.head_dim).transpose(0, 1)  # [H, B, Dh]
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        scores = q @ k.transpose(1, 2) / math.sqrt(self.head_dim)  # [H, B, B]
        scores = scores.masked_fill(~allowed, float("-inf"))
        # rows without peers would softmax over nothing (NaN): give them a dummy column, then zero
        weights = torch.softmax(scores.masked_fill(~has_peer[None, :, None], 0.0), dim=-1)
        mixed = (weights @ v).transpose(0, 1).reshape(batch, -1)  # [B, d]
        a = self.o_proj(mixed) * has_peer[:, None]
        ln_h, ln_a = self.norm_h(h), self.norm_a(a)
        gate = torch.sigmoid(
            self.gate_out(F.gelu(self.gate_in(torch.cat([ln_h, ln_a, ln_h * ln_a], dim=-1))))
        )
        return h + gate * a

    def logits(self, h: torch.Tensor, group_ids: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """What serving samples from and training fits: CSA over each group's rows (all
        active), the frozen LM head, then the adapter's delta. h [B, d] -> [B, vocab]."""
        mixed = self(h, group_ids, torch.ones_like(group_ids, dtype=torch.bool))
        logits = lm_head(mixed)
        delta = self.head_delta(mixed)
        return logits if delta is None else logits + delta

    def head_delta(self, h: torch.Tensor) -> torch.Tensor | None:
        """Low-rank logits correction [B, vocab], or None without an adapter."""
        if self.adapter_down is None or self.adapter_up is None:
            return None
        return self.adapter_up(self.adapter_down(h))

    def save(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """Writes the checkpoint; floating-point weights are stored in `dtype` when given (half
        precision halves the size; `load` returns them in fp32, the module's own dtype)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            name: (t.to(dtype) if dtype is not None and t.is_floating_point() else t)
            .detach().contiguous().cpu()
            for name, t in self.state_dict().items()
        }
        save_file(state, directory / WEIGHTS_FILE)
        fields = {**asdict(self.config), "meta": self.meta}
        (directory / CONFIG_FILE).write_text(json.dumps(fields, indent=2) + "\n")

    @classmethod
    def load(
        cls, directory: str | Path, base_model: str = "",
        base_signature: tuple[float, ...] = (),
        hidden_size: int | None = None,
    ) -> GroupHead:
        """Loads a checkpoint and refuses one made for another base model."""
        directory = Path(directory)
        config, meta = read_checkpoint_config(directory)
        if hidden_size is not None and config.hidden_size != hidden_size:
            raise CheckpointMismatchError(
                f"CSA checkpoint {directory} has hidden size {config.hidden_size}, "
                f"the base model has {hidden_size}"
            )
        if (base_signature and config.base_signature
                and not signatures_match(config.base_signature, base_signature)):
            raise CheckpointMismatchError(
                f"CSA checkpoint {directory} was trained on {config.base_model or 'another model'}"
                f", not on {base_model or 'this model'} (their weights differ)"
            )
        head = cls(config, meta)
        head.load_state_dict(load_file(directory / WEIGHTS_FILE))
        return head.eval().requires_grad_(False)
