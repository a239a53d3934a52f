"""THE log-prob primitive: masked per-token log-probs of completion tokens, and nothing more.

Every method scores tokens through :func:`completion_logps` (policy, reference, old policy, SimPO's mean,
per-token PPO). One shift convention: ``loss_mask[b, t]`` marks token ``t`` of row ``b`` as a completion
token, and its log-prob ``log p(x_t | x_<t)`` is read from the hidden state at ``t - 1`` and stored at
position ``t`` of the output. So ``logps`` lines up with ``input_ids`` and ``loss_mask``.

Why not ``model(...).logits``: that builds a ``(B, T, V)`` tensor (V = 49k for SmolLM2: 16 x 512 tokens is
1.6 GB in fp32) for every position, prompt and padding included. Here the backbone runs once, the hidden
states of completion positions are gathered into ``(N, H)``, and the LM head, the model's own logit
transform (soft-capping, scaling), the temperature and the log-softmax run over chunks of
``chunk_size`` positions inside ``torch.utils.checkpoint``: autograd keeps no chunk's logits, and backward
recomputes one chunk at a time. Peak memory for logits is ``chunk_size x V``, whatever B and T are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from posttrain.host import host_values
from posttrain.model.lora import base_model
from posttrain.model.masks import causal_padding_mask
from posttrain.model.spans import SpanBatch, Spans, span_attention
from posttrain.packing import sequence_counts


@dataclass(frozen=True)
class TokenLogps:
    """Per-token completion log-probs of a batch, aligned with ``input_ids``.

    ``logps``: (B, T) float32 (float64 for a float64 model), 0 where ``mask`` is False.
    ``mask``: (B, T) bool. ``entropy``: (B, T) or None.
    """

    logps: Tensor
    mask: Tensor
    entropy: Tensor | None = None
    hidden: Tensor | None = None
    """(B, T, H) the decoder's last hidden states, when asked for (a value head on the policy's trunk)."""
    sequence: Tensor | None = None
    """Packed rows: (B, T) the completion each scored token belongs to (-1 elsewhere); None: one per row."""
    num_sequences: int = 0

    @property
    def sums(self) -> Tensor:
        """Summed log-prob of each completion: (B,) one per row, or (num_sequences,) when packed."""
        if self.sequence is None:
            return self.logps.sum(-1)
        return self._per_sequence(self.logps)

    @property
    def counts(self) -> Tensor:
        """Number of completion tokens of each completion (rows, or sequences when packed)."""
        return sequence_counts(self.mask, self.sequence, self.num_sequences)

    def _per_sequence(self, values: Tensor) -> Tensor:
        assert self.sequence is not None
        at = (self.mask & (self.sequence >= 0)).reshape(-1)
        out = values.new_zeros((self.num_sequences,))  # every position added, 0 off the mask: no device read
        return out.index_add(0, self.sequence.clamp(min=0).reshape(-1), torch.where(at, values.reshape(-1), 0.0))


@dataclass(frozen=True)
class PairLogps:
    """Per-pair summaries for the DPO family: summed log-probs and completion lengths, each (B,)."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor

    @classmethod
    def from_tokens(cls, tokens: TokenLogps) -> PairLogps:
        """Split a (2B, T) batch whose first B rows are chosen and last B rejected (the collator's order)."""
        sums, counts = tokens.sums, tokens.counts
        n = sums.shape[0] // 2
        return cls(sums[:n], sums[n:], counts[:n], counts[n:])

    def detach(self) -> PairLogps:
        return PairLogps(
            *(t.detach() for t in (self.chosen_logps, self.rejected_logps, self.chosen_lengths, self.rejected_lengths))
        )


def _logit_transform(config: object) -> tuple[float, float]:
    """(multiplier, soft-cap) that the model applies to ``lm_head`` output before returning logits.

    Covers the transforms used by transformers' causal LMs: Gemma-2/3 ``final_logit_softcapping``
    (``cap * tanh(x / cap)``), Cohere ``logit_scale`` (multiply) and Granite ``logits_scaling`` (divide).
    The tests compare against ``model(...).logits`` so a model family with another transform shows up.
    """
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    granite = getattr(config, "logits_scaling", None)
    if granite:
        scale /= float(granite)
    cap = float(getattr(config, "final_logit_softcapping", None) or 0.0)
    return scale, cap


