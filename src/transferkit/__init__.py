"""transferkit: turn a pretrained model and a small labelled dataset into a strong, deployed model.

The one-line API::

    import transferkit
    metrics = transferkit.finetune(model="minilm-l6", train="reviews.csv", out="runs/reviews")
    model = transferkit.load_run("runs/reviews")
    model.predict(["great value", "broke after a day"])
"""

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING

from .config import RunConfig
from .errors import UserError

# The entry points load on first use, so `transferkit --help` and `import transferkit` do not pay for torch,
# transformers and scikit-learn until something runs.
_LAZY = {"finetune": ".finetune", "lr_find": ".lr_find", "federate": ".federated", "fit_multitask": ".multitask",
         "rank": ".ranking", "FineTunedModel": ".saved_model", "load_run": ".saved_model"}

if TYPE_CHECKING:
    from .federated import federate
    from .finetune import finetune
    from .lr_find import lr_find
    from .multitask import fit_multitask
    from .ranking import rank
    from .saved_model import FineTunedModel, load_run


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule transferkit.finetune (or .lr_find) makes Python set the package attribute of
        # that name to the module; the public name stays the function, as with an eager `from .finetune import`.
        if name in _LAZY and isinstance(value, types.ModuleType) and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'transferkit' has no attribute '{name}'")


__all__ = ["FineTunedModel", "RunConfig", "UserError", "federate", "finetune", "fit_multitask", "load_run", "lr_find", "rank"]
__version__ = "0.1.0"
