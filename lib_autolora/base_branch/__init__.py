"""Base-branch strategies: evaluate the model with every guided LoRA removed."""
from .batching import batch_size, cat_batches, split_batch
from .hooks import BatchLayoutError, DeltaHooks
from .strategies import BatchedStrategy, SequentialStrategy, Strategy, StrategyUnavailable, SwapStrategy
from .dual import DualStrategy
from .registry import STRATEGIES, make_strategy
from .auto import choose_strategy

__all__ = ["batch_size", "cat_batches", "split_batch", "BatchLayoutError", "DeltaHooks", "BatchedStrategy",
           "SequentialStrategy", "Strategy", "StrategyUnavailable", "SwapStrategy", "DualStrategy",
           "STRATEGIES", "make_strategy", "choose_strategy"]
