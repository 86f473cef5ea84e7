"""The device profiles carechain ships: one YAML file per device type, installed as package data.

This package holds no code. `carechain.profiles` reads these files (see `default_profiles_dir` for the
order in which a folder of profiles is looked up) and validates them.
"""
