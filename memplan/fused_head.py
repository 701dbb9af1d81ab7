"""TRL's SFTTrainer step (`plan.trainer == "sft"`): the loss stage through TRL's fused, tiled LM head.

TRL 1.16's `SFTTrainer.__init__` patches the base model with `trl.trainer.utils.add_fused_lm_head(...,
outputs=("log_probs", "entropy", "is_top1"))`, and `SFTTrainer.compute_loss` calls the model with
`fused_lm_head=True`: the backbone runs, the LM head module is never called, and
`trl.kernels.chunked_logprob.ChunkedLogProbFunction` projects the hidden states through the head's
weight in tiles of [min(N, TOKEN_CHUNK) x VOCAB_CHUNK] into ONE preallocated buffer (`mm_buf`, full
VOCAB_CHUNK wide even for a smaller vocabulary), folding each tile into per-token online-logsumexp
statistics. The [tokens x vocab] logits never exist; `loss_type="chunked_nll"` is a deprecated alias
of the same "nll" (sft_config.py). Per step (N = B*(S-1) scored positions; n0 = min(N, 4096),
c0 = min(V, 32768); cd = the autocast dtype, else the hidden states'; a = the stream dtype):

forward (`ChunkedLogProbFunction.forward`)
- saved: the hidden states [N, H] (a copy: `last_hidden_state[:, :-1]` reshaped, or `hidden[mask]` on
  CUDA), the targets [N] int64 (`labels.clamp(min=0)`), log Z and the entropy [N] fp32;
- alive through it: the batch's labels [B, S] int64 (sliced), the label mask [B, S-1] bool, the final
  norm's output [B, S, H], seven fp32 statistics [N], `mm_buf` [n0, 32768] cd, the token chunk in cd
  [n0, H] (a copy unless a == cd), the weight's vocab chunk in cd [c, H] (a copy unless the head's
  weight is in cd) during its `torch.mm`;
- the fold: on CUDA a Triton kernel that allocates nothing (`_forward_kernel`); elsewhere torch ops
  (`_forward_tile`): at its peak z, e, e*z fp32 and one bool [n0, c0] (13 B per element) with four
  per-token temporaries (20 B per token).
backward (`ChunkedLogProbFunction.backward`)
- the gradient of the log-probs [N] fp32, grad_hidden [N, H] fp32 (zeros, accumulated in fp32),
  `mm_buf` again, the token and weight chunks in cd;
- the fold: Triton on CUDA (nothing allocated; `_addmm_fp32` accumulates with
  `torch.addmm(out_dtype=torch.float32, out=acc)`), else torch ops (`_backward_tile`: seven fp32 and
  one bool [n0, c0], 29 B per element, one fp32 more with a final soft-cap (Gemma-2), then
  `acc.addmm_(tile.float(), w_chunk.float())`);
- a new weight (token) chunk is made while the previous one is still bound: two alive at once when
  the vocabulary (tokens) span more than one chunk; at its end `grad_hidden.to(a)` (a copy unless fp32).

NB: the CUDA head scores only the positions whose label is not -100 (`hidden_states[mask]`): N here
counts every position (unpadded rows; a padded batch scores fewer). The metrics' scalars and the
per-token outputs made after the fold are not the peak and are left out (a few bytes per token).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .estimate import Moment, Step

#: trl 1.16 kernels/chunked_logprob.py TOKEN_CHUNK_SIZE: tokens per projection tile
TOKEN_CHUNK = 4096
#: trl 1.16 trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE: vocabulary entries per projection tile
VOCAB_CHUNK = 32768
#: per-token fp32 statistics `ChunkedLogProbFunction.forward` allocates (running max, sum of exp, x*exp,
#: exp^2, z sum, max before target, target logit)
STATS = 7


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - i) for i in range(0, total, size)]


def sft_kept(s: "Step") -> int:
    """The batch's labels [B, S] int64: `labels[:, 1:]` in `add_fused_lm_head`'s forward is the first op
    to see them, and the batch keeps them alive to the end of the step (the Trainer's `inputs`)."""
    return s.r(8 * s.plan.batch_size * s.plan.seq_len)


def sft_head_moments(s: "Step") -> list["Moment"]:
    """The loss stage of an SFTTrainer step: the candidate peaks of the fused head's forward and
    backward (see the module doc), in step order."""
    p, pr, r, m = s.plan, s.plan.precision, s.r, s.model
    B, S, H, V, T = p.batch_size, p.seq_len, m.hidden_size, m.vocab_size, s.tokens
    N = B * (S - 1)
    a = s.ap.stream_dt
    cd = pr.autocast or a
    w_dt = pr.params  # the head's weight: fp32 after prepare_model_for_kbit_training, else the load dtype
    cpu = p.device == "cpu"
    rows, widths = _chunks(N, TOKEN_CHUNK), _chunks(V, VOCAB_CHUNK)
    n0, c0 = rows[0], widths[0]
    hc = (lambda n: r(cd * n * H)) if cd != a else (lambda n: 0)       # hidden[ts:te].to(cd)
    wc = (lambda c: r(cd * c * H)) if cd != w_dt else (lambda c: 0)   # weight[start:end].to(cd)
    mm_buf = r(cd * n0 * VOCAB_CHUNK)
    labels, targets, saved_hidden = s.kept, r(8 * N), r(a * N * H)
    # CPU scores every position: `last_hidden_state[:, :-1].reshape(-1, H)` is a view when B == 1
    # (contiguous), which keeps the whole [1, S, H] output alive; else a copy (CUDA: `hidden[mask]`)
    view = cpu and B == 1
    gc_args = s.layer_args + m.num_layers * s.rng_state
    model_saved = s.model_saved - s.ap.head_bytes  # the LM head module never runs: no autocast weight copy
    fwd: list["Moment"] = []
    out = fwd

    # -- forward
    copies = s.ap.lora_weight_copies - (0 if p.gradient_checkpointing else s.ap.saved_copies)
    acts = (s.layers_saved + model_saved + copies + r(T * H * a) + labels + r(N) + (0 if view else saved_hidden)
            + targets + gc_args)
    temps = STATS * r(4 * N) + hc(n0)
    out.append(s.moment("sft_head_forward", None, s.ga_grads, acts, mm_buf, temps + wc(c0),
                        "the projection of the first tile"))
    if len(rows) > 1:
        out.append(s.moment("sft_head_forward", None, s.ga_grads, acts, mm_buf, temps + hc(rows[1]),
                            "the second token chunk cast"))
    if cpu:  # torch's fold (_forward_tile); on CUDA the Triton kernel allocates nothing
        out.append(s.moment("sft_head_forward", None, s.ga_grads, acts,
                            mm_buf + 3 * r(4 * n0 * c0) + r(n0 * c0), temps + r(8 * n0) + 3 * r(4 * n0),
                            "torch's fold of the first tile (CPU)"))

    # -- backward
    out = bwd = []
    # CUDA: `hidden_states[mask]`'s backward holds the bool mask
    acts = (s.layers_saved + model_saved + gc_args + s.small + labels + (r(T * H * a) if view else saved_hidden)
            + targets + 2 * r(4 * N) + (0 if cpu else r(N)))
    base = r(4 * N) + r(4 * N * H)  # the log-probs' gradient, grad_hidden (fp32)
    temps = base + hc(n0) + wc(c0)
    out.append(s.moment("sft_head_backward", None, s.ga_grads, acts, mm_buf, temps,
                        "the projection of the first tile"))
    if len(widths) > 1:  # the next vocabulary chunk cast while the previous one is bound
        out.append(s.moment("sft_head_backward", None, s.ga_grads, acts, mm_buf, temps + wc(widths[1]),
                            "the next vocabulary chunk cast"))
    if len(rows) > 1:  # the next token chunk: cast while the last one and the last weight chunk are bound
        out.append(s.moment("sft_head_backward", None, s.ga_grads, acts, mm_buf,
                            base + hc(n0) + hc(rows[1]) + wc(widths[-1]), "the next token chunk cast"))
        out.append(s.moment("sft_head_backward", None, s.ga_grads, acts, mm_buf,
                            base + hc(rows[1]) + wc(widths[-1]) + wc(c0), "the next token chunk's first weight chunk cast"))
    if cpu:  # torch's fold (_backward_tile), then acc.addmm_(tile.float(), w_chunk.float())
        # Gemma-2's final soft-capping keeps tanh's output t alive too (`grad * (1 - t * t)`)
        fp32 = 7 + (1 if m.final_logit_softcapping else 0)
        out.append(s.moment("sft_head_backward", None, s.ga_grads, acts, mm_buf + fp32 * r(4 * n0 * c0) + r(n0 * c0),
                            temps, "torch's fold of the first tile (CPU)"))
        if cd != 4:
            out.append(s.moment("sft_head_backward", None, s.ga_grads, acts, mm_buf + r(4 * n0 * c0),
                                temps + r(4 * c0 * H), "the fp32 gradient GEMMs of the first tile (CPU)"))
    if a != 4:  # grad_hidden.to(hidden.dtype), the last chunks still bound
        out.append(s.moment("sft_head_backward", None, s.ga_grads, acts, mm_buf,
                            base + r(a * N * H) + hc(rows[-1]) + wc(widths[-1]), "the hidden states' gradient cast"))
    # one moment per phase (their names key the phase peaks): the largest, the first on a tie
    return [max(ms, key=lambda mo: mo.allocated_bytes) for ms in (fwd, bwd)]
