"""Reproduce the papers' CIFAR-10 tables: train backdoored subjects the way the papers did (cached),
run ANP or PBE with the papers' settings, and write ACC / ASR before and after, mean ± std over
seeds, beside the papers' own values (``fastpurify reproduce anp|pbe``)."""

from .config import DEFENSES, ReproduceConfig, TrainRecipe, default_recipe, paper_config
from .run import reproduce

__all__ = ["DEFENSES", "ReproduceConfig", "TrainRecipe", "default_recipe", "paper_config", "reproduce"]
