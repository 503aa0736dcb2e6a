"""The semi-supervised VAE's training objective and its gradients by hand: the fast path (CPU, float32).

Why: through autograd, the M2 terms of :mod:`sclatent.modules.ssvae` (every cell paired with every
class, through ``q(z2 | z1, y)`` and ``p(z1 | z2, y)``) and the classifier ``q(y | z1)`` are about
a hundred small operations forward and back, each paying dispatch: on cellbench_5cl (5 classes,
batch 128, 2 cores) a mapped query trains 1.21x faster and the semi-supervised stage 1.18x with
this pass (``benchmarks/probe_semi_supervised_step.py``). Here they are computed in a
handful of matmuls and the native BatchNorm/ReLU and Gaussian-head kernels, their gradients by the
chain rule written out below, and the count VAE's part (M1) by the fused pass of
:mod:`sclatent.modules.fused_elbo`, which takes back the gradients sent into ``z1``, its mean and
variance. scANVI's classification term (``classification_ratio`` times the classifier's
cross-entropy on a minibatch of labelled cells, another encoder pass) is written out too, with
the encoder's own pieces (:func:`sclatent.modules.fused_elbo.encoder_forward` and
``encoder_backward``): no autograd graph is built (a semi-supervised step 1.13-1.15x faster than
with that term through autograd, ``benchmarks/probe_classification_term.py``).

It is the module's own objective, :meth:`SemiSupervisedVAEModule.loss
<sclatent.modules.SemiSupervisedVAEModule.loss>`: the same loss, terms, gradient of every
parameter, BatchNorm statistics and random draws (the same draws in the same order), equal to
float32 rounding (``tests/modules/test_fused_ssvae.py``). It covers the count VAE's fused
configuration with the module's default classifier (one hidden layer, ReLU, dropout); held
BatchNorms and frozen parameters (a mapped query) are followed as in the count VAE's pass.

The gradients, for ``B`` cells, ``K`` classes and the minibatch mean of the bound with KL weight
``w`` (``g = w / B`` per cell): with ``KL_k`` the per-class KL of the module docstring,
``f_k = KL_k + log q(k | z1) - log p(k)`` and ``U = sum_k q_k f_k`` (an unlabelled cell's KL),

* ``d U / d KL_k = q_k`` and ``d U / d logit_j = q_j (f_j - U)`` (the second term of the product
  rule, ``sum_k q_k d log q_k / d logit_j``, is zero); a labelled cell's KL is ``KL_y - log p(y)``;
* ``KL_k = log q(z1 | x) - log p(z1 | z2_k, k) + KL(q(z2 | z1, k) || N(0, I))``, so the weight of
  ``log q(z1 | x)`` sums to ``g`` for every cell, and each class's row carries ``g q_k`` (or
  ``g [k = y]``) into the M2 layers, whose products over all ``K B`` rows are written out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..contracts import LossOutput
from ..data.loader import MiniBatch
from ..nn import MLP
from ..nn.blocks import Dropout, native_dropout_mask
from . import fused_elbo
from .fused_elbo import FusedSpec, HiddenLayer

_LOG_2PI = math.log(2 * math.pi)


@dataclass
class _GaussianLayer:
    """A :class:`sclatent.nn.GaussianEncoder` of M2: one hidden layer (class embedding,
    BatchNorm, ReLU, dropout), then the ``[mean | log var]`` heads."""

    hidden: HiddenLayer
    dropout: Dropout | None  # the module whose ``training`` flag says whether it draws a mask
    heads: nn.Linear
    var_eps: float


@dataclass
class SemiSupervisedSpec:
    """The M2 layers and the classifier of a :class:`SemiSupervisedVAEModule`, as the pass reads them."""

    z2_encoder: _GaussianLayer
    z1_decoder: _GaussianLayer
    classifier_hidden: nn.Linear
    classifier_dropout: Dropout | None
    classifier_out: nn.Linear

    def parameters(self) -> list[torch.Tensor]:
        """The M2 parameters (``q(z2 | z1, y)``'s, then ``p(z1 | z2, y)``'s), then the classifier's: the
        order in which the pass returns their gradients."""
        out = []
        for part in (self.z2_encoder, self.z1_decoder):
            layer = part.hidden
            out += [layer.weight, layer.bias, *layer.embeddings, layer.norm.weight, layer.norm.bias]
            out += [part.heads.weight, part.heads.bias]
        out += [self.classifier_hidden.weight, self.classifier_hidden.bias]
        return [*out, self.classifier_out.weight, self.classifier_out.bias]


def _dropout_module(mlp: MLP) -> Dropout | None:
    return next((part for part in mlp.post[0] if isinstance(part, Dropout)), None)


def _drop_probability(dropout: Dropout | None) -> float:
    """What the dropout layer does in this call: its probability while it trains, else 0."""
    return dropout.p if dropout is not None and dropout.training else 0.0


def _gaussian_layer(encoder) -> _GaussianLayer | None:
    body = encoder.body
    hidden = fused_elbo.hidden_layer(body, True)
    if hidden is None or len(hidden.embeddings) != 1 or hidden.used_covariates != [0]:
        return None
    return _GaussianLayer(hidden, _dropout_module(body), encoder.heads, float(encoder.var_eps))


def _structure(module) -> SemiSupervisedSpec | None:
    """The M2/classifier spec of ``module``, or None when its shape is not the one computed here."""
    classifier = module.classifier
    if len(classifier) != 2 or not isinstance(classifier[0], MLP) or not isinstance(classifier[1], nn.Linear):
        return None
    described = classifier[0].describe()
    if len(described) != 1:
        return None
    hidden = described[0]
    if hidden.norm is not None or hidden.embeddings or hidden.continuous_weight is not None or hidden.bias is None:
        return None
    encoder, decoder = _gaussian_layer(module.z2_encoder), _gaussian_layer(module.z1_decoder)
    if encoder is None or decoder is None or _dropout_module(module.z1_decoder.body) is not None:
        return None
    spec = SemiSupervisedSpec(
        z2_encoder=encoder,
        z1_decoder=decoder,
        classifier_hidden=classifier[0].layers[0].linear,
        classifier_dropout=_dropout_module(classifier[0]),
        classifier_out=classifier[1],
    )
    m1 = fused_elbo.cached_structure(module.vae)
    if m1 is None:
        return None
    # every parameter must be one the pass differentiates (it replaces every gradient)
    covered = {id(p) for p in m1.parameters() + spec.parameters()}
    if {id(p) for p in module.parameters()} != covered:
        return None
    return spec


_cached_structure = fused_elbo.StructureCache(_structure)


def applies(module) -> bool:
    """Whether the pass can train ``module`` (a :class:`SemiSupervisedVAEModule`) as it is now: the
    count VAE inside in its fused configuration (:func:`sclatent.modules.fused_elbo.applies`) and
    M2 and the classifier in the shape computed here."""
    return fused_elbo.applies(module.vae) and _cached_structure(module) is not None


def specs(module, batch: MiniBatch) -> tuple[FusedSpec, SemiSupervisedSpec] | None:
    """The M1 and M2 specs for this minibatch, or None when the call must take autograd (see
    :func:`sclatent.modules.fused_elbo.fused_spec`)."""
    m1 = fused_elbo.fused_spec(module.vae, batch)
    if m1 is None or (batch.labelled is not None and not fused_elbo.batch_applies(batch.labelled)):
        return None
    m2 = _cached_structure(module)
    return None if m2 is None else (m1, m2)


def _grad_if(parameter: torch.Tensor, compute):
    """``compute()`` if ``parameter`` trains, else None (a frozen parameter's product is skipped)."""
    return compute() if parameter.requires_grad else None


@torch.no_grad()
def loss_and_gradients(module, m1: FusedSpec, m2: SemiSupervisedSpec, batch: MiniBatch, kl_weight: float) -> LossOutput:
    """:meth:`SemiSupervisedVAEModule.loss` with the gradient of its ``loss`` written into every
    parameter's ``.grad`` (replacing what was there), as ``zero_grad()`` then ``loss.backward()``.

    Parameters
    ----------
    module
        The :class:`SemiSupervisedVAEModule` (in training mode).
    m1, m2
        :func:`specs` of this minibatch.
    batch
        The minibatch (``B >= 2`` cells), with its labelled minibatch attached in training.
    kl_weight
        Weight of the KL part of the bound (warm-up).

    Returns
    -------
    LossOutput
        As :meth:`SemiSupervisedVAEModule.loss`, without a graph.
    """
    kernel = m1.kernel
    n_cells, n_labels = batch.size, module.n_labels
    _, reconstruction, _, saved = fused_elbo.forward_pass(m1, batch, 0.0)
    z1, var = saved.z, saved.var
    n_latent = z1.shape[1]
    deviation = z1 - saved.encoder.q[:, :n_latent]
    log_q_z1 = -0.5 * (_LOG_2PI + torch.log(var) + deviation.square() / var).sum(1)

    m2_forward = _m2_forward(kernel, m2, z1, n_labels)
    class_kls = (log_q_z1.repeat(n_labels) + m2_forward["kl_rows"]).view(n_labels, n_cells).t()  # (B, K)

    logits, classifier_state = _classifier_forward(kernel, m2, z1)
    log_q_y = torch.log_softmax(logits, dim=-1)
    q_y = log_q_y.exp()

    log_prior_y = -math.log(n_labels)
    labels = batch.label_index
    labelled = labels >= 0
    per_class = class_kls + log_q_y - log_prior_y  # f_k
    unlabelled_kl = (q_y * per_class).sum(-1)
    labelled_kl = class_kls.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1) - log_prior_y
    kl = torch.where(labelled, labelled_kl, unlabelled_kl)

    # the classification term (another minibatch's encoder pass), after the draws above
    classification = _classification_term(module, m1, m2, batch)
    cross_entropy, accuracy = classification.cross_entropy, classification.accuracy
    loss = torch.mean(reconstruction + kl_weight * kl) + module.classification_ratio * cross_entropy.detach()

    # ---- backward
    scale = kl_weight / n_cells
    one_hot = nn.functional.one_hot(labels.clamp(min=0), n_labels).to(q_y.dtype)
    is_labelled = labelled.unsqueeze(1)
    grad_class_kls = torch.where(is_labelled, one_hot, q_y) * scale  # (B, K)
    grad_logits = torch.where(is_labelled, 0.0, q_y * (per_class - unlabelled_kl.unsqueeze(1)) * scale)

    grad_z1, m2_grads = _m2_backward(kernel, m2, m2_forward, z1, grad_class_kls.t().reshape(-1), n_labels)
    # log q(z1 | x): weight sum_k grad_class_kls = scale for every cell
    precision_deviation = deviation / var
    grad_z1.sub_(precision_deviation, alpha=scale)
    grad_mean = precision_deviation * scale
    grad_var = (precision_deviation.square() - 1.0 / var) * (0.5 * scale)

    grad_z1_classifier, classifier_grads = _classifier_backward(m2, grad_logits, z1, *classifier_state)
    grad_z1.add_(grad_z1_classifier)

    weight_rec = torch.full((n_cells,), 1.0 / n_cells)
    m1_grads = fused_elbo.backward_pass(
        m1, saved, weight_rec, torch.zeros(n_cells), grad_z1, grad_mean, grad_var, into_grads=True
    )
    fused_elbo.write_gradients(m1.parameters(), m1_grads)
    fused_elbo.write_gradients(m2.parameters(), m2_grads + classifier_grads)
    _add_classification_gradients(m1, m2, classification)

    per_cell = torch.ones_like(reconstruction)
    extra = {"classification": per_cell * cross_entropy.detach(), "accuracy": per_cell * accuracy}
    return LossOutput.variational(loss, reconstruction, kl, extra)


