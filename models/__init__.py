"""Pure PyTorch side of the deployment: model sources, specs, weights, cache and forward pass.

Never imports celery.  Importing this package does not import torch: the
specs, the catalog of model sources, validation and errors are plain
Python/numpy so the client and the router can use them; ``models.loader``,
``models.hf``, ``models.cache`` and ``models.runner`` pull in torch (and
transformers, for a Hugging Face model) when a worker imports them.
"""

from models import errors
from models.catalog import ModelCatalog, discover
from models.spec import ModelSpec, TextSpec, parse_ref
from models.validation import check_input, check_size

__all__ = [
    "ModelCatalog",
    "ModelSpec",
    "TextSpec",
    "check_input",
    "check_size",
    "discover",
    "errors",
    "parse_ref",
]
