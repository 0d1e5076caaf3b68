"""Calibrated GQA/MQA: merge each group of r adjacent KV heads into one, activation-aware.

Dimension legend: N calibration tokens, E hidden (+1 when the projections have a
bias: the inputs are augmented with a ones column), H query heads, r source kv
heads per group, D head dim, F = D/2 rotary frequency pairs.

Everything is fitted from one statistic per layer, the second moment C = X^T X [E, E]
of the normed hidden states X that enter the attention: any linear signal s = X w
has E|s|^2 = w^H C w. All fits run in float64.

Keys with RoPE (rotate-half layout: channel d pairs with d + D/2). On a pair f the
key of source head h is a complex signal z_hf = X w_hf. A complex scalar a commutes
with the rotation, so replacing z_hf by a_hf * u_f changes a score only through
``Re(q_f conj(a_hf u_f)) = Re((q_f conj(a_hf)) conj(u_f))``: conj(a_hf) is folded into
the query rows of the heads that read h, and the merge stays exact at every position.
u_f and a_hf are a rank-1 fit of the N x r matrix [s_hf z_hf], where s_hf^2 is the
mean square |q_f| of those query heads (averaged over relative rotations, a score
error on pair f is proportional to |q_f| |error|). The top right singular vector v
of that matrix makes u_f = sum_h s_hf v_h z_hf a complex combination of the source
weights, so it is a projection of X again.

Keys without RoPE (learned positions): the same with a general D x D map per head,
folded into W_q (q . (T k) = (T^T q) . k), and weights from the query covariance.

Values: the attention output is sum_q W_o,q (p_q . v_h(q)). With R_h^T R_h = M_h^T M_h
(M_h: the W_o blocks of the query heads reading h, stacked), an error e in v_h costs
||R_h e||. The top-D principal subspace P [rD, D] of y = [R_h v_h]_h gives
v_g = P^T y = sum_h P_h^T R_h W_v,h x, and W_o,q <- W_o,q R_h^{-1} P_h.

Invariants: with r == 1 every fit is exact (rank-1 of one column, a full-rank PCA),
so the rewrite leaves the logits unchanged; the merged keys/values are rescaled to
the RMS of the source heads (a free choice: the inverse goes into the folded maps),
which keeps them in the range later KV quantization calibrates for.

Statistics come from the model being merged, layer by layer: the inputs of layer l
are recorded after layers 0..l-1 have been merged, so each fit sees the activations
it will actually receive (measured better than fitting all layers on the original
model; see ``SEQUENTIAL``). ``uptrain_steps`` then distils the merged model
towards a frozen copy of the original (``_distil``).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from edgeattn.rewrites._swap import LayerChange, RewriteError, for_each_attention
from edgeattn.rewrites.gqa import NAME, set_kv_projections
from edgeattn.spec import AttentionSpec

SEQUENTIAL = True  # fit layer l on the inputs produced by the already-merged layers 0..l-1
CALIBRATION_WINDOW: int | None = None  # split the calibration ids into sequences of this many tokens
RIDGE = 1e-6  # relative ridge on the weighting Grams, so R_h stays invertible
ATTN_WEIGHT = None  # None | "p" | "p2": weight key/value tokens by the attention they receive
ATTN_WEIGHT_MIX = 0.5
REFIT_O = False
UPTRAIN_LR = 1e-4
UPTRAIN_WINDOW = 512  # tokens per distillation sequence


def calibrated_merge(model, spec: AttentionSpec, calibration: torch.Tensor | None) -> list[LayerChange]:
    """Merge every layer's kv heads into ``spec.kv_heads`` groups, fitted on ``calibration`` ids [B, T]."""
    if calibration is None:
        raise RewriteError("gqa_method='calibrated' needs calibration token ids (see edgeattn.calibration)")
    teacher = copy.deepcopy(model).eval() if spec.uptrain_steps else None
    target = spec.kv_heads
    calibration = _windows(calibration, CALIBRATION_WINDOW)
    if SEQUENTIAL:
        changes = _merge_during_forward(model, calibration, target)
    else:
        covariances = _input_covariances(model, calibration)
        changes = for_each_attention(model, NAME, lambda index, attn: _merge_layer(attn, target, covariances[index]))
    if teacher is not None:
        _distil(model, teacher, calibration, spec.uptrain_steps)
    return changes


