"""Live capability drift: how far the model has moved, during training, on held-out general data.

The constraint's promise is measured after training by `trl-nullspace evaluate`; a user who trains
for hours wants to see drift while it happens, in the loggers they already read. At the start of
training `CapabilityDriftMonitor` records the model's next-token distributions on a few held-out
general examples; at the Trainer's first log after every `steps` optimizer steps it logs, through
the Trainer's own `log` (so TensorBoard, W&B, Trackio and `trainer_state.json` get them):

- `nullspace/reference_kl`: the mean per-token KL(start ‖ now) over the monitor tokens;
- `nullspace/reference_loss`: the mean per-token NLL of the monitor texts now.

Storing whole distributions would cost tokens × vocabulary floats, so the start distribution keeps
its `TOP_K` most likely tokens and lumps the rest into one bucket; the KL between those coarsened
distributions is a lower bound of the full KL (data processing), equal to it when the top tokens
hold all the mass (they hold nearly all of it for a trained model's next-token distribution).

It is a plain `TrainerCallback` holding its trainer, so it works on TRL's own trainers too (the
test compares plain TRL with the null-space trainer), and every process runs the forward passes
(ZeRO-3 gathers parameters collectively). Off, it costs nothing: no callback is added.
"""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback

from trl_nullspace.estimation.modes import evaluating
from trl_nullspace.estimation.reference import ReferenceBatch

TOP_K = 20


class CapabilityDriftMonitor(TrainerCallback):
    """Logs `nullspace/reference_kl` and `nullspace/reference_loss` every `steps` optimizer steps (at
    the Trainer's next log; with `steps` a multiple of `logging_steps`, at exactly those steps)."""

    def __init__(self, trainer: Trainer, batches: list[ReferenceBatch], steps: int):
        if steps < 1:
            raise ValueError(f"The drift monitor needs a positive interval in steps; got {steps}.")
        self.trainer = trainer
        self.batches = batches
        self.steps = steps
        self.start: list[tuple[torch.Tensor, torch.Tensor]] = []  # per batch: top-k log-probs, their ids
        self._next_step = steps
        self._logging = False  # the monitor's own log calls on_log again

    @torch.no_grad()
    def _log_probs(self, batch: ReferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token log-probs at the real (non-padding) positions that have a next token, their
        targets, in fp32 on the model's device."""
        model = self.trainer.model
        device = next(model.parameters()).device
        batch = batch.to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        scored = (batch.attention_mask[:, :-1] * batch.attention_mask[:, 1:]).bool()
        return logits[:, :-1][scored].float().log_softmax(-1), batch.input_ids[:, 1:][scored]

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        with evaluating(self.trainer.model):
            self.start = [
                tuple(part.cpu() for part in self._log_probs(batch)[0].topk(TOP_K, dim=-1)) for batch in self.batches
            ]

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        """Measure right after the Trainer's own log, once `steps` steps have passed, and log apart.

        Not from `on_step_end`: a log there would reset the Trainer's `should_log` for the step (its
        loss would never be logged) and take TRL's running metrics into the monitor's entry. Every
        process logs, so every process measures (as ZeRO-3's collective forward needs)."""
        if self._logging or state.global_step < self._next_step:
            return
        self._next_step = state.global_step + self.steps
        self._logging = True
        try:
            self.trainer.log(self.measure())
        finally:
            self._logging = False

    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        """The two metrics now (every process must call it under ZeRO-3)."""
        kl_sum = nll_sum = tokens = 0.0
        with evaluating(self.trainer.model):
            for batch, (start_top, start_ids) in zip(self.batches, self.start, strict=True):
                log_probs, targets = self._log_probs(batch)
                now_top = log_probs.gather(-1, start_ids.to(log_probs.device)).cpu()
                start_top = start_top.double()
                now_top = now_top.double()
                start_rest = (1 - start_top.exp().sum(-1)).clamp_min(1e-12)
                now_rest = (1 - now_top.exp().sum(-1)).clamp_min(1e-12)
                kl = (start_top.exp() * (start_top - now_top)).sum(-1) + start_rest * (
                    start_rest.log() - now_rest.log()
                )
                kl_sum += kl.clamp_min(0).sum().item()
                nll_sum += -log_probs.gather(-1, targets[:, None]).sum().item()
                tokens += targets.numel()
        return {"nullspace/reference_kl": kl_sum / tokens, "nullspace/reference_loss": nll_sum / tokens}
