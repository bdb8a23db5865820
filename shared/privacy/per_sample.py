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
Everything else is Opacus' own: the registered grad samplers (``GRAD_SAMPLERS``), the
activation capture, ``capture_backprops_hook`` (rearranging, the ``mean`` rescaling,
accumulation, the Poisson no-accumulation check) and the clean-up. ``tests/test_privacy.py``
checks the result against a per-record autograd loop on every task's trainable layers.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from opacus.grad_sample.functorch import prepare_layer
from opacus.grad_sample.grad_sample_module import GradSampleHooks


class OutputGradHooks(GradSampleHooks):
    """Opacus' ``GradSampleHooks`` with the output gradient taken by a tensor hook."""

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("per-sample gradient hooks are already attached to this model")
        self._module.autograd_grad_sample_hooks = []  # where Opacus' remove_hooks looks for them
        self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
        for module in self.iterate_submodules(self._module):
            if force_functorch or self._get_module_type(module) not in self.GRAD_SAMPLERS:
                prepare_layer(module, batch_first=batch_first)  # Opacus' functorch fallback, as in hooks mode
            capture = partial(self._capture, loss_reduction=loss_reduction, batch_first=batch_first)
            self.autograd_grad_sample_hooks.append(module.register_forward_hook(capture))
        self.enable_hooks()

    def _capture(self, module: torch.nn.Module, inputs: Any, output: Any, *, loss_reduction: str,
                 batch_first: bool) -> None:
        stored = len(getattr(module, "activations", ()))
        self.capture_activations_hook(module, inputs, output)  # stores only when training with grad
        if len(getattr(module, "activations", ())) == stored:
            return
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            raise TypeError(f"DP-SGD: {type(module).__name__} has trainable parameters but its output is not a "
                            "tensor that requires grad; its per-sample gradients cannot be captured")
        output.register_hook(partial(self._backprops, module, loss_reduction=loss_reduction, batch_first=batch_first))

    def _backprops(self, module: torch.nn.Module, grad: torch.Tensor, *, loss_reduction: str,
                   batch_first: bool) -> None:
        # The gradient of the module's output, as a full backward hook's ``grad_output[0]``
        self.capture_backprops_hook(module, None, (grad,), loss_reduction, batch_first)
