"""The UMEMA peft method: config, tuner (adapter life cycle and memory API), where UM/EMA attach, registration."""