def _windows(ids: torch.Tensor, window: int | None) -> torch.Tensor:
    """ids [B, T] -> [B * (T // window), window] (unchanged when window is None or >= T)."""
    if window is None or window >= ids.shape[1]:
        return ids
    usable = ids.shape[1] // window * window
    return ids[:, :usable].reshape(-1, window)


def _merge_during_forward(model, calibration: torch.Tensor, target: int) -> list[LayerChange]:
    """One forward pass over the calibration ids; each attention is merged when its input arrives.

    A pre-hook fits layer l on the input it receives (produced by the already-merged layers
    0..l-1) and swaps its projections before its own forward runs, so the pass continues
    through the merged layer.
    """
    done: dict[int, str] = {}
    handles = []

    def arm(index, attn) -> str:
        def hook(module, args):
            x = args[0]
            cov = _second_moment(x, module)
            kv_cov = cov
            if ATTN_WEIGHT:
                w = _attention_received(module, x, args[1], ATTN_WEIGHT)
                kv_cov = (1 - ATTN_WEIGHT_MIX) * cov + ATTN_WEIGHT_MIX * _second_moment(x, module, w)
            if REFIT_O:
                with torch.no_grad():
                    y_ref = module.forward(*args)
            done[index] = _merge_layer(module, target, cov, kv_cov)
            if REFIT_O:
                _refit_o(module, args, y_ref)
        handles.append(attn.register_forward_pre_hook(hook))
        return "armed"

    armed = for_each_attention(model, NAME, arm)
    try:
        with torch.no_grad():
            model(calibration)
    finally:
        for handle in handles:
            handle.remove()
    missing = [change.layer for change in armed if change.layer not in done]
    if missing:
        raise RewriteError(f"calibrated GQA: layers {missing} were not reached by the calibration forward pass")
    return [LayerChange(NAME, change.layer, done[change.layer]) for change in armed]


def _attention_received(attn, x, start, kind):
    b, l, _ = x.shape
    pos = torch.arange(start, start + l)
    q = attn._heads(attn.q_proj(x), attn.num_heads)
    k = attn._heads(attn.k_proj(x), attn.num_kv_heads)
    if attn.rotary is not None:
        q, k = attn.rotary.rotate(q, pos), attn.rotary.rotate(k, pos)
    scores = q @ attn._repeat_kv(k).transpose(-1, -2) * attn.head_dim ** -0.5
    mask = torch.ones(l, l, dtype=torch.bool).tril()
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)  # [B, H, L, N]
    if kind == "p2":
        p = p * p
    return p.sum(2).mean(1)  # [B, N]


def _refit_o(attn, args, y_ref):
    seen = []
    handle = attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            attn.forward(*args)
    finally:
        handle.remove()
    a = seen[0].reshape(-1, seen[0].shape[-1]).double()
    y = y_ref.reshape(-1, y_ref.shape[-1]).double()
    if attn.o_proj.bias is not None:
        a = torch.cat((a, torch.ones(a.shape[0], 1, dtype=a.dtype)), 1)
    else:
        pass
    gram = a.T @ a
    gram += 1e-6 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram, a.T @ y).T  # [hidden, H*D(+1)]
    with torch.no_grad():
        _set_augmented(attn.o_proj, w, attn.o_proj.bias is not None)


