"""Linux bindings: the only place lazymig talks to the kernel through ctypes."""
