import os

# Eight fake CPU devices for sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu, when installed for the TPU compile tests, stays quiet

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
