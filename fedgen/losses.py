"""Loss hooks shared by the training loops (``train_ddpm`` and ``train_classifier`` take
``loss_hooks``: ``hook(model, batch) -> scalar``)."""

from __future__ import annotations

import torch


def proximal(model: torch.nn.Module, mu: float):
    """FedProx's drift term mu/2 ||w - w_global||^2 (Li et al., 2020, eq. 2), with
    ``w_global`` the model's weights at the time of the call (the global model the client
    just received)."""
    anchor = [p.detach().clone() for p in model.parameters()]

    def hook(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(m.parameters(), anchor))

    return hook


def augment_weight(num_real: int, weight: float):
    """Weight the cross-entropy of the rows from ``num_real`` on (the rows a client trains
    on beyond its own images, which come first) by ``weight`` instead of 1.

    The loop's loss is the batch mean (1/B) sum_i CE_i; this term adds
    (weight - 1)/B sum over the batch's added rows of CE_i, so the total is
    (1/B) sum_i w_i CE_i with w_i = 1 for own images and ``weight`` for the rest.
    """
    def hook(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        added = batch["index"] >= num_real
        ce = torch.nn.functional.cross_entropy(batch["logits"][added], batch["labels"][added],
                                               reduction="sum")
        return (weight - 1.0) * ce / len(batch["labels"])

    return hook


# ---------------------------------------------------------------------- FedDifRC
# Wang et al. 2025 (methods.md E): the local embedding z (the classifier's penultimate
# features, batch["features"]) is pulled toward per-sample diffusion targets.

def ndcr(z: torch.Tensor, r_d: torch.Tensor) -> torch.Tensor:
    """Noise-driven Diffusion Consistent Restriction (paper eq. 12):
    KL(softmax(r_d/|r_d|) || softmax(z/|z|)) per sample (summed over the dimensions),
    averaged over the batch; as the released code's ``KLDivLoss(reduction="batchmean")``
    of ``log_softmax(z/|z|)`` against ``softmax(r_d/|r_d|)``. ``r_d`` is a constant target.
    """
    log_q = torch.log_softmax(torch.nn.functional.normalize(z, dim=-1), dim=-1)
    log_p = torch.log_softmax(torch.nn.functional.normalize(r_d.detach(), dim=-1), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def tdcl(z: torch.Tensor, r_pos: torch.Tensor, r_neg: torch.Tensor,
         tau: float = 0.06) -> torch.Tensor:
    """Text-driven Diffusion Contrastive Learning (paper eq. 11), per sample: InfoNCE over
    cosine similarities / ``tau``, sample i's positive ``r_pos[i]`` (B, D) against its own
    negatives ``r_neg[i]`` (B, K, D): -log(e^{s_i+} / (e^{s_i+} + sum_k e^{s_ik})),
    averaged over the batch."""
    cos = torch.nn.functional.cosine_similarity
    pos = cos(z, r_pos.detach(), dim=-1).unsqueeze(1)              # (B, 1)
    neg = cos(z.unsqueeze(1), r_neg.detach(), dim=-1)             # (B, K)
    logits = torch.cat([pos, neg], dim=1) / tau
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def tdcl_batch_pooled(z: torch.Tensor, r_pos: torch.Tensor, r_neg: torch.Tensor,
                      tau: float = 0.06) -> torch.Tensor:
    """TDCL as the authors' released code computes it (``calculate_infonce`` in
    main_FedDifRC.py), kept for comparison (``difrc-tdcl-form=batch-pooled``).

    The B positives are stacked, then the B*K negatives sample by sample
    (``r_neg.reshape(-1, D)``), and compared row by row with z tiled 1+K times
    (``z.repeat(1 + K, 1)``), then ONE InfoNCE for the whole batch:
    -log(sum of the B positive exps / sum of all B(1+K) exps). Two departures from
    eq. 11 follow: (1) it is pooled, one ratio of sums rather than a mean of per-sample
    ratios; (2) the negatives are misaligned: row B + j holds negative ``j mod K`` of
    sample ``j // K`` but embedding ``z[j mod B]``, so embeddings are mostly contrasted
    with OTHER samples' negatives (row B + j is aligned only where j mod B == j // K:
    all rows when B = 1, the K = B "diagonal" otherwise, and in general few).
    """
    b, k, d = r_neg.shape
    protos = torch.cat([r_pos.detach(), r_neg.detach().reshape(b * k, d)])   # (B(1+K), D)
    sims = torch.nn.functional.cosine_similarity(z.repeat(1 + k, 1), protos, dim=-1) / tau
    return torch.logsumexp(sims, 0) - torch.logsumexp(sims[:b], 0)


class TermHook:
    """A named, weighted loss term on the real samples of a batch, keeping the running
    mean of its unweighted value (:meth:`metrics`, reported in the client's fit metrics).

    ``term(z, index)`` gets the batch's embeddings z (``batch["features"]``) and their
    rows in the training array (``batch["index"]``), restricted to rows below
    ``num_real``: a client's own images come first in its training set, and the rows
    after them (the diffusion arm's synthetic images, the oversample / noise arms'
    copies) have no diffusion target, so they get no term (cross-entropy only). The
    term is the mean over the batch's real samples; a batch without any adds 0.
    """

    def __init__(self, name: str, term, num_real: int, weight: float = 1.0):
        self.name, self.term, self.num_real, self.weight = name, term, num_real, weight
        self.total, self.calls = 0.0, 0

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        z, index = batch["features"], batch["index"]
        if z is None:
            raise ValueError(f"{self.name}: the batch has no features (the model has no "
                             f"fc layer to read the penultimate embedding from)")
        keep = index < self.num_real
        if not bool(keep.any()):
            return z.new_zeros(())
        value = self.term(z[keep], index[keep])
        self.total += float(value.detach())
        self.calls += 1
        return self.weight * value

    def metrics(self) -> dict[str, float]:
        return {self.name: self.total / self.calls} if self.calls else {}


def ndcr_hook(r_d: torch.Tensor, weight: float = 1.0) -> TermHook:
    """NDCR on ``batch["features"]`` against ``r_d[index]`` (rows = the real images)."""
    return TermHook("ndcr", lambda z, index: ndcr(z, r_d[index]), len(r_d), weight)


def tdcl_hook(r_c: torch.Tensor, tau: float, form: str = "per-sample",
              weight: float = 1.0) -> TermHook:
    """TDCL on ``batch["features"]`` with ``r_c[index]`` (N, 1 + K, D): slot 0 the
    positive, the rest negatives; ``form`` per-sample (eq. 11) or batch-pooled (the
    released code's, :func:`tdcl_batch_pooled`)."""
    forms = {"per-sample": tdcl, "batch-pooled": tdcl_batch_pooled}
    if form not in forms:
        raise ValueError(f"unknown TDCL form {form!r}; allowed: {', '.join(forms)}")
    loss = forms[form]

    def term(z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        r = r_c[index]
        return loss(z, r[:, 0], r[:, 1:], tau)

    return TermHook("tdcl", term, len(r_c), weight)
