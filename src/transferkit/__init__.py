"""transferkit: turn a pretrained model and a small labelled dataset into a strong, deployed model.

The one-line API::

    import transferkit
    metrics = transferkit.finetune(model="minilm-l6", train="reviews.csv", out="runs/reviews")
    model = transferkit.load_run("runs/reviews")
    model.predict(["great value", "broke after a day"])
"""

from .config import RunConfig
from .errors import UserError
from .finetune import finetune
from .lr_find import lr_find
from .federated import federate
from .multitask import fit_multitask
from .ranking import rank
from .saved_model import FineTunedModel, load_run

__all__ = ["FineTunedModel", "RunConfig", "UserError", "federate", "finetune", "fit_multitask", "load_run", "lr_find", "rank"]
__version__ = "0.1.0"
