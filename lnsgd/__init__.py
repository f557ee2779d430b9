"""lnsgd: an experiment runner for label-noise SGD and the flat minima it prefers.

Public API (imported lazily so that ``import lnsgd`` stays light):

- ``lnsgd.load_checkpoint(path) -> (model, recipe)``
- ``lnsgd.load_recipe(path, overrides=()) -> Recipe``
- ``lnsgd.data.load(recipe) -> Data`` (train/test tensors)
- ``lnsgd.curvature``: Hessian-vector products and sharpness estimators
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_checkpoint":
        from lnsgd.checkpoint import load_checkpoint

        return load_checkpoint
    if name == "load_recipe":
        from lnsgd.recipe import load_recipe

        return load_recipe
    raise AttributeError(f"module 'lnsgd' has no attribute {name!r}")
