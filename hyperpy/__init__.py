"""hyperpy: a KVM virtual machine monitor with a Python control plane and Cython hot paths."""

import time as _time

__version__ = "0.1.0"

# When hyperpy was first imported: the start of the VMM as far as start-up figures go
# (the interpreter's own start-up, a few tens of milliseconds, comes before it).
STARTED_AT = _time.monotonic()