def _merge_layer(attn, target: int, cov: torch.Tensor, kv_cov: torch.Tensor | None = None) -> str:
    if kv_cov is None:
        kv_cov = cov
    source, heads, dim = attn.num_kv_heads, attn.num_heads, attn.head_dim
    ratio, reads = source // target, heads // source  # kv heads per group, query heads per source kv head
    q_w = _augmented(attn.q_proj).view(heads, dim, -1)  # [H, D, E]
    k_w = _augmented(attn.k_proj).view(target, ratio, dim, -1)  # [G, r, D, E]
    v_w = _augmented(attn.v_proj).view(target, ratio, dim, -1)
    o_w = attn.o_proj.weight.detach().double().view(-1, heads, dim)  # [hidden, H, D]

    if attn.rotary is not None:
        if attn.rotary.head_dim != dim:
            raise RewriteError(f"calibrated GQA needs RoPE over the whole head ({attn.rotary.head_dim} of {dim} channels)")
        new_k, q_maps = _merge_rotary_keys(k_w, q_w.view(target, ratio, reads, dim, -1), cov, kv_cov)
    else:
        query_cov = torch.einsum("hde,ef,hcf->hdc", q_w, cov, q_w).view(target, ratio, reads, dim, dim).sum(2)
        new_k, k_maps = _merge_subspace(k_w, query_cov, kv_cov)  # k_h ~ k_maps[h] @ u
        q_maps = k_maps.transpose(-1, -2)[:, :, None].expand(-1, -1, reads, -1, -1)  # q' = T^T q
    new_q = (q_maps.reshape(heads, dim, dim) @ q_w).reshape(heads * dim, -1)

    o_blocks = o_w.permute(1, 0, 2).reshape(target, ratio, reads * o_w.shape[0], dim)  # M_h [G, r, reads*hidden, D]
    new_v, v_maps = _merge_subspace(v_w, o_blocks.transpose(-1, -2) @ o_blocks, kv_cov)  # v_h ~ v_maps[h] @ v_g
    maps = v_maps[:, :, None].expand(-1, -1, reads, -1, -1).reshape(heads, dim, dim)
    new_o = (o_w.permute(1, 0, 2) @ maps).permute(1, 0, 2).reshape(o_w.shape[0], heads * dim)

    bias = attn.k_proj.bias is not None
    new_k, new_v = new_k.reshape(target * dim, -1), new_v.reshape(target * dim, -1)
    with torch.no_grad():
        _set_augmented(attn.q_proj, new_q, bias)
        attn.o_proj.weight.copy_(new_o)
    set_kv_projections(attn, target, *_split(new_k, bias), *_split(new_v, bias))
    return f"kv heads {source} -> {target} (calibrated)"


def _merge_rotary_keys(k_w: torch.Tensor, q_w: torch.Tensor, cov: torch.Tensor, kv_cov: torch.Tensor):
    """k_w [G, r, D, E], q_w [G, r, reads, D, E] -> merged keys [G, D, E], query maps [G, r, reads, D, D].

    Per pair f a rank-1 complex fit: s_h z_h ~ u conj(v_h), so z_h ~ a_h u with a_h = conj(v_h)/s_h.
    """
    half = k_w.shape[-2] // 2
    cov_c, kv_c = cov.to(torch.complex128), kv_cov.to(torch.complex128)
    k_c = torch.complex(k_w[..., :half, :], k_w[..., half:, :])  # [G, r, F, E]
    q_c = torch.complex(q_w[..., :half, :], q_w[..., half:, :])  # [G, r, reads, F, E]
    q_power = _power(q_c, cov_c).sum(2)  # [G, r, F]: sum over reading query heads of E|q_f|^2
    scale = q_power.clamp_min(1e-12 * q_power.mean()).sqrt()
    weights = (k_c * scale[..., None]).permute(0, 2, 3, 1)  # [G, F, E, r]: columns s_h w_h
    gram = weights.mH @ kv_c @ weights  # [G, F, r, r]
    top = torch.linalg.eigh(gram).eigenvectors[..., -1]  # [G, F, r]
    merged = (weights @ top[..., None])[..., 0]  # [G, F, E]
    # Rescale u to the RMS of the source keys; a_h absorbs the inverse.
    gain = (_power(k_c, kv_c).mean(1) / _power(merged, kv_c).clamp_min(1e-30)).sqrt()  # [G, F]
    merged = merged * gain[..., None]
    multiplier = top.transpose(1, 2) / (scale * gain[:, None])  # conj(a_h) [G, r, F]
    re, im = multiplier.real, multiplier.imag
    # q_f * (re + i im) on the pair (d, d + F) as a real D x D map.
    maps = torch.zeros(*re.shape[:2], 2 * half, 2 * half, dtype=torch.float64)
    idx = torch.arange(half)
    maps[..., idx, idx], maps[..., idx, idx + half] = re, -im
    maps[..., idx + half, idx], maps[..., idx + half, idx + half] = im, re
    new_k = torch.cat((merged.real, merged.imag), dim=-2)  # [G, D, E]
    reads = q_w.shape[2]
    return new_k, maps[:, :, None].expand(-1, -1, reads, -1, -1)


