"""The Transformers Trainer with its per-step reads from the GPU deferred to the steps that use them.

After every micro-step the stock Trainer reads three values back to the host: whether the loss is finite
(`logging_nan_inf_filter`), the tokens seen (a gathered count, `.item()`) and, under DeepSpeed, the gradient
norm (`.item()`). Each read makes the host wait until the GPU has finished the step, so the GPU then idles
while the host collates, moves and launches the next one. With `finetune.sync_every_step: false` the token
count stays on the device (or the host, where it is known there) and is folded into
`state.num_input_tokens_seen` only where it is read: at logging, saving, evaluation, timing and the end;
the gradient norm stays a tensor until a logging step reads it; a non-finite loss shows in the log as it is.
"""

from __future__ import annotations

import torch
from transformers import Trainer


class DeferredSyncTrainer(Trainer):
    def __init__(self, *args, sync_every_step: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sync_every_step = sync_every_step
        self._host_tokens = 0
        self._device_tokens: torch.Tensor | None = None

    def _track_num_input_tokens(self, inputs) -> None:
        if self.sync_every_step:
            return super()._track_num_input_tokens(inputs)
        mode = self.args.include_num_input_tokens_seen
        if mode == "no":
            return
        if mode == "non_padding" and "attention_mask" in inputs:
            count = inputs["attention_mask"].sum()
            self._device_tokens = count if self._device_tokens is None else self._device_tokens + count
        else:
            self._host_tokens += inputs["input_ids"].numel()

    def tokens_seen(self) -> int:
        """The tokens seen on all ranks so far (one gather and one read from the GPU; every rank must call it)."""
        if not self.sync_every_step and self.args.include_num_input_tokens_seen != "no":
            pending = torch.tensor(self._host_tokens, device=self.args.device, dtype=torch.int64)
            if self._device_tokens is not None:
                pending += self._device_tokens.to(torch.int64)
            self.state.num_input_tokens_seen += int(self.accelerator.gather(pending).sum().item())
            self._host_tokens, self._device_tokens = 0, None
        return self.state.num_input_tokens_seen

    def _get_grad_norm(self, model, grad_norm=None):
        if self.sync_every_step or grad_norm is None:
            return super()._get_grad_norm(model, grad_norm=grad_norm)
        return grad_norm

    def _maybe_log_save_evaluate(self, *args, **kwargs) -> None:
        control = self.control
        if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
            self.tokens_seen()
        return super()._maybe_log_save_evaluate(*args, **kwargs)
