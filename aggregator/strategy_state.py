"""A strategy's state in the aggregator's database: named arrays in an npz archive, read with allow_pickle=False.

A newer version reads it without running any code stored in it: the strategy is rebuilt from the run
config and gets its arrays back (`Strategy.state` / `restore`). The blob names its format and strategy, so a
database is never read as a run of another kind.

Databases of versions before issue 25 hold the strategy pickled whole; `load_pickled_before_issue_25` reads
those (the operator's own file, which those versions unpickled at every merge), and the coordinator stores
the strategy as arrays from then on.
"""

from __future__ import annotations

import io
import logging
import pickle
import zipfile

import numpy as np

from fedbpt_wire.federation import RunConfig

from .strategies import FedAvgZStrategy, Strategy, strategy_class

log = logging.getLogger(__name__)

FORMAT = 1
_NPZ_MAGIC = b"PK"  # a zip archive, which np.savez writes
_PICKLE_MAGIC = b"\x80"  # pickle protocols 2 and up


def dump_strategy(strategy: Strategy, config: RunConfig) -> bytes:
    """The strategy's state as an npz archive (what `np.savez` writes, with fixed entry dates: the same state
    gives the same bytes)."""
    meta = {"format": np.asarray(FORMAT, dtype=np.int64), "strategy": np.asarray(config.strategy, dtype=np.str_)}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, array in (meta | strategy.state()).items():
            with archive.open(zipfile.ZipInfo(name + ".npy"), "w") as entry:
                np.lib.format.write_array(entry, array, allow_pickle=False)
    return out.getvalue()


def load_strategy(blob: bytes, config: RunConfig) -> Strategy:
    """The strategy `dump_strategy` stored (or an older version pickled) for the run `config` describes."""
    if blob.startswith(_PICKLE_MAGIC):
        return load_pickled_before_issue_25(blob)
    if not blob.startswith(_NPZ_MAGIC):
        raise ValueError("strategy state: neither the npz format nor a pickle of an older version")
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    if int(arrays.pop("format")) != FORMAT:
        raise ValueError("strategy state: format newer than this version reads; run the version that wrote it")
    stored = str(arrays.pop("strategy"))
    if stored != config.strategy:
        raise ValueError(f"strategy state: of a {stored!r} run, the run's config says {config.strategy!r}")
    strategy = strategy_class(config)(config, popsize=int(arrays["popsize"]))
    strategy.restore(arrays)
    return strategy


def load_pickled_before_issue_25(blob: bytes) -> Strategy:
    """A strategy an aggregator before issue 25 pickled, with the attributes later versions added."""
    log.warning("the database holds the strategy pickled by an older version: it is stored as arrays from now on")
    strategy = pickle.loads(blob)
    if not hasattr(strategy, "popsize"):
        strategy.popsize = strategy.es.opts["popsize"] if hasattr(strategy, "es") else 1
    if isinstance(strategy, FedAvgZStrategy) and not hasattr(strategy, "robust"):
        strategy.robust = "none"  # pickled before robust merging existed: it merged by weights
    return strategy