def _classifier_forward(kernel, m2: SemiSupervisedSpec, z: torch.Tensor):
    """``q(y | z)``'s logits ``(B, K)`` (Linear -> ReLU -> dropout -> Linear; draws the dropout mask
    in training) and what :func:`_classifier_backward` reads: ``(hidden, gate)``."""
    hidden_pre = torch.addmm(m2.classifier_hidden.bias, z, m2.classifier_hidden.weight.t())
    gate = (hidden_pre > 0).to(hidden_pre.dtype)
    p = _drop_probability(m2.classifier_dropout)
    if p > 0:
        gate.mul_(native_dropout_mask(kernel, tuple(hidden_pre.shape), p))
    hidden = hidden_pre * gate
    logits = torch.addmm(m2.classifier_out.bias, hidden, m2.classifier_out.weight.t())
    return logits, (hidden, gate)


def _classifier_backward(
    m2: SemiSupervisedSpec, grad_logits: torch.Tensor, z: torch.Tensor, hidden: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``(grad_z (B, L), [the classifier's four gradients])`` from the logits' gradient ``(B, K)``."""
    out_layer, inner = m2.classifier_out, m2.classifier_hidden
    grad_hidden_pre = (grad_logits @ out_layer.weight).mul_(gate)
    grads = [
        _grad_if(inner.weight, lambda: grad_hidden_pre.t() @ z),
        _grad_if(inner.bias, lambda: grad_hidden_pre.sum(0)),
        _grad_if(out_layer.weight, lambda: grad_logits.t() @ hidden),
        _grad_if(out_layer.bias, lambda: grad_logits.sum(0)),
    ]
    return grad_hidden_pre @ inner.weight, grads


class _ClassificationTerm(NamedTuple):
    cross_entropy: torch.Tensor  # mean over the labelled cells, ()
    accuracy: torch.Tensor  # the classifier's, on the same cells, ()
    # of classification_ratio * cross_entropy: (the encoder's, the classifier's), or None
    gradients: tuple[list[torch.Tensor | None], list[torch.Tensor | None]] | None


def _classification_term(module, m1: FusedSpec, m2: SemiSupervisedSpec, batch: MiniBatch) -> _ClassificationTerm:
    """scANVI's classification term, :meth:`SemiSupervisedVAEModule.classification_loss`, by hand:
    its cross-entropy, accuracy and gradients. The cells are the attached labelled minibatch's (else
    the minibatch's own labelled ones): the encoder's posterior mean of each (an encoder pass of
    its own, with its dropout draw, BatchNorm update and the sample the encoder module draws), then
    the classifier. ``gradients`` are those of ``classification_ratio * cross_entropy``: the
    encoder's (:func:`sclatent.modules.fused_elbo.encoder_backward`) and the classifier's; None
    without labelled cells (nothing is drawn then, as in the module)."""
    source = batch.labelled if batch.labelled is not None else batch
    labels = source.label_index
    labelled = labels >= 0
    zero = torch.zeros(())
    if not bool(labelled.any()):
        return _ClassificationTerm(zero, zero, None)
    n_latent = module.n_latent
    encoder, _ = fused_elbo.encoder_forward(m1, source)
    torch.randn(source.size, n_latent)  # the sample the encoder module draws (unused), so the generator moves alike
    z, targets = encoder.q[labelled, :n_latent], labels[labelled]
    logits, classifier_state = _classifier_forward(m1.kernel, m2, z)
    log_q = torch.log_softmax(logits, dim=-1)
    cross_entropy = -log_q.gather(1, targets.unsqueeze(1)).mean()
    accuracy = (logits.argmax(-1) == targets).to(logits.dtype).mean()
    grad_logits = log_q.exp_()
    grad_logits[torch.arange(len(targets)), targets] -= 1.0
    grad_logits.mul_(module.classification_ratio / len(targets))
    grad_z, classifier_grads = _classifier_backward(m2, grad_logits, z, *classifier_state)
    grad_q = torch.zeros_like(encoder.q)
    grad_q[labelled, :n_latent] = grad_z
    encoder_grads = fused_elbo.encoder_backward(m1, encoder, grad_q)
    return _ClassificationTerm(cross_entropy, accuracy, (encoder_grads, classifier_grads))


def _add_classification_gradients(m1: FusedSpec, m2: SemiSupervisedSpec, term: _ClassificationTerm) -> None:
    """Add the classification term's gradients (:func:`_classification_term`) to those written."""
    if term.gradients is not None:
        encoder_grads, classifier_grads = term.gradients
        fused_elbo.add_gradients(m1.parameters()[: len(encoder_grads)], encoder_grads)
        fused_elbo.add_gradients(m2.parameters()[-len(classifier_grads) :], classifier_grads)


def _m2_forward(kernel, m2: SemiSupervisedSpec, z1: torch.Tensor, n_labels: int) -> dict[str, torch.Tensor]:
    """M2 for every (class, cell) pair, row ``k * B + b``: ``kl_rows`` ``(K B,)`` is
    ``-log p(z1_b | z2, k) + KL(q(z2 | z1_b, k) || N(0, I))``, and what the backward reads."""
    n_cells = z1.shape[0]
    rows = n_labels * n_cells
    encoder, decoder = m2.z2_encoder, m2.z1_decoder
    # q(z2 | z1, k): the linear part is the same for every class, the class adds its embedding row
    shared = torch.addmm(encoder.hidden.bias, z1, encoder.hidden.weight.t())
    pre = (shared.unsqueeze(0) + encoder.hidden.embeddings[0].unsqueeze(1)).reshape(rows, -1)
    p = _drop_probability(encoder.dropout)
    mask = native_dropout_mask(kernel, tuple(pre.shape), p) if p > 0 else None
    encoder_layer = fused_elbo.normalise(kernel, encoder.hidden, pre, mask)  # (out, xhat, gate, rstd)
    q2 = torch.addmm(encoder.heads.bias, encoder_layer[0], encoder.heads.weight.t())
    n_latent = q2.shape[1] // 2
    noise = torch.randn(rows, n_latent)
    z2, var2, kl2 = torch.empty(rows, n_latent), torch.empty(rows, n_latent), torch.empty(rows)
    kernel.gaussian_head_forward(
        rows, n_latent, q2.data_ptr(), noise.data_ptr(), encoder.var_eps, z2.data_ptr(), var2.data_ptr(), kl2.data_ptr()
    )
    # p(z1 | z2, k)
    pre_dec = torch.addmm(decoder.hidden.bias, z2, decoder.hidden.weight.t())
    pre_dec.view(n_labels, n_cells, -1).add_(decoder.hidden.embeddings[0].unsqueeze(1))
    decoder_layer = fused_elbo.normalise(kernel, decoder.hidden, pre_dec, None)
    q1 = torch.addmm(decoder.heads.bias, decoder_layer[0], decoder.heads.weight.t())
    mean1 = q1[:, :n_latent]
    var1 = torch.exp(q1[:, n_latent:]) + decoder.var_eps
    # the sample GaussianEncoder draws (unused by the objective): drawn so the generator moves as in autograd
    torch.randn(rows, n_latent)
    deviation = z1.repeat(n_labels, 1) - mean1
    neg_log_p_z1 = 0.5 * (_LOG_2PI + torch.log(var1) + deviation.square() / var1).sum(1)
    return {
        "kl_rows": neg_log_p_z1 + kl2,
        "encoder_layer": encoder_layer,
        "q2": q2,
        "noise": noise,
        "z2": z2,
        "var2": var2,
        "decoder_layer": decoder_layer,
        "var1": var1,
        "deviation": deviation,
    }


def _m2_backward(
    kernel,
    m2: SemiSupervisedSpec,
    saved: dict[str, torch.Tensor],
    z1: torch.Tensor,
    row_weight: torch.Tensor,
    n_labels: int,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Gradients of ``sum_r row_weight_r kl_rows_r`` (:func:`_m2_forward`): ``(grad_z1 (B, L),
    [the M2 parameters' gradients in SemiSupervisedSpec.parameters() order, classifier excluded])``."""
    n_cells, n_latent = z1.shape
    encoder, decoder = m2.z2_encoder, m2.z1_decoder
    weight = row_weight.unsqueeze(1)
    var1, deviation = saved["var1"], saved["deviation"]
    # -log N(z1; mean1, var1): d/d z1 = dev / var1, d/d mean1 = -dev / var1, d/d var1 = (1 / var1 - dev^2 / var1^2) / 2
    precision_deviation = deviation / var1
    grad_z1_rows = precision_deviation * weight
    grad_var1 = (1.0 / var1 - precision_deviation.square()) * (0.5 * weight)
    grad_q1 = torch.cat([-grad_z1_rows, grad_var1 * (var1 - decoder.var_eps)], dim=1)
    grad_z2, decoder_grads = _layer_backward(kernel, decoder, saved["decoder_layer"], grad_q1, saved["z2"], n_labels)

    grad_q2 = torch.empty_like(saved["q2"])
    # (held by name: the kernel reads their memory)
    grad_z2, row_weight = grad_z2.contiguous(), row_weight.contiguous()
    kernel.gaussian_head_backward(
        grad_q2.shape[0],
        n_latent,
        saved["q2"].data_ptr(),
        saved["noise"].data_ptr(),
        saved["var2"].data_ptr(),
        grad_z2.data_ptr(),
        row_weight.data_ptr(),
        encoder.var_eps,
        grad_q2.data_ptr(),
    )
    grad_z1, encoder_grads = _layer_backward(
        kernel, encoder, saved["encoder_layer"], grad_q2, z1, n_labels, shared_input=True
    )
    grad_z1.add_(grad_z1_rows.view(n_labels, n_cells, n_latent).sum(0))
    return grad_z1, encoder_grads + decoder_grads


def _layer_backward(
    kernel,
    part: _GaussianLayer,
    layer_state: tuple[torch.Tensor, ...],
    grad_heads: torch.Tensor,
    layer_input: torch.Tensor,
    n_labels: int,
    shared_input: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Backward of one M2 Gaussian layer from its heads' gradient ``(K B, 2L)``: the gradient of
    its input (``(B, L)`` when the input is shared by the classes' rows, else ``(K B, L)``) and of
    its parameters (:meth:`SemiSupervisedSpec.parameters` order). ``layer_state`` is what
    :func:`sclatent.modules.fused_elbo.normalise` returned in the forward: ``(out, xhat, gate, rstd)``."""
    hidden_layer, heads = part.hidden, part.heads
    hidden, xhat, gate, rstd = layer_state
    grad_heads_weight = _grad_if(heads.weight, lambda: grad_heads.t() @ hidden)
    grad_heads_bias = _grad_if(heads.bias, lambda: grad_heads.sum(0))
    grad_hidden = grad_heads @ heads.weight
    grad_pre, grad_gamma, grad_beta = fused_elbo.normalise_backward(kernel, hidden_layer, grad_hidden, xhat, gate, rstd)
    per_class = grad_pre.view(n_labels, -1, grad_pre.shape[1])
    grad_embedding = _grad_if(hidden_layer.embeddings[0], lambda: per_class.sum(1))
    grad_linear = per_class.sum(0) if shared_input else grad_pre  # what reaches the linear part
    grad_weight = _grad_if(hidden_layer.weight, lambda: grad_linear.t() @ layer_input)
    grad_bias = _grad_if(hidden_layer.bias, lambda: grad_linear.sum(0))
    grad_input = grad_linear @ hidden_layer.weight
    parameters = [grad_weight, grad_bias, grad_embedding, grad_gamma, grad_beta, grad_heads_weight, grad_heads_bias]
    return grad_input, parameters
