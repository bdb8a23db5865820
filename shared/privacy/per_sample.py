"""Per-sample gradients for DP-SGD: Opacus' hooks mode, its backward half on the output tensor.

Opacus' ``GradSampleHooks`` captures each trainable layer's input in a forward hook and the
gradient of its output in ``register_full_backward_hook``. A full backward hook wraps the
module's inputs and outputs in ``BackwardHookFunction`` autograd nodes on every call, forward
and backward, and moves every hooked module off PyTorch's fast call path. For a LoRA adapter
(16 small matrices in the text task) that bookkeeping was about a quarter of DP-SGD's extra step time
(docs/scale.md, "DP-SGD's own cost": 1.23x a plain step with it, 1.17x without).

``OutputGradHooks`` registers the backward half on the layer's output tensor instead
(``Tensor.register_hook``, from the same forward hook that stores the activations): autograd
calls it with the gradient of that output, which is what the full backward hook received.
The per-sample gradients themselves come from Opacus' registered grad samplers
(``GRAD_SAMPLERS``, its ``functorch`` fallback for other layers), and the bookkeeping follows
Opacus' ``capture_activations_hook`` / ``capture_backprops_hook`` step by step (activations,
``max_batch_len``, the forward counter that sums a layer used twice, the Poisson
no-accumulation check, the clean-up) on a shorter path: the layer's trainable parameters are
found once per call, not by generator walks in every hook, the ``mean`` reduction's factor n
multiplies the small per-sample gradient instead of the layer's whole output gradient (a
per-sample gradient is linear in it), and that fresh product is kept as it is instead of being
copied into a zero-filled buffer. docs/scale.md, "DP-SGD's own cost", has the measurements.
``tests/test_privacy.py`` checks the result against Opacus' ``GradSampleHooks`` on every task's
trainable layers and against a per-record autograd loop, a layer used twice included.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.grad_sample.grad_sample_module import (
    GradSampleHooks,
    _get_batch_size,
    create_or_accumulate_grad_sample,
    promote_current_grad_sample,
)
from opacus.layers.dp_rnn import DPGRU, DPLSTM, DPRNN, RNNLinear


class OutputGradHooks(GradSampleHooks):
    """Opacus' ``GradSampleHooks`` with the output gradient taken by a tensor hook, on a short path."""

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("per-sample gradient hooks are already attached to this model")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', not {loss_reduction!r}")
        self._module.autograd_grad_sample_hooks = []  # where Opacus' remove_hooks looks for them
        self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
        for module in self.iterate_submodules(self._module):
            if type(module) in (DPRNN, DPLSTM, DPGRU):
                continue  # as in Opacus: their RNNLinear cells carry the hooks
            sampler = None if force_functorch else self.GRAD_SAMPLERS.get(self._get_module_type(module))
            if sampler is None:
                prepare_layer(module, batch_first=batch_first)  # Opacus' functorch fallback, as in hooks mode
                sampler = ft_compute_per_sample_gradient
            capture = partial(self._capture, sampler=sampler, mean=loss_reduction == "mean",
                              batch_dim=0 if batch_first or type(module) is RNNLinear else 1)
            self.autograd_grad_sample_hooks.append(module.register_forward_hook(capture))
        self.enable_hooks()

    def _capture(self, module: torch.nn.Module, inputs: Any, output: Any, *, sampler: Callable, mean: bool,
                 batch_dim: int) -> None:
        # Opacus' capture_activations_hook: only when training with grad, for trainable parameters
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled()):
            return
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            return
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            raise TypeError(f"DP-SGD: {type(module).__name__} has trainable parameters but its output is not a "
                            "tensor that requires grad; its per-sample gradients cannot be captured")
        if not hasattr(module, "activations"):
            module.activations = []
        module.activations.append([t.detach() for t in inputs])
        for p in params:
            p._forward_counter += 1
        output.register_hook(partial(self._backprops, module, params, sampler=sampler, mean=mean,
                                     batch_dim=batch_dim))

    def _backprops(self, module: torch.nn.Module, params: list[torch.nn.Parameter], grad: torch.Tensor, *,
                   sampler: Callable, mean: bool, batch_dim: int) -> None:
        # Opacus' capture_backprops_hook with the gradient of the output, as a full backward
        # hook's ``grad_output[0]``
        if not self.hooks_enabled:
            return
        if not hasattr(module, "max_batch_len"):
            module.max_batch_len = _get_batch_size(module=module, batch_dim=batch_dim)
        n = module.max_batch_len
        activations = module.activations.pop()
        backprops = grad.detach() if batch_dim == 0 else grad.detach().permute(1, 0, *range(2, grad.dim()))
        if batch_dim:
            activations = [a.permute(1, 0, *range(2, a.dim())) for a in activations]
        for param, gs in sampler(module, activations, backprops).items():
            if not param.requires_grad:
                continue
            # A per-sample gradient is linear in the output's gradient: scaling it by n (the
            # ``mean`` reduction) equals Opacus' scaling of the (larger) backprops; the product
            # is a fresh tensor, so it can be kept without Opacus' zero-filled copy
            gs = gs * n if mean else gs.clone()
            current = getattr(param, "_current_grad_sample", None)
            if current is not None:
                current[: gs.shape[0]] += gs
            elif gs.shape[0] == n:
                param._current_grad_sample = gs
            else:
                create_or_accumulate_grad_sample(param=param, grad_sample=gs, max_batch_len=n)
        for p in params:
            p._forward_counter -= 1
            if p._forward_counter == 0:
                promote_current_grad_sample(p)
            if (not self.grad_accumulation_allowed and isinstance(p.grad_sample, list)
                    and len(p.grad_sample) > 1):
                raise ValueError("Poisson sampling is not compatible with grad accumulation: one backward "
                                 "pass per optimizer step")
        if not module.activations:
            del module.max_batch_len
