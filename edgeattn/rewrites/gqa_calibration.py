"""Calibrated GQA/MQA: merge each group of r adjacent KV heads into one, activation-aware.

Dimension legend: B batch, L tokens, N = B*L calibration tokens, E hidden (+1 when the
projections have a bias: inputs get a ones column), H query heads, G = new kv heads,
r source kv heads per group, D head dim, F = D/2 rotary frequency pairs.

The fits need only second moments C = X^T X / N [E, E] of the normed hidden states X
entering the attention: a linear signal s = X w has E|s|^2 = w^H C w. Two are kept per
layer: a uniform one (for the queries: every query matters) and one where each token
is weighted by the attention it receives (for keys and values, see
``_attention_weights``). All fits run in float64.

Keys with RoPE (rotate-half layout: channel d pairs with d + D/2). On pair f the key of
source head h is a complex signal z_hf = X w_hf. A complex scalar a commutes with the
rotation, so replacing z_hf by a_hf * u_f changes a score only through
``Re(q_f conj(a_hf u_f)) = Re((q_f conj(a_hf)) conj(u_f))``: conj(a_hf) is folded into
the rows of the query heads that read h, and the result is exact at every position
pair. u_f and a_hf are the rank-1 fit of the N x r matrix [s_hf z_hf], s_hf^2 the
mean square |q_f| of those query heads (averaged over relative rotations, a score
error on pair f is proportional to |q_f| |error|). With v the top right singular
vector, u_f = sum_h s_hf v_h z_hf: a complex combination of the source weights, so
again a projection of X.

Keys without RoPE (learned positions): the same with a general D x D map per head
(q . (T k) = (T^T q) . k, folded into W_q), weighted by the query covariance.

Values: the attention output is sum_q W_o,q (p_q . v_h(q)). With R_h^T R_h = M_h^T M_h
(M_h: the W_o blocks of the query heads reading h, stacked), an error e in v_h costs
||R_h e||. The top-D principal subspace P [rD, D] of y = [R_h v_h]_h gives
v_g = P^T y = sum_h P_h^T R_h W_v,h x and W_o,q <- W_o,q R_h^{-1} P_h. Then W_o is
refitted by ridge regression of the layer's original output on the merged heads'
outputs, shrunk towards that closed form (``_refit_output``).

Layers are fitted in order during one forward pass over the calibration ids (a
pre-hook merges layer l on the input that the already-merged layers 0..l-1 produce).

Invariants: with r == 1 every fit is exact (rank 1 of one column, a full-rank PCA;
no refit), so the rewrite leaves the logits unchanged. Merged keys and values are
rescaled to the RMS of their source heads (the inverse goes into the folded maps),
which keeps them in the range a later KV quantization calibrates for. The attention
weights assume full causal visibility: gqa runs first in ``edgeattn.rewrites.ORDER``.

Measured on SmolLM2-135M, 3 -> 1 kv heads, WikiText-2 test perplexity (4 x 512-token
windows; original 25.5, mean-pooling 43,804), calibrating on valid: closed form alone
184 (8k tokens, fitted on the original activations; 219 layer by layer); + attention
weights 151; + W_o refit 54 (8k) / 52 (16k tokens, fit ~2 min on 2 CPU cores). The
refit needs the inputs the merged layers really get: on the original activations it
gave 91 with one window at 748. Distillation (``_distil``), 200 steps of 512 tokens
(131k tokens, 8.7 min): 31.1.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from edgeattn.progress import report
from edgeattn.rewrites._swap import LayerChange, RewriteError, for_each_attention
from edgeattn.rewrites.kv_projections import NAME, set_kv_projections
from edgeattn.spec import AttentionSpec

# Fitting. Calibration ids are cut into sequences of CALIBRATION_WINDOW tokens, so the fit sees
# many sequence starts (attention sinks); more tokens than FIT_TOKENS are only used to distil.
CALIBRATION_WINDOW = 256
FIT_TOKENS = 16384
ATTENTION_WEIGHT_MIX = 0.5  # key/value token weights: this share attention-weighted, the rest uniform
GRAM_RIDGE = 1e-6  # relative ridge on the value/key weighting Grams, so R_h stays invertible
OUTPUT_REFIT_RIDGE = 0.1  # relative ridge of the W_o refit, towards the closed-form W_o

# Distillation (uptrain_steps > 0): one sequence of UPTRAIN_WINDOW tokens per step (shorter where learned
# positions end), ~7.4 s per step on 2 CPU cores (bf16 autocast, fused attention). On SmolLM2 it plateaus
# (docs/quality.md): +55% / +54% at 2048 after 10 / 30 minutes, as 512-token sequences reached before.
UPTRAIN_LR = 5e-4
UPTRAIN_WINDOW = 2048
UPTRAIN_BF16 = True  # autocast the forward passes to bf16
FEW_SEQUENCES = 8  # distilling on fewer calibration sequences than this is warned about (they repeat)
_clock = time.perf_counter  # what a budget in minutes is timed with
_log = logging.getLogger(__name__)

# Progress lines; the fit's is the step edgeattn.rewrites.rewrite announces, now with a layer count.
FIT_STEP = "rewriting attention: merging KV heads"
DISTIL_STEP = "rewriting attention: distilling the merged KV heads"


def calibrated_merge(model, spec: AttentionSpec, calibration: torch.Tensor | None) -> list[LayerChange]:
    """Merge every layer's kv heads into ``spec.kv_heads`` groups, fitted on ``calibration`` ids [B, T].

    With ``spec.uptrain_steps`` the merged model is then distilled towards a frozen copy of
    the model as it was before the merge, on the same ids.
    """
    if calibration is None:
        raise RewriteError("gqa_method='calibrated' needs calibration token ids (see edgeattn.evaluation.calibration)")
    if spec.uptrain_minutes is not None or (spec.uptrain_steps and spec.uptrain_window is None):
        raise RewriteError("resolve the distillation budget and sequence length first (resolve_uptrain)")
    teacher = copy.deepcopy(model).eval() if spec.uptrain_steps else None
    changes = _merge_during_forward(model, _windows(calibration[:, :FIT_TOKENS], CALIBRATION_WINDOW), spec.kv_heads)
    if teacher is not None:
        windows = _uptrain_windows(model, calibration, spec.uptrain_window)
        _distil(model, teacher, windows, spec.uptrain_steps)
        changes = [LayerChange(c.rewrite, c.layer, f"{c.change}, distilled {spec.uptrain_steps} steps of "
                               f"{windows[0].numel()} tokens") for c in changes]
    return changes


def resolve_uptrain(model, spec: AttentionSpec, calibration: torch.Tensor) -> AttentionSpec:
    """``spec`` with its distillation made explicit, so that a rebuild from it is exact: the sequence length
    (``UPTRAIN_WINDOW`` unless given) and, for a budget in minutes, the steps that fit on this machine.

    One step of ``model`` against itself is timed after a short warm-up pass (the fit that precedes
    distillation is not counted); the schedule and a rebuild then depend on the step count, not on the clock.
    The model is left as it was (its gradients cleared).
    """
    if not (spec.uptrain_steps or spec.uptrain_minutes):
        return spec
    window = spec.uptrain_window or UPTRAIN_WINDOW
    windows = _uptrain_windows(model, calibration, window)
    if len(windows) < FEW_SEQUENCES:
        _log.warning("distilling on %d sequence%s of calibration text (%d tokens): every step repeats them; "
                     "pass a longer --calibration-text", len(windows), "s" * (len(windows) > 1), calibration.numel())
    if spec.uptrain_minutes is None:
        return dataclasses.replace(spec, uptrain_window=window)
    with _attention_trainable(model):
        _distil_pass(model, model, windows[0][None, :16])  # warm-up: kernels, allocator
        started = _clock()
        _distil_pass(model, model, windows[0][None])
        seconds = _clock() - started
    steps = max(1, int(spec.uptrain_minutes * 60 / seconds))
    return dataclasses.replace(spec, uptrain_steps=steps, uptrain_minutes=None, uptrain_window=window)


def _uptrain_windows(model, calibration: torch.Tensor, window: int) -> list[torch.Tensor]:
    """The calibration ids cut into distillation sequences (within the model's learned positions)."""
    if model.pos_embed is not None:
        window = min(window, model.config.max_position_embeddings)
    return [w for w in calibration.reshape(-1).split(window) if w.numel() > 1]


def _distil_pass(student, teacher, ids: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token on ``ids`` [1, L], backpropagated into the student; returns the loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=UPTRAIN_BF16):
        with torch.no_grad():
            target = F.log_softmax(teacher(ids)[0].float(), dim=-1)
        log_probs = F.log_softmax(student(ids)[0].float(), dim=-1)
    loss = F.kl_div(log_probs, target, log_target=True, reduction="batchmean")
    loss.backward()
    return loss


def _windows(ids: torch.Tensor, window: int) -> torch.Tensor:
    """ids [B, T] -> [B * (T // window), window] (unchanged when T <= window)."""
    if ids.shape[1] <= window:
        return ids
    usable = ids.shape[1] // window * window
    return ids[:, :usable].reshape(-1, window)


def _merge_during_forward(model, ids: torch.Tensor, target: int) -> list[LayerChange]:
    """One forward pass over ``ids``; each attention is merged when its input arrives.

    The pre-hook of layer l fits it on the input produced by the merged layers 0..l-1 and
    swaps its projections before its own forward runs, so the pass continues through the
    merged layer and later layers are fitted on what they will really receive.
    """
    done: dict[int, str] = {}
    handles = []

    layers = len(model.attentions())

    def arm(index, attn) -> str:
        def hook(module, args):
            done[index] = _fit_layer(module, args, target)
            report(FIT_STEP, len(done), layers)

        handles.append(attn.register_forward_pre_hook(hook))
        return "armed"

    armed = for_each_attention(model, NAME, arm)
    report(FIT_STEP, 0, layers)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    missing = [change.layer for change in armed if change.layer not in done]
    if missing:
        raise RewriteError(f"calibrated GQA: layers {missing} were not reached by the calibration forward pass")
    return [LayerChange(NAME, change.layer, done[change.layer]) for change in armed]


def _fit_layer(attn, args: tuple, target: int) -> str:
    """args: the attention's forward arguments (x [B, L, hidden], start, ...)."""
    x, start = args[0], args[1]
    uniform = _second_moment(x, attn)
    if attn.num_kv_heads == target:  # exact: the fit only changes bases, nothing to weigh or refit
        return _merge_layer(attn, target, uniform, uniform)
    attended = _second_moment(x, attn, _attention_weights(attn, x, start))
    expected = attn.forward(*args)  # [B, L, hidden]: the layer's output before the merge
    change = _merge_layer(attn, target, uniform, (1 - ATTENTION_WEIGHT_MIX) * uniform + ATTENTION_WEIGHT_MIX * attended)
    _refit_output(attn, args, expected)
    return change


def _merge_layer(attn, target: int, cov: torch.Tensor, kv_cov: torch.Tensor) -> str:
    """Merge attn's kv heads into ``target``; ``cov`` weighs queries, ``kv_cov`` keys and values."""
    source, heads, dim = attn.num_kv_heads, attn.num_heads, attn.head_dim
    ratio, reads = source // target, heads // source  # kv heads per group, query heads per source kv head
    q_w = _augmented(attn.q_proj).view(heads, dim, -1)  # [H, D, E]
    k_w = _augmented(attn.k_proj).view(target, ratio, dim, -1)  # [G, r, D, E]
    v_w = _augmented(attn.v_proj).view(target, ratio, dim, -1)
    o_w = attn.o_proj.weight.detach().double().view(-1, heads, dim)  # [hidden, H, D]

    # Query head g*r*reads + j*reads + i reads source head g*r + j, i.e. index [g, j, i].
    if attn.rotary is not None:
        if attn.rotary.head_dim != dim:
            raise RewriteError(f"calibrated GQA needs RoPE on the whole head ({attn.rotary.head_dim} of {dim} channels)")
        new_k, q_maps = _merge_rotary_keys(k_w, q_w.view(target, ratio, reads, dim, -1), cov, kv_cov)
    else:
        query_cov = torch.einsum("hde,ef,hcf->hdc", q_w, cov, q_w).view(target, ratio, reads, dim, dim).sum(2)
        new_k, k_maps = _merge_subspace(k_w, query_cov, kv_cov)  # k_h ~ k_maps[h] @ u
        q_maps = k_maps.mT[:, :, None].expand(-1, -1, reads, -1, -1)  # q . (T u) = (T^T q) . u
    new_q = (q_maps.reshape(heads, dim, dim) @ q_w).reshape(heads * dim, -1)

    o_heads = o_w.permute(1, 0, 2)  # [H, hidden, D]
    stacked = o_heads.reshape(target, ratio, reads * o_w.shape[0], dim)  # M_h [G, r, reads*hidden, D]
    new_v, v_maps = _merge_subspace(v_w, stacked.mT @ stacked, kv_cov)  # v_h ~ v_maps[h] @ v_g
    o_maps = v_maps[:, :, None].expand(-1, -1, reads, -1, -1).reshape(heads, dim, dim)
    new_o = (o_heads @ o_maps).permute(1, 0, 2).reshape(o_w.shape[0], heads * dim)

    bias = attn.k_proj.bias is not None
    with torch.no_grad():
        _set_augmented(attn.q_proj, new_q)
        attn.o_proj.weight.copy_(new_o)
    set_kv_projections(attn, target, *_split(new_k.reshape(target * dim, -1), bias),
                       *_split(new_v.reshape(target * dim, -1), bias))
    return f"kv heads {source} -> {target} (calibrated)"


def _merge_rotary_keys(k_w: torch.Tensor, q_w: torch.Tensor, cov: torch.Tensor, kv_cov: torch.Tensor):
    """k_w [G, r, D, E], q_w [G, r, reads, D, E] -> merged keys [G, D, E], query maps [G, r, reads, D, D].

    Per pair a rank-1 complex fit s_h z_h ~ u conj(v_h), so z_h ~ a_h u with a_h = conj(v_h) / s_h,
    and the query map multiplies pair f by conj(a_h).
    """
    half = k_w.shape[-2] // 2
    cov_c, kv_c = cov.to(torch.complex128), kv_cov.to(torch.complex128)
    k_c = torch.complex(k_w[..., :half, :], k_w[..., half:, :])  # [G, r, F, E]
    q_c = torch.complex(q_w[..., :half, :], q_w[..., half:, :])  # [G, r, reads, F, E]
    q_power = _power(q_c, cov_c).sum(2)  # [G, r, F]: E|q_f|^2 summed over the reading query heads
    scale = q_power.clamp_min(1e-12 * q_power.mean()).sqrt()
    columns = (k_c * scale[..., None]).permute(0, 2, 3, 1)  # [G, F, E, r]: s_h w_h
    top = torch.linalg.eigh(columns.mH @ kv_c @ columns).eigenvectors[..., -1]  # [G, F, r]
    merged = (columns @ top[..., None])[..., 0]  # u weights [G, F, E]
    gain = (_power(k_c, kv_c).mean(1) / _power(merged, kv_c).clamp_min(1e-30)).sqrt()  # [G, F]
    merged = merged * gain[..., None]
    factor = top.mT / (scale * gain[:, None])  # conj(a_h) [G, r, F]
    re, im = factor.real, factor.imag
    maps = torch.zeros(*factor.shape[:2], 2 * half, 2 * half, dtype=torch.float64)
    pair = torch.arange(half)  # q_f * (re + i im) on channels (d, d + F)
    maps[..., pair, pair], maps[..., pair, pair + half] = re, -im
    maps[..., pair + half, pair], maps[..., pair + half, pair + half] = im, re
    new_k = torch.cat((merged.real, merged.imag), dim=-2)  # [G, D, E]
    return new_k, maps[:, :, None].expand(-1, -1, q_w.shape[2], -1, -1)


def _merge_subspace(w: torch.Tensor, weight_gram: torch.Tensor, cov: torch.Tensor):
    """Weighted PCA merge of w [G, r, D, E]; an error e of head h costs e^T weight_gram[h] e.

    Returns merged [G, D, E] and maps T [G, r, D, D] with source_h ~ T_h @ merged.
    """
    groups, ratio, dim, _ = w.shape
    eye = torch.eye(dim, dtype=torch.float64)
    ridge = GRAM_RIDGE * weight_gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[..., None, None]
    r = torch.linalg.cholesky(weight_gram + ridge * eye).mH  # upper, r^T r = gram
    y = (r @ w).reshape(groups, ratio * dim, -1)  # [G, rD, E]
    basis = torch.linalg.eigh(y @ cov @ y.mT).eigenvectors[..., -dim:]  # P [G, rD, D]
    merged = basis.mT @ y  # [G, D, E]
    maps = torch.linalg.solve_triangular(r, basis.reshape(groups, ratio, dim, dim), upper=True)
    source_power = torch.einsum("grde,ef,grdf->g", w, cov, w)[:, None] / (ratio * dim)
    gain = (source_power / torch.einsum("gde,ef,gdf->gd", merged, cov, merged).clamp_min(1e-30)).sqrt()  # [G, D]
    return merged * gain[..., None], maps / gain[:, None, None, :]


def _attention_weights(attn, x: torch.Tensor, start: int) -> torch.Tensor:
    """x [B, L, hidden] -> [B, L]: sum over queries of p(query -> token)^2, averaged over heads.

    An error e_n on the key/value of token n reaches query q's output as about p_qn e_n, and
    independent errors add in square, so token n matters in proportion to sum_q p_qn^2 (the
    attention sinks most). Full causal attention of the unmerged layer.
    """
    batch, length, _ = x.shape
    positions = torch.arange(start, start + length)
    q = attn.q_proj(x).view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)  # [B, H, L, D]
    k = attn.k_proj(x).view(batch, length, attn.num_kv_heads, attn.head_dim).transpose(1, 2)  # [B, Hkv, L, D]
    if attn.rotary is not None:
        q, k = attn.rotary.rotate(q, positions), attn.rotary.rotate(k, positions)
    k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    p = torch.softmax((q @ k.mT * attn.head_dim**-0.5).masked_fill(~causal, float("-inf")), dim=-1)  # [B, H, L, L]
    return p.square().sum(2).mean(1)


