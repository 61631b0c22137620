"""The PyTorch yardstick for `python -m lm.bench --torch`: the same model, written plainly.

A straightforward eager PyTorch Transformer with the bench config's shapes (RMSNorm, RoPE,
fused-softmax causal attention via F.scaled_dot_product_attention, gated MLP, AdamW), timed the
way lm.bench times the JAX step, so the two step times can be compared on the same machine in
the same run. Only the plain Llama-style options are supported; others raise, naming the key.
torch is a test/benchmark dependency (tests/requirements.txt), not a runtime one.
"""

from __future__ import annotations

import statistics
import time

import ml_collections

UNSUPPORTED = ('qk_norm', 'post_attn_norm', 'post_mlp_norm', 'final_logit_softcap',
               'attn_logit_softcap', 'sliding_window', 'scale_embeddings', 'norm_plus_one',
               'num_classes')


def check_supported(m: ml_collections.ConfigDict) -> None:
  for key in UNSUPPORTED:
    if m[key]:
      raise ValueError(f'config key model.{key}: not supported by the PyTorch reference '
                       f'(lm/torch_reference.py); benchmark without --torch')


def build(m: ml_collections.ConfigDict, seq_len: int):
  import torch
  from torch import nn
  import torch.nn.functional as F

  Dh = m.head_dim or m.d_model // m.n_heads
  H, K = m.n_heads, m.n_kv_heads
  act = F.silu if m.mlp_activation == 'silu' else (
      lambda x: F.gelu(x, approximate='tanh' if m.mlp_activation == 'gelu_tanh' else 'none'))

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      self.attn_norm, self.mlp_norm = nn.RMSNorm(m.d_model, m.norm_eps), nn.RMSNorm(m.d_model, m.norm_eps)
      self.qkv = nn.Linear(m.d_model, (H + 2 * K) * Dh, bias=False)
      self.o = nn.Linear(H * Dh, m.d_model, bias=False)
      self.gate_up = nn.Linear(m.d_model, 2 * m.mlp_dim, bias=False)
      self.down = nn.Linear(m.mlp_dim, m.d_model, bias=False)

    def forward(self, x, cos, sin):
      B, T, _ = x.shape
      q, k, v = self.qkv(self.attn_norm(x)).split([H * Dh, K * Dh, K * Dh], dim=-1)
      q, k, v = (t.view(B, T, -1, Dh).transpose(1, 2) for t in (q, k, v))
      rotate = lambda t: t * cos + torch.cat([-t[..., Dh // 2:], t[..., :Dh // 2]], -1) * sin
      y = F.scaled_dot_product_attention(rotate(q), rotate(k), v, is_causal=True,
                                         enable_gqa=K != H, scale=m.attn_scale or None)
      x = x + self.o(y.transpose(1, 2).reshape(B, T, H * Dh))
      gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
      return x + self.down(act(gate) * up)

  class Model(nn.Module):

    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(m.vocab_size, m.d_model)
      self.blocks = nn.ModuleList(Block() for _ in range(m.n_layers))
      self.final_norm = nn.RMSNorm(m.d_model, m.norm_eps)
      self.head = nn.Linear(m.d_model, m.vocab_size, bias=False)
      if m.tie_embeddings:
        self.head.weight = self.embed.weight
      inv_freq = 1.0 / (m.rope_base ** (torch.arange(0, Dh, 2).float() / Dh))
      angles = torch.arange(seq_len).float()[:, None] * inv_freq
      angles = torch.cat([angles, angles], -1)
      self.register_buffer('cos', angles.cos(), persistent=False)
      self.register_buffer('sin', angles.sin(), persistent=False)

    def forward(self, tokens, targets):
      x = self.embed(tokens)
      for block in self.blocks:
        x = block(x, self.cos, self.sin)
      logits = self.head(self.final_norm(x))
      return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

  return Model()


def benchmark(cfg: ml_collections.ConfigDict, steps: int, repeats: int) -> dict:
  """Median step time (fwd + bwd + AdamW) of the PyTorch model on a random batch."""
  import torch
  check_supported(cfg.model)
  torch.manual_seed(cfg.seed)
  B, T, V = cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size
  model = build(cfg.model, T)
  o = cfg.optim
  opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                          weight_decay=o.weight_decay)
  tokens = torch.randint(0, V, (B, T + 1))

  def train_step():
    loss = model(tokens[:, :-1], tokens[:, 1:])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float('inf'))
    opt.step()
    return loss

  train_step()  # Warm-up.
  medians = []
  for _ in range(repeats):
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      train_step()
      times.append(time.perf_counter() - t0)
    medians.append(statistics.median(times))
  return {'step_s': statistics.median(medians), 'threads': torch.get_num_threads(),
          'params': sum(p.numel() for p in model.parameters())}
