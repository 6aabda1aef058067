"""The YAML recipes shipped with the package, found by name: `recipe_path("tiny")`, `load_recipe("oracle")`.

They are found where `load_config` resolves `--config NAME`, in `genpt_dist.config.loading` (whose docstring
says where a wheel and a source tree keep them); this module names them for the callers that ask for
recipes rather than configs.
"""

from __future__ import annotations

from genpt_dist.config.loading import load_recipe, recipe_names, recipe_path

__all__ = ["load_recipe", "recipe_names", "recipe_path"]