def _refit_output(attn, args: tuple, expected: torch.Tensor) -> None:
    """Refit W_o (and its bias) so the merged layer reproduces ``expected`` [B, L, hidden].

    Ridge regression on the merged heads' outputs, shrunk towards the closed-form W_o: the
    heads of an MQA layer read one value head, so their outputs are nearly collinear and an
    unshrunk fit amplifies small differences between them (measured: a few text windows'
    perplexity exploded).
    """
    heads_out = []
    handle = attn.o_proj.register_forward_pre_hook(lambda module, inputs: heads_out.append(inputs[0]))
    try:
        attn.forward(*args)
    finally:
        handle.remove()
    a = heads_out[0].reshape(-1, heads_out[0].shape[-1]).double()  # [N, H*D]
    if attn.o_proj.bias is not None:
        a = torch.cat((a, torch.ones(a.shape[0], 1, dtype=a.dtype)), dim=1)
    y = expected.reshape(-1, expected.shape[-1]).double()  # [N, hidden]
    gram = a.T @ a
    ridge = OUTPUT_REFIT_RIDGE * gram.diagonal().mean()
    prior = _augmented(attn.o_proj)  # [hidden, H*D(+1)]
    weight = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), a.T @ y + ridge * prior.T)
    with torch.no_grad():
        _set_augmented(attn.o_proj, weight.T)


