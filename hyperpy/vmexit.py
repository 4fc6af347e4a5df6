"""How a VM ended (:class:`VmExit`) and the ``hyperpy run`` exit status for each way.

Kept apart from :mod:`hyperpy.vmm` (which loads the KVM extensions) so that the API controller
and :mod:`hyperpy.reboot` can name exit reasons without importing the VMM.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ExitReason(enum.Enum):
    RESET = "guest reset"
    POWEROFF = "guest power-off"
    STOPPED = "stopped by the VMM"
    INTERRUPTED = "interrupted (SIGINT)"
    TERMINATED = "terminated (SIGTERM)"
    HALTED = "all vCPUs halted"
    TRIPLE_FAULT = "triple fault (KVM shutdown exit)"
    CRASH = "guest crash (system event)"
    EMULATION_FAILURE = "KVM emulation failure"
    INTERNAL_ERROR = "KVM internal error"
    FAIL_ENTRY = "KVM entry failure"
    VMM_ERROR = "VMM error"


# Process exit status of `hyperpy run` for each way a VM can end.  2 is kept for usage errors.
# RESET is 0 for `--no-reboot` (without it a reset reboots the VM and does not end the process).
EXIT_STATUS = {
    ExitReason.RESET: 0, ExitReason.POWEROFF: 0, ExitReason.STOPPED: 0, ExitReason.HALTED: 0,
    ExitReason.INTERRUPTED: 130, ExitReason.TERMINATED: 143,
    ExitReason.TRIPLE_FAULT: 1, ExitReason.CRASH: 1,
    ExitReason.EMULATION_FAILURE: 3, ExitReason.INTERNAL_ERROR: 3, ExitReason.FAIL_ENTRY: 3,
    ExitReason.VMM_ERROR: 3,
}


@dataclass(frozen=True)
class VmExit:
    reason: ExitReason
    message: str = ""
    vcpu: int | None = None

    @property
    def status(self) -> int:
        return EXIT_STATUS[self.reason]