def _merge_subspace(w: torch.Tensor, weight_gram: torch.Tensor, cov: torch.Tensor):
    """Weighted PCA merge. w [G, r, D, E], weight_gram [G, r, D, D] (error e costs e^T gram e).

    Returns merged [G, D, E] and maps T [G, r, D, D] with source_h ~ T_h @ merged.
    """
    groups, ratio, dim, _ = w.shape
    eye = torch.eye(dim, dtype=torch.float64)
    ridge = RIDGE * weight_gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[..., None, None]
    r = torch.linalg.cholesky(weight_gram + ridge * eye).mH  # upper, r^T r = gram
    y = (r @ w).reshape(groups, ratio * dim, -1)  # [G, rD, E]
    basis = torch.linalg.eigh(y @ cov @ y.mT).eigenvectors[..., -dim:]  # [G, rD, D]
    merged = basis.mT @ y  # [G, D, E]
    maps = torch.linalg.solve_triangular(r, basis.reshape(groups, ratio, dim, dim), upper=True)
    # Per merged channel, rescale to the RMS of the source channels; the maps absorb the inverse.
    source_power = torch.einsum("grde,ef,grdf->g", w, cov, w)[:, None] / (ratio * dim)
    merged_power = torch.einsum("gde,ef,gdf->gd", merged, cov, merged).clamp_min(1e-30)
    gain = (source_power / merged_power).sqrt()  # [G, D]
    return merged * gain[..., None], maps / gain[:, None, None, :]


def _power(w: torch.Tensor, cov_c: torch.Tensor) -> torch.Tensor:
    """E|X w|^2 for complex weight rows w [..., E]."""
    return torch.einsum("...e,ef,...f->...", w.conj(), cov_c, w).real


def _augmented(proj) -> torch.Tensor:
    weight = proj.weight.detach().double()
    if proj.bias is None:
        return weight
    return torch.cat((weight, proj.bias.detach().double()[:, None]), dim=1)


def _split(weight: torch.Tensor, bias: bool):
    return (weight[:, :-1], weight[:, -1]) if bias else (weight, None)


def _set_augmented(proj, weight: torch.Tensor, bias: bool) -> None:
    w, b = _split(weight, bias)
    proj.weight.copy_(w)
    if b is not None:
        proj.bias.copy_(b)


def _second_moment(x: torch.Tensor, attn, weights=None) -> torch.Tensor:
    """x [B, L, hidden] -> X^T X / N [E, E] in float64 (ones column appended when the projections have a bias)."""
    x = x.detach().reshape(-1, x.shape[-1]).double()
    if attn.k_proj.bias is not None:
        x = torch.cat((x, torch.ones(x.shape[0], 1, dtype=x.dtype)), dim=1)
    if weights is None:
        return x.T @ x / x.shape[0]
    w = weights.reshape(-1).double()
    return (x * w[:, None]).T @ x / w.sum()


def _input_covariances(model, calibration: torch.Tensor) -> list[torch.Tensor]:
    """Second moments of every attention's input on the unchanged model (one pass)."""
    found: dict[int, torch.Tensor] = {}
    handles = [attn.register_forward_pre_hook(lambda module, args, i=i: found.__setitem__(i, _second_moment(args[0], module)))
               for i, attn in enumerate(model.attentions())]
    try:
        with torch.no_grad():
            model(calibration)
    finally:
        for handle in handles:
            handle.remove()
    return [found[i] for i in range(len(handles))]


def _distil(student, teacher, calibration: torch.Tensor, steps: int) -> None:
    """Distil ``student`` into ``teacher``'s next-token distributions on the calibration ids.

    Loss KL(teacher || student), AdamW on the attention projections only (everything else
    stays frozen), one calibration window of ``UPTRAIN_WINDOW`` tokens per step.
    """
    from tqdm.auto import tqdm

    windows = [w for w in calibration.reshape(-1).split(UPTRAIN_WINDOW) if w.numel() > 1]
    params = [p for attn in student.attentions() for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
              for p in proj.parameters()]
    trainable = {id(p) for p in params}
    frozen = [p for p in student.parameters() if id(p) not in trainable and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=UPTRAIN_LR, weight_decay=0.0)
    mode = student.training
    student.train()
    start = time.perf_counter()
    try:
        progress = tqdm(range(steps), desc="gqa distillation", unit="step")
        for step in progress:
            ids = windows[step % len(windows)][None]
            with torch.no_grad():
                target = F.log_softmax(teacher(ids).float(), dim=-1)[0]
            logp = F.log_softmax(student(ids).float(), dim=-1)[0]
            loss = F.kl_div(logp, target, log_target=True, reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress.set_postfix(kl=f"{loss.item():.4f}")
    finally:
        for p in frozen:
            p.requires_grad_(True)
        student.train(mode)
        optimizer.zero_grad(set_to_none=True)
