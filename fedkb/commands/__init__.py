"""Subcommands of `fedkb`. Each module defines `register(subparsers)`.

Command modules import heavy libraries (TensorFlow, Flask) inside `run`, never at module
level, so `fedkb --help` is instant and `fedkb device` never loads TensorFlow.
"""
