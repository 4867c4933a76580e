"""Pure PyTorch side of the deployment: model specs, weights, cache and forward pass.

Never imports celery.  Importing this package does not import torch: the
registry, validation and errors are plain Python/numpy so the client and the
router can use them; ``models.loader``, ``models.cache`` and ``models.runner``
pull in torch when a worker imports them.
"""

from models import errors
from models.registry import SPECS, ModelSpec, get_spec, model_names
from models.validation import check_input, check_size

__all__ = ["SPECS", "ModelSpec", "check_input", "check_size", "errors", "get_spec", "model_names"]