def _second_moment(x: torch.Tensor, attn, weights: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, L, hidden] (token weights [B, L]) -> weighted mean of x x^T [E, E] in float64."""
    x = x.detach().reshape(-1, x.shape[-1]).double()
    if attn.k_proj.bias is not None:
        x = torch.cat((x, torch.ones(x.shape[0], 1, dtype=x.dtype)), dim=1)
    if weights is None:
        return x.T @ x / x.shape[0]
    w = weights.reshape(-1).double()
    return (x * w[:, None]).T @ x / w.sum()


def _power(w: torch.Tensor, cov_c: torch.Tensor) -> torch.Tensor:
    """E|X w|^2 for complex weight rows w [..., E]."""
    return torch.einsum("...e,ef,...f->...", w.conj(), cov_c, w).real


def _augmented(proj) -> torch.Tensor:
    """[out, in] weight, with the bias appended as a last column when there is one."""
    weight = proj.weight.detach().double()
    if proj.bias is None:
        return weight
    return torch.cat((weight, proj.bias.detach().double()[:, None]), dim=1)


def _split(weight: torch.Tensor, bias: bool):
    return (weight[:, :-1], weight[:, -1]) if bias else (weight, None)


def _set_augmented(proj, weight: torch.Tensor) -> None:
    w, b = _split(weight, proj.bias is not None)
    proj.weight.copy_(w)
    if b is not None:
        proj.bias.copy_(b)


def _distil(student, teacher, windows: list[torch.Tensor], steps: int) -> None:
    """Distil ``student`` towards ``teacher``'s next-token distributions on the calibration sequences.

    Loss KL(teacher || student) per token; AdamW with a cosine-decayed learning rate on the
    attention projections only (all else frozen); one sequence per step, cycling through them; bf16
    autocast (about 2x faster on CPUs with bf16 instructions), parameters and optimizer state stay float32.
    """
    with _attention_trainable(student) as trainable:
        optimizer = torch.optim.AdamW(trainable, lr=UPTRAIN_LR, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
        report(DISTIL_STEP, 0, steps)
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            _distil_pass(student, teacher, windows[step % len(windows)][None])
            optimizer.step()
            schedule.step()
            report(DISTIL_STEP, step + 1, steps)


@contextlib.contextmanager
def _attention_trainable(model) -> Iterator[list[torch.Tensor]]:
    """Within: only the attention projections require gradients (yielded); after: every flag as it was, no
    gradient left behind."""
    trainable = [p for attn in model.attentions()
                 for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj) for p in proj.parameters()]
    chosen = {id(p) for p in trainable}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(id(p) in chosen)
    try:
        yield trainable
    finally:
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)
