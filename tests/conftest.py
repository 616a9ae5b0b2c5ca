"""Eight fake CPU devices for every test, set before JAX initialises."""

import os

os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

assert jax.device_count() == 8, "tests need 8 fake CPU devices; import jax after conftest"
