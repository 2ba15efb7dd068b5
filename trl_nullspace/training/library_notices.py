"""Library notices that repeat on every start, on every process, and ask nothing of the user.

DeepSpeed's import, reached through Accelerate on every training run (also without DeepSpeed),
warns "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect
it." on a machine without a GPU: once per process, before the first line a user reads, on exactly
the CPU machines where a CPU run is what they asked for. The Trainer states its own device, so the
notice is dropped; every other DeepSpeed message is kept.

TRL's configs still set `gradient_checkpointing`, which transformers 5 renamed: every TRL config
(the null-space ones, and plain TRL's in a comparison) warns "`gradient_checkpointing` is
deprecated" on construction, naming a field the user never set. That one warning is ignored.

Installed when `trl_nullspace` is imported, before anything imports DeepSpeed; idempotent.
"""

from __future__ import annotations

import logging
import warnings

DEEPSPEED_LOGGER = "DeepSpeed"
CPU_ACCELERATOR_NOTICE = "Setting accelerator to CPU"
RENAMED_FIELD_WARNING = "`gradient_checkpointing` is deprecated"


class _DropCpuAcceleratorNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(CPU_ACCELERATOR_NOTICE)


def quiet_library_notices() -> None:
    """Drop the notices above from their libraries' loggers (filters survive the libraries' own set-up)."""
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(existing, _DropCpuAcceleratorNotice) for existing in logger.filters):
        logger.addFilter(_DropCpuAcceleratorNotice())
    warnings.filterwarnings("ignore", message=RENAMED_FIELD_WARNING, category=FutureWarning)
