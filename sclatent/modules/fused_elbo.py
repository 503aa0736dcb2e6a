"""The count VAE's training objective and every gradient, computed by hand: the fast path (CPU, float32).

Why: at scVI's architecture and batch 128 the step's arithmetic is three ``128 x 128 x 2G``
matmuls, the likelihood kernel, a sparse first layer and Adam; through autograd it is also ~60
graph nodes and as many small kernels (BatchNorm, ReLU, dropout, the Gaussian head, KL, bias and
gradient bookkeeping), each paying dispatch, and together about a third of the step on 2 cores
(``benchmarks/profile_step.py``). Here the forward pass computes every layer with the native
kernels of :mod:`sclatent._native` and plain matmuls, keeps what the backward needs, and the
backward applies the chain rule by hand.

The result is the module's own objective, not an approximation: the same loss, the same gradient
for every parameter, the same BatchNorm running statistics and the same random draws (dropout seed,
then the reparameterisation noise, from torch's generator in the same order), equal to float32
rounding (``tests/modules/test_fused_elbo.py``). It covers the configuration of scVI and of the benchmark,
which is also the model's default: normal prior and posterior, observed library size, gene-wise
dispersion, ZINB or NB, one hidden layer in encoder and decoder, categorical covariates. It reads
the layers through their public description (:meth:`sclatent.nn.MLP.describe`).

How it is used, in one place each: the trainer asks once per ``fit`` whether the pass applies
(``VAEModule.supports_direct_gradients()`` -> :func:`applies`) and if so trains through
``VAEModule.loss_and_gradients`` -> :func:`fused_loss_and_gradients` (gradients written straight
into ``.grad``, no autograd graph). :meth:`VAEModule.loss <sclatent.modules.VAEModule.loss>` never takes
this path: it is the autograd reference the pass is tested against. :func:`fused_loss` offers the same pass as one
autograd node, for callers that need a differentiable loss (``benchmarks/profile_step.py``).
Any other configuration, other devices, and ``SCLATENT_FUSED=0`` train through autograd.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .. import _native
from ..contracts import LossOutput
from ..data.loader import MiniBatch
from ..distributions import native_softmax_nb
from ..nn.blocks import MLP, native_dropout_mask


@dataclass
class HiddenLayer:
    """One hidden layer: ``Linear(x) + embeddings -> BatchNorm -> ReLU -> dropout``."""

    weight: torch.Tensor  # (n_in, H) for the sparse encoder layer, (H, n_in) for nn.Linear
    bias: torch.Tensor
    embeddings: list[torch.Tensor]  # (n_categories, H) each, in the order of the used covariates
    used_covariates: list[int]  # which of the minibatch's categorical codes each embedding reads
    norm: nn.BatchNorm1d
    dropout: float


@dataclass
class FusedSpec:
    kernel: object
    encoder: HiddenLayer
    decoder: HiddenLayer
    heads_weight: torch.Tensor  # (2L, H)
    heads_bias: torch.Tensor
    var_eps: float
    out_weight: torch.Tensor  # (G or 2G, H)
    out_bias: torch.Tensor
    log_theta: torch.Tensor  # (1, G)
    n_genes: int

    def parameters(self) -> list[torch.Tensor]:
        """Every tensor the objective is differentiated against, in the order of the backward's return."""
        enc, dec = self.encoder, self.decoder
        return [
            enc.weight,
            enc.bias,
            *enc.embeddings,
            enc.norm.weight,
            enc.norm.bias,
            self.heads_weight,
            self.heads_bias,
            dec.weight,
            dec.bias,
            *dec.embeddings,
            dec.norm.weight,
            dec.norm.bias,
            self.out_weight,
            self.out_bias,
            self.log_theta,
        ]


