"""Stage presets with dotted-key overrides, shared by the tests."""

import importlib


def preset(stage: str = "sft", arg: str = "test", **overrides):
    """``configs/<stage>.py:<arg>`` with ``{"train.steps": 3, ...}`` applied, locked again."""
    config = importlib.import_module(f"configs.{stage}").get_config(arg)
    config.unlock()
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    config.lock()
    return config
