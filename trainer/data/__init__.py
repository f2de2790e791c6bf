"""Instruction data: sources, chat templates, mixtures, tokenized once per fingerprint and cached.

Plan time (torch-free): trainer.data.spec.data_spec(cfg) -> the JSON-able spec in the plan's `data` key.
Run time: trainer.data.prepare.training_data(spec, tokenizer, rank, world_size) -> (train, eval, collator).
This module stays light: it imports neither torch nor datasets.
"""

from trainer.data.examples import IGNORE_INDEX, Example, ExampleDataset, PadCollator
from trainer.data.records import alpaca_turns, read_records, sharegpt_turns

__all__ = ["IGNORE_INDEX", "Example", "ExampleDataset", "PadCollator", "alpaca_turns", "read_records",
           "sharegpt_turns"]