def hidden_layer(mlp: MLP, use_covariates: bool) -> HiddenLayer | None:
    """The one hidden layer of ``mlp`` if it has the shape the fused pass computes, else None
    (read from the MLP's public description, :meth:`sclatent.nn.MLP.describe`)."""
    layers = mlp.describe()
    if len(layers) != 1:
        return None
    layer = layers[0]
    norm = layer.norm
    if (
        layer.continuous_weight is not None
        or layer.bias is None
        or layer.activation != "relu"
        or norm is None
        or not (norm.affine and norm.track_running_stats and norm.momentum is not None)
        or (layer.embeddings and not use_covariates)
    ):
        return None
    return HiddenLayer(
        weight=layer.weight,
        bias=layer.bias,
        embeddings=list(layer.embeddings),
        used_covariates=list(layer.covariate_indices),
        norm=norm,
        dropout=layer.dropout,
    )


class StructureCache:
    """A structure read from a module's tree (a spec), built once per module and rebuilt when a
    submodule or parameter anywhere in the tree is replaced (a layer swapped after the first call).

    Checking costs a dictionary lookup per submodule and parameter (~20 us for the semi-supervised
    VAE); walking ``module.parameters()`` each step cost ~0.3 ms, a few percent of a step.
    """

    def __init__(self, build) -> None:
        self._build = build
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, module):
        cached = self._cache.get(module)
        if cached is not None and all(owner.get(key) is value for owner, key, value in cached[0]):
            return cached[1]
        # (owner dict, key, object) of every edge of the tree: the cache holds the submodules'
        # dictionaries, never the module itself (it stays collectable)
        edges = [
            (owner, key, value)
            for part in module.modules()
            for owner in (part._modules, part._parameters)
            for key, value in owner.items()
        ]
        built = self._build(module)
        self._cache[module] = (edges, built)
        return built