def _chunk_logps(
    hidden: Tensor,
    targets: Tensor,
    head: nn.Module,
    scale: float,
    cap: float,
    temperature: float,
    with_entropy: bool,
) -> tuple[Tensor, Tensor]:
    logits = head(hidden)  # (n, V): the only place logits exist, one chunk at a time
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 up, fp64 kept
    if scale != 1.0:
        logits = logits * scale
    if cap:
        logits = torch.tanh(logits / cap) * cap
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = F.log_softmax(logits, dim=-1)
    token = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1) if with_entropy else token.new_zeros(())
    return token, entropy


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returns hidden states after the final norm) and the LM head of a causal LM."""
    inner = base_model(model)
    get_decoder = getattr(inner, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else getattr(inner, "base_model", None)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module) or decoder is inner:
        raise TypeError(f"{type(model).__name__} is not a causal LM with a decoder and an LM head")
    return decoder, head


def completion_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    position_ids: Tensor | None = None,
    with_hidden: bool = False,
    spans: Spans | None = None,
    sequence: Tensor | None = None,
    num_sequences: int = 0,
    span_kernel: str = "auto",
    scored: int | None = None,
) -> TokenLogps:
    """Log-probs of the tokens marked by ``loss_mask`` under ``model``, (B, T) aligned with ``input_ids``.

    Args:
        input_ids, attention_mask, loss_mask: (B, T); ``loss_mask[:, 0]`` must be False (the first token
            has no context to be scored from).
        temperature: logits are divided by it (online methods score with the sampling temperature).
        chunk_size: completion positions per LM-head chunk.
        with_entropy: also return the entropy of the (tempered) next-token distribution at each position.
        with_hidden: also return the decoder's hidden states (B, T, H), e.g. for a value head on the trunk.
        position_ids: (B, T) for PACKED rows (several sequences one after another, positions restarting at
            0 for each). The model is then called without ``attention_mask``, which makes transformers
            build a block-diagonal causal mask from the position resets: no token attends across sequences.
            The first token of each packed sequence must be off ``loss_mask``.
        spans, sequence, num_sequences: a packed or prefix-shared layout (:func:`posttrain.data.collate.
            pack_units`): attention runs inside each span block (:mod:`posttrain.model.spans`), and ``sums``
            and ``counts`` of the result are per ``sequence`` id instead of per row.
        scored: the number of scored tokens (``loss_mask[:, 1:].sum()``) when the caller knows it from the
            host: the completion positions are then gathered without reading the device.
        span_kernel: how span attention runs: ``auto``, ``loop`` or ``mask`` (:data:`posttrain.model.spans.
            SPAN_KERNELS`).
    """
    # Checked where it is free (a host tensor); on an accelerator it would cost a synchronisation per forward.
    if loss_mask.device.type == "cpu" and any(host_values(loss_mask[:, 0])):
        raise ValueError("loss_mask[:, 0] must be False: the first token cannot be scored")
    decoder, head = backbone_and_head(model)
    scale, cap = _logit_transform(model.config)
    # use_cache=False: scoring never needs a KV cache, and transformers only honours packed position_ids
    # (its block-diagonal mask) when no cache is passed around.
    if spans is not None:
        if position_ids is None:
            raise ValueError("spans need position_ids")
        with span_attention(model):
            batch = SpanBatch(spans, span_kernel)  # built once: every layer reuses its ids and mask
            out = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False, posttrain_spans=batch)
    elif position_ids is not None:
        out = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    else:
        mask = causal_padding_mask(model, attention_mask)
        out = decoder(input_ids=input_ids, attention_mask=mask, use_cache=False)
    hidden = out.last_hidden_state  # (B, T, H)
    select = loss_mask[:, 1:].bool()  # (B, T-1): position t-1 predicts token t
    if scored is None:  # boolean indexing: the output's size is read from the device
        h = hidden[:, :-1][select]  # (N, H)
        targets = input_ids[:, 1:][select]  # (N,)
    else:  # N counted on the host: the same rows in the same order, without a read
        where = torch.nonzero_static(select.reshape(-1), size=scored).squeeze(-1)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, where)
        targets = input_ids[:, 1:].reshape(-1).index_select(0, where)
    pieces, entropies = [], []
    # (With no completion token at all the head still runs, on 0 rows: every parameter gets a gradient, zero,
    # as FSDP2's reduce-scatter needs on each process.)
    for start in range(0, max(h.shape[0], 1), chunk_size):
        args = (
            h[start : start + chunk_size],
            targets[start : start + chunk_size],
            head,
            scale,
            cap,
            temperature,
            with_entropy,
        )
        if torch.is_grad_enabled():
            token, ent = checkpoint(_chunk_logps, *args, use_reentrant=False)
        else:
            token, ent = _chunk_logps(*args)
        pieces.append(token)
        entropies.append(ent)
    flat = torch.cat(pieces) if pieces else h.new_zeros((0,), dtype=torch.promote_types(h.dtype, torch.float32))
    mask = torch.zeros_like(loss_mask, dtype=torch.bool)
    mask[:, 1:] = select
    logps = torch.zeros(loss_mask.shape, dtype=flat.dtype, device=flat.device)
    logps = logps.masked_scatter(mask, flat)
    entropy = None
    if with_entropy:
        flat_ent = torch.cat(entropies) if entropies else flat.new_zeros((0,))
        entropy = torch.zeros_like(logps).masked_scatter(mask, flat_ent)
    return TokenLogps(
        logps=logps,
        mask=mask,
        entropy=entropy,
        hidden=hidden if with_hidden else None,
        sequence=sequence,
        num_sequences=num_sequences,
    )
