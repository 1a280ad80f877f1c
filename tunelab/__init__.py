"""tunelab: efficient fine-tuning of chat LLMs and one-command studies of fine-tuning choices.

Entry point: `tunelab <command> ...` (see tunelab/cli.py) or `python -m tunelab`.
"""

__version__ = "0.1.0"