def _enabled() -> bool:
    """``SCLATENT_FUSED=0`` turns the fused pass off (the autograd path then trains every configuration)."""
    return os.environ.get("SCLATENT_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


def applies(module) -> bool:
    """Whether the fused pass can train ``module`` (a :class:`VAEModule`) as it is now: its
    configuration (see the module docstring), its parameters on the CPU in float32, the native
    kernels available (:func:`sclatent._native.kernels`) and the pass not switched off
    (``SCLATENT_FUSED=0``). The trainer asks once, through ``module.supports_direct_gradients()``."""
    return _applicable_spec(module) is not None


def _applicable_spec(module) -> FusedSpec | None:
    if not _enabled():
        return None
    spec = cached_structure(module)
    if spec is None or spec.out_weight.device.type != "cpu" or spec.out_weight.dtype != torch.float32:
        return None
    # (a module moved to another device or dtype moves every parameter; checking one is enough)
    return spec


def fused_spec(module, batch: MiniBatch) -> FusedSpec | None:
    """What the fused pass needs from ``module`` for this minibatch, or None when this call must take
    the autograd path (the pass does not apply, evaluation or no-grad calls, fewer than two cells,
    continuous covariates)."""
    if not (module.training and torch.is_grad_enabled() and batch_applies(batch)):
        return None
    return _applicable_spec(module)


def batch_applies(batch: MiniBatch) -> bool:
    """Whether the pass can take this minibatch: two cells or more (a training BatchNorm needs
    them), no continuous covariates, on the CPU."""
    return batch.size >= 2 and not batch.continuous_covariates.shape[-1] and batch.nz_val.device.type == "cpu"


def _structure(module) -> FusedSpec | None:
    """:func:`fused_spec` for ``module``, independent of the call (None: not this configuration)."""
    if (
        module.prior_flow is not None
        or module.posterior_flow is not None
        or not module.use_observed_library
        or module.dispersion != "gene"
        or module.gene_likelihood not in ("zinb", "nb")
    ):
        return None
    encoder = hidden_layer(module.z_encoder.body, module.encode_covariates)
    decoder = hidden_layer(module.decoder.body, True)
    if encoder is None or decoder is None or decoder.dropout:
        return None
    spec = FusedSpec(
        kernel=None,
        encoder=encoder,
        decoder=decoder,
        heads_weight=module.z_encoder.heads.weight,
        heads_bias=module.z_encoder.heads.bias,
        var_eps=float(module.z_encoder.var_eps),
        out_weight=module.decoder.out.weight,
        out_bias=module.decoder.out.bias,
        log_theta=module.log_theta,
        n_genes=module.n_genes,
    )
    parameters = spec.parameters()
    if len({(p.device, p.dtype) for p in parameters}) != 1:
        return None
    # every parameter must be one the fused pass differentiates: fused_loss_and_gradients overwrites
    # all gradients, and one it did not know would keep a stale value
    if {id(p) for p in module.parameters()} != {id(p) for p in parameters}:
        return None
    spec.kernel = _native.kernels(parameters[0].device, parameters[0].dtype)
    return spec if spec.kernel is not None else None


#: The call-independent part of a module's spec (None: not the fused configuration), built once
#: per module; whether the pass is switched on is :func:`applies`' question.
cached_structure = StructureCache(_structure)


def fused_loss(spec: FusedSpec, batch: MiniBatch, kl_weight: float) -> LossOutput:
    """Negative ELBO per cell, as :meth:`VAEModule.loss <sclatent.modules.VAEModule.loss>`, through the fused pass."""
    loss, reconstruction, kl, *_ = _FusedELBO.apply(spec, batch, float(kl_weight), *spec.parameters())
    return LossOutput.variational(loss, reconstruction, kl)


def _gemm_pair(*products) -> bool:
    """Two products ``out = alpha op(a) op(b) + beta out`` side by side, one per core, each a
    single-threaded MKL call (``sclatent/_native/gemm_pair.c`` says why); False, computing
    nothing, when torch's MKL is not reachable.

    Each product is ``(out, a, transpose_a, b, transpose_b, alpha, beta)`` with row-major float32
    matrices of unit column stride (column slices allowed); ``op(a)`` is ``a.T`` if ``transpose_a``.
    """
    addresses = _native.blas_addresses()
    if addresses is None or torch.get_num_threads() < 2:  # (one thread allowed: torch's own matmul)
        return False
    shape, pointers = [], []
    for out, a, transpose_a, b, transpose_b, _, _ in products:
        inner = a.shape[0] if transpose_a else a.shape[1]
        shape += [int(transpose_a), int(transpose_b), out.shape[0], out.shape[1], inner]
        shape += [a.stride(0), b.stride(0), out.stride(0)]
        pointers.append((a.data_ptr(), b.data_ptr(), out.data_ptr()))
    shape_array = (ctypes.c_int64 * 16)(*shape)
    alphas = (ctypes.c_float * 2)(*(float(p[5]) for p in products))
    betas = (ctypes.c_float * 2)(*(float(p[6]) for p in products))
    _native.kernels().gemm_pair(
        addresses[0],
        addresses[1],
        ctypes.addressof(shape_array),
        ctypes.addressof(alphas),
        ctypes.addressof(betas),
        *pointers[0],
        *pointers[1],
    )
    return True


def _ptr(tensor: torch.Tensor | None):
    return None if tensor is None else tensor.data_ptr()


def _add_embeddings(out: torch.Tensor, layer: HiddenLayer, codes: list[torch.Tensor]) -> None:
    for weight, index in zip(layer.embeddings, layer.used_covariates, strict=True):
        out.add_(weight.index_select(0, codes[index]))


def normalise(kernel, layer: HiddenLayer, pre: torch.Tensor, mask: torch.Tensor | None):
    """BatchNorm (training) -> ReLU -> dropout of ``pre`` ``(B, H)``, updating the running statistics
    as ``torch.nn.BatchNorm1d`` does (the running variance takes the unbiased batch variance).

    Returns the output and what the backward reads: ``(out, xhat, gate, rstd)``.
    """
    n_cells, width = pre.shape
    norm = layer.norm
    if not norm.training:
        return _normalise_held(kernel, norm, pre, mask)
    out, xhat, gate = (torch.empty_like(pre) for _ in range(3))
    mean, var, rstd = (torch.empty(width) for _ in range(3))
    kernel.bn_relu_forward(
        n_cells,
        width,
        pre.data_ptr(),
        norm.weight.data_ptr(),
        norm.bias.data_ptr(),
        norm.eps,
        norm.momentum,
        norm.running_mean.data_ptr(),
        norm.running_var.data_ptr(),
        _ptr(mask),
        out.data_ptr(),
        xhat.data_ptr(),
        gate.data_ptr(),
        mean.data_ptr(),
        var.data_ptr(),
        rstd.data_ptr(),
    )
    norm.num_batches_tracked.add_(1)
    return out, xhat, gate, rstd


def _normalise_held(kernel, norm, pre: torch.Tensor, mask: torch.Tensor | None):
    """:func:`normalise` for a held BatchNorm (:meth:`sclatent.nn.blocks.BatchNorm1d.hold`: a frozen
    layer of a mapped query), which normalises with its running statistics and leaves them as they
    are: a fixed per-feature affine map, then ReLU and dropout, in one native pass."""
    n_cells, width = pre.shape
    pre = pre.contiguous()  # (held by name: the kernel reads its memory)
    rstd = torch.rsqrt(norm.running_var + norm.eps)
    out, xhat, gate = (torch.empty_like(pre) for _ in range(3))
    kernel.bn_held_relu_forward(
        n_cells,
        width,
        pre.data_ptr(),
        norm.weight.data_ptr(),
        norm.bias.data_ptr(),
        norm.running_mean.data_ptr(),
        rstd.data_ptr(),
        _ptr(mask),
        out.data_ptr(),
        xhat.data_ptr(),
        gate.data_ptr(),
    )
    return out, xhat, gate, rstd


def normalise_backward(kernel, layer: HiddenLayer, grad_out: torch.Tensor, xhat, gate, rstd):
    """``(grad_pre, grad_gamma, grad_beta)`` for :func:`normalise`'s output gradient ``grad_out``."""
    n_cells, width = grad_out.shape
    grad_out = grad_out.contiguous()  # (held by name: the kernel reads its memory)
    grad_pre = torch.empty_like(grad_out)
    grad_gamma, grad_beta = torch.empty(width), torch.empty(width)
    # a held BatchNorm's statistics are constants: no gradient through them
    backward = kernel.bn_relu_backward if layer.norm.training else kernel.bn_held_relu_backward
    backward(
        n_cells,
        width,
        grad_out.data_ptr(),
        xhat.data_ptr(),
        gate.data_ptr(),
        layer.norm.weight.data_ptr(),
        rstd.data_ptr(),
        grad_pre.data_ptr(),
        grad_gamma.data_ptr(),
        grad_beta.data_ptr(),
    )
    return grad_pre, grad_gamma, grad_beta


def _embedding_gradients(layer: HiddenLayer, codes: list[torch.Tensor], grad_pre: torch.Tensor) -> list[torch.Tensor]:
    return [
        torch.zeros_like(weight).index_add_(0, codes[index], grad_pre)
        for weight, index in zip(layer.embeddings, layer.used_covariates, strict=True)
    ]


@dataclass
class EncoderPass:
    """What the backward reads from the encoder's forward pass over one minibatch."""

    codes: list[torch.Tensor]
    row_ptr: torch.Tensor
    cols: torch.Tensor
    log_counts: torch.Tensor
    xhat: torch.Tensor
    gate: torch.Tensor
    rstd: torch.Tensor
    hidden: torch.Tensor
    q: torch.Tensor  # (B, 2L) heads [mean | log var]


@dataclass
class SavedPass:
    """What the backward pass reads from the forward pass of one minibatch."""

    encoder: EncoderPass
    noise: torch.Tensor
    var: torch.Tensor
    z: torch.Tensor
    xhat_dec: torch.Tensor
    gate_dec: torch.Tensor
    rstd_dec: torch.Tensor
    hidden_dec: torch.Tensor
    grad_heads: torch.Tensor  # d log p(x_b) / d heads_b, (B, G or 2G)
    grad_log_theta: torch.Tensor  # d log p(x_b) / d log theta, per cell, (B, G)


@torch.no_grad()
def encoder_forward(spec: FusedSpec, batch: MiniBatch) -> tuple[EncoderPass, torch.Tensor]:
    """The encoder ``q(z | x)`` up to its heads: sparse first layer on log1p counts -> BatchNorm ->
    ReLU -> dropout -> ``[mean | log var]``. Draws the dropout mask and updates the BatchNorm's
    running statistics, as the encoder module does in training (not the sample: the caller draws
    it). Returns the pass and the minibatch's nonzero counts ``(nnz,)``."""
    kernel, enc = spec.kernel, spec.encoder
    n_cells = batch.size
    width = enc.bias.numel()
    codes, _ = batch.covariates()
    row_ptr = batch.nz_row_ptr.to(torch.int64).contiguous()
    cols = batch.nz_col.to(torch.int64).contiguous()
    counts = batch.nz_val.contiguous()
    log_counts = torch.log1p(counts)
    pre = torch.empty(n_cells, width)
    kernel.sparse_linear_forward(
        n_cells,
        width,
        row_ptr.data_ptr(),
        cols.data_ptr(),
        log_counts.data_ptr(),
        enc.weight.data_ptr(),
        enc.bias.data_ptr(),
        pre.data_ptr(),
        torch.get_num_threads(),
    )
    _add_embeddings(pre, enc, codes)
    mask = native_dropout_mask(kernel, (n_cells, width), enc.dropout) if enc.dropout > 0 else None
    hidden, xhat, gate, rstd = normalise(kernel, enc, pre, mask)
    q = torch.addmm(spec.heads_bias, hidden, spec.heads_weight.t())
    return EncoderPass(codes, row_ptr, cols, log_counts, xhat, gate, rstd, hidden, q), counts


@torch.no_grad()
def encoder_backward(
    spec: FusedSpec, saved: EncoderPass, grad_q: torch.Tensor, into_grads: bool = False
) -> list[torch.Tensor | None]:
    """Gradients of the encoder's parameters (the first six-plus of :meth:`FusedSpec.parameters`:
    first layer, its embeddings, BatchNorm, heads) from the heads' gradient ``grad_q`` ``(B, 2L)``.
    The first layer's weight gets None when frozen; ``into_grads`` as in :func:`backward_pass`."""
    kernel, enc = spec.kernel, spec.encoder
    n_cells, width = saved.hidden.shape
    grad_heads_weight = torch.mm(grad_q.t(), saved.hidden)
    grad_heads_bias = grad_q.sum(0)
    grad_hidden = torch.mm(grad_q, spec.heads_weight)
    grad_pre, grad_gamma, grad_beta = normalise_backward(kernel, enc, grad_hidden, saved.xhat, saved.gate, saved.rstd)
    grad_weight = gradient_buffer(enc.weight, into_grads)
    if grad_weight is not None:
        kernel.sparse_linear_backward_weight(
            n_cells,
            enc.weight.shape[0],
            width,
            saved.row_ptr.data_ptr(),
            saved.cols.data_ptr(),
            saved.log_counts.data_ptr(),
            grad_pre.data_ptr(),
            grad_weight.data_ptr(),
            torch.get_num_threads(),
        )
    grad_bias = grad_pre.sum(0)
    grad_embeddings = _embedding_gradients(enc, saved.codes, grad_pre)
    return [grad_weight, grad_bias, *grad_embeddings, grad_gamma, grad_beta, grad_heads_weight, grad_heads_bias]


@torch.no_grad()
def forward_pass(spec: FusedSpec, batch: MiniBatch, kl_weight: float):
    """``(loss, reconstruction (B,), kl (B,), saved)``; updates the BatchNorm running statistics."""
    kernel, dec = spec.kernel, spec.decoder
    n_cells = batch.size
    n_latent = spec.heads_bias.numel() // 2
    encoder, counts = encoder_forward(spec, batch)
    codes, row_ptr, cols, q = encoder.codes, encoder.row_ptr, encoder.cols, encoder.q

    # Gaussian head: z = mean + sqrt(var) * noise, KL to N(0, I)
    noise = torch.randn(n_cells, n_latent)
    z, var, kl = torch.empty(n_cells, n_latent), torch.empty(n_cells, n_latent), torch.empty(n_cells)
    kernel.gaussian_head_forward(
        n_cells, n_latent, q.data_ptr(), noise.data_ptr(), spec.var_eps, z.data_ptr(), var.data_ptr(), kl.data_ptr()
    )

    # decoder: Linear(z) + covariates -> BatchNorm -> ReLU -> fused output heads -> likelihood
    pre_dec = torch.addmm(dec.bias, z, dec.weight.t())
    _add_embeddings(pre_dec, dec, codes)
    hidden_dec, xhat_dec, gate_dec, rstd_dec = normalise(kernel, dec, pre_dec, None)
    # the largest product, (B, H) x (H, G or 2G): its two column halves side by side
    heads = spec.out_bias.expand(n_cells, -1).contiguous()
    half = heads.shape[1] // 2
    out_weight = spec.out_weight
    if not _gemm_pair(
        (heads[:, :half], hidden_dec, False, out_weight[:half], True, 1.0, 1.0),
        (heads[:, half:], hidden_dec, False, out_weight[half:], True, 1.0, 1.0),
    ):
        heads.addmm_(hidden_dec, out_weight.t())
    log_library = torch.log(batch.library.clamp(min=1.0))
    log_likelihood, grad_heads, _, grad_log_theta = native_softmax_nb(
        kernel, heads, spec.n_genes, log_library, spec.log_theta, row_ptr, cols, counts, True
    )
    reconstruction = log_likelihood.neg_()
    loss = (reconstruction + kl_weight * kl).mean()
    saved = SavedPass(
        encoder,
        noise,
        var,
        z,
        xhat_dec,
        gate_dec,
        rstd_dec,
        hidden_dec,
        grad_heads,
        grad_log_theta,
    )
    return loss, reconstruction, kl, saved


def gradient_buffer(parameter: torch.Tensor, into_grad: bool) -> torch.Tensor | None:
    """Where a large weight's gradient is written: None if frozen; its ``.grad`` when asked and
    that is a plain contiguous tensor of its shape (the optimiser's flat-buffer view); else new."""
    if not parameter.requires_grad:
        return None
    grad = parameter.grad
    if into_grad and grad is not None and grad.shape == parameter.shape and grad.is_contiguous():
        return grad
    return torch.empty_like(parameter)


@torch.no_grad()
def backward_pass(
    spec: FusedSpec,
    saved: SavedPass,
    weight_rec: torch.Tensor,
    weight_kl: torch.Tensor,
    grad_z: torch.Tensor | None = None,
    grad_mean: torch.Tensor | None = None,
    grad_var: torch.Tensor | None = None,
    into_grads: bool = False,
) -> list[torch.Tensor | None]:
    """Gradients, in the order of :meth:`FusedSpec.parameters`, of ``sum_b weight_rec_b rec_b +
    weight_kl_b kl_b`` (``(B,)`` weights; the mean loss has ``1 / B`` and ``kl_weight / B``), plus
    whatever a caller's own objective sends back into the sample ``z`` and the posterior's ``mean``
    and ``var`` (``(B, L)`` gradients, or None). The output layer's and the first layer's weights
    get None when they do not require a gradient (frozen, as in a mapped query). With ``into_grads``
    those two large gradients are written straight into the parameters' ``.grad`` tensors (and
    returned as them), saving a copy of each per step; only for a caller that replaces ``.grad``
    (:func:`fused_loss_and_gradients`), never for autograd, which adds the result to ``.grad``."""
    kernel, dec = spec.kernel, spec.decoder
    n_cells, n_latent = saved.z.shape
    # reconstruction = -log p, so d/d heads = -weight_rec * grad_heads, row by row; the row
    # weights are applied to the (B, H) side of each product, never to the (B, 2G) matrix
    row_scale = weight_rec.neg()
    scaled_hidden_dec = saved.hidden_dec * row_scale.unsqueeze(1)
    grad_heads = saved.grad_heads
    grad_hidden_dec = torch.empty_like(saved.hidden_dec)
    # frozen parameters (a mapped query's reference weights) get no gradient (None): the output
    # layer's weight gradient is half the pass's arithmetic
    grad_out_weight = gradient_buffer(spec.out_weight, into_grads)
    if grad_out_weight is None:
        torch.mm(grad_heads, spec.out_weight, out=grad_hidden_dec)
    # the two (G or 2G, B) x (B, H)-sized products of the output layer, side by side
    elif not _gemm_pair(
        (grad_out_weight, grad_heads, True, scaled_hidden_dec, False, 1.0, 0.0),
        (grad_hidden_dec, grad_heads, False, spec.out_weight, False, 1.0, 0.0),
    ):
        torch.mm(grad_heads.t(), scaled_hidden_dec, out=grad_out_weight)
        torch.mm(grad_heads, spec.out_weight, out=grad_hidden_dec)
    grad_hidden_dec.mul_(row_scale.unsqueeze(1))
    grad_out_bias = torch.mv(grad_heads.t(), row_scale)
    grad_log_theta = torch.mv(saved.grad_log_theta.t(), row_scale).unsqueeze(0)

    grad_pre_dec, grad_gamma_dec, grad_beta_dec = normalise_backward(
        kernel, dec, grad_hidden_dec, saved.xhat_dec, saved.gate_dec, saved.rstd_dec
    )
    grad_dec_weight = torch.mm(grad_pre_dec.t(), saved.z)
    grad_dec_bias = grad_pre_dec.sum(0)
    grad_dec_embeddings = _embedding_gradients(dec, saved.encoder.codes, grad_pre_dec)
    grad_z = torch.mm(grad_pre_dec, dec.weight) if grad_z is None else torch.addmm(grad_z, grad_pre_dec, dec.weight)

    grad_q = torch.empty_like(saved.encoder.q)
    weight_kl = weight_kl.contiguous()  # (held by name: the kernel reads its memory)
    kernel.gaussian_head_backward(
        n_cells,
        n_latent,
        saved.encoder.q.data_ptr(),
        saved.noise.data_ptr(),
        saved.var.data_ptr(),
        grad_z.data_ptr(),
        weight_kl.data_ptr(),
        spec.var_eps,
        grad_q.data_ptr(),
    )
    # the heads are [mean | log var] with var = exp(log var) + var_eps: d var / d log var = var - var_eps
    if grad_mean is not None:
        grad_q[:, :n_latent] += grad_mean
    if grad_var is not None:
        grad_q[:, n_latent:] += grad_var * (saved.var - spec.var_eps)
    return [
        *encoder_backward(spec, saved.encoder, grad_q, into_grads),
        grad_dec_weight,
        grad_dec_bias,
        *grad_dec_embeddings,
        grad_gamma_dec,
        grad_beta_dec,
        grad_out_weight,
        grad_out_bias,
        grad_log_theta,
    ]


def fused_loss_and_gradients(spec: FusedSpec, batch: MiniBatch, kl_weight: float) -> LossOutput:
    """:func:`fused_loss` and the gradient of its ``loss``, written into each parameter's ``.grad``
    (replacing what was there, as ``zero_grad()`` then ``loss.backward()`` would) without autograd.

    The returned tensors carry no graph. Saves the autograd engine's per-parameter work (about
    0.3 ms of a 4 ms step on 2 cores); a trainer uses it when nothing hooks into the backward pass.
    """
    loss, reconstruction, kl, saved = forward_pass(spec, batch, float(kl_weight))
    n_cells = batch.size
    weight_rec = torch.full((n_cells,), 1.0 / n_cells)
    weight_kl = torch.full((n_cells,), float(kl_weight) / n_cells)
    grads = backward_pass(spec, saved, weight_rec, weight_kl, into_grads=True)
    write_gradients(spec.parameters(), grads)
    return LossOutput.variational(loss, reconstruction, kl)


def add_gradients(parameters: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """Add each gradient to its parameter's ``.grad`` (as a second ``backward()`` would); frozen
    parameters and None gradients are skipped."""
    for parameter, grad in zip(parameters, grads, strict=True):
        if grad is None or not parameter.requires_grad:
            continue
        if parameter.grad is None:
            parameter.grad = grad
        else:
            parameter.grad.add_(grad)


def write_gradients(parameters: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """Put each gradient in its parameter's ``.grad``, replacing what was there (in place when a
    ``.grad`` exists: the optimiser's flat-buffer views stay live); frozen parameters are skipped."""
    for parameter, grad in zip(parameters, grads, strict=True):
        if not parameter.requires_grad or grad is parameter.grad:
            continue
        if parameter.grad is None:
            parameter.grad = grad
        else:
            parameter.grad.copy_(grad)


class _FusedELBO(torch.autograd.Function):
    """The VAE's pass as one autograd node: ``(loss, reconstruction (B,), kl (B,), z (B, L),
    mean (B, L), var (B, L))``; gradients sent back into any of them are taken by the hand-written
    backward."""

    @staticmethod
    def forward(ctx, spec: FusedSpec, batch: MiniBatch, kl_weight: float, *parameters):
        loss, reconstruction, kl, saved = forward_pass(spec, batch, kl_weight)
        ctx.spec, ctx.kl_weight, ctx.saved = spec, kl_weight, saved
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*parameters)
        n_latent = saved.z.shape[1]
        mean = saved.encoder.q[:, :n_latent].clone()
        return loss, reconstruction, kl, saved.z.clone(), mean, saved.var.clone()

    @staticmethod
    def backward(ctx, grad_loss, grad_reconstruction, grad_kl, grad_z, grad_mean, grad_var):
        ctx.saved_tensors  # noqa: B018 (raises if a parameter was modified in place since the forward)
        n_cells = ctx.saved.z.shape[0]
        # per-cell weights of the two terms in what is differentiated
        weight_rec, weight_kl = torch.zeros(n_cells), torch.zeros(n_cells)
        if grad_loss is not None:
            weight_rec += grad_loss / n_cells
            weight_kl += grad_loss * (ctx.kl_weight / n_cells)
        if grad_reconstruction is not None:
            weight_rec += grad_reconstruction
        if grad_kl is not None:
            weight_kl += grad_kl
        grads = backward_pass(ctx.spec, ctx.saved, weight_rec, weight_kl, grad_z, grad_mean, grad_var)
        needs = ctx.needs_input_grad[3:]
        return (None, None, None, *(g if need else None for g, need in zip(grads, needs, strict=True)))


def fused_pass(spec: FusedSpec, batch: MiniBatch) -> dict[str, torch.Tensor]:
    """The VAE's encoder, sample and decoder likelihood through the fused kernels, as one autograd
    node, for a model that builds its own objective on top of the count VAE (the semi-supervised
    VAE's M1).

    Returns
    -------
    dict
        ``reconstruction`` ``(B,)`` (-log p(x | z), nats), ``z`` ``(B, L)`` the reparameterised
        sample, ``qz_mean`` and ``qz_var`` ``(B, L)``: differentiable; the gradients sent back into
        them are propagated by the pass's own backward.
    """
    _, reconstruction, _, z, mean, var = _FusedELBO.apply(spec, batch, 0.0, *spec.parameters())
    return {"reconstruction": reconstruction, "z": z, "qz_mean": mean, "qz_var": var}
