"""hyperpy: a KVM virtual machine monitor with a Python control plane and Cython hot paths."""

__version__ = "0.1.0"
