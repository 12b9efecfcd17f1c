"""tunelab: fine-tune open LLMs cheaply and fast.

The package layout follows the pipeline a user walks:
config -> data -> model -> train -> export -> chat (terminal, web page, OpenAI-compatible server).
"""

__version__ = "0.1.0"
