"""memtrain: memory- and offload-aware training of PyTorch models on Ray.

The project's folders (planner/, offload/, comm/, runtime/, cluster/, models/) are mapped
into this namespace by pyproject.toml; see docs/DESIGN.md.
"""

__version__ = "0.1.0"
