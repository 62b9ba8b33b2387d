"""The activation store (zarr v3): its format, reading it, writing it (alone or from several ranks).

format.py      the only code that knows the layout, attributes, manifest and progress records
reader.py      ActivationStore: a finished store, checked when opened
writer.py      StoreWriter and its lifecycle: stage, write shards, resume, finalize, commit
ranks.py       several processes writing one store
background.py  writing shards on a thread while the model computes
"""

from pipeline.store.reader import ActivationStore

__all__ = ["ActivationStore"]
