import os

# Eight fake CPU devices for sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The allocator settings the xllava model commands run with (xllava_jax/hostmem.py).
from xllava_jax.hostmem import tune_malloc  # noqa: E402

tune_malloc()
