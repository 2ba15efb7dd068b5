"""Console output of a training run: one progress bar, not a dictionary per logging step.

The Trainer prints every log as a dictionary (`PrinterCallback` with tqdm off, `ProgressCallback`'s
`write` with it on); over a run of hundreds of steps those lines bury the few a person reads. The
metrics do not need the console: they stay in `trainer.state.log_history`, `trainer_state.json` in
checkpoints, and every `report_to` logger. `QuietProgressCallback` keeps the bar and shows the latest
loss, and how much of the gradient the projection removed, on it.
"""

from __future__ import annotations

from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback

SHOWN = ("loss", "reward", "nullspace/removed_frac")


class QuietProgressCallback(ProgressCallback):
    """The Trainer's progress bar, with the latest values of `SHOWN` on it instead of printed logs."""

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        shown = {key.rsplit("/", 1)[-1]: f"{logs[key]:.4g}" for key in SHOWN if isinstance(logs.get(key), int | float)}
        if shown:
            self.training_bar.set_postfix(shown, refresh=False)


def quiet_progress(trainer: Trainer, bar: bool = True) -> None:
    """Replace the Trainer's per-log printing by one bar with the latest loss on it (`bar`), or by
    nothing (a driver of many runs that shows its own progress). The logs themselves are untouched."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if bar:
        trainer.add_callback(QuietProgressCallback())
