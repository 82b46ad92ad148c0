"""kscope, the Knowledge Microscope: where does a language model keep a fact, and how to remove it.

The public API is re-exported here (imported on first use, so ``import kscope`` stays light)::

    from kscope import load_model, FactConfig, prepare_facts, neuron_units, load_sae, feature_units
    from kscope import AttributionConfig, attribute_fact, DeltaProbConfig, fact_delta_prob
    from kscope import forget  # erase records from a model you own: forget(model, records, out, keep=...)
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# Before torch loads MKL: matrix products whose digits do not depend on the thread count (kscope.numerics).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.2.0"

_API = {
    "KscopeError": "kscope.errors",
    "ModelConfig": "kscope.model.loading", "load_model": "kscope.model.loading", "wrap": "kscope.model.loading",
    "Site": "kscope.model.sites", "hooked": "kscope.model.hooks",
    "Fact": "kscope.facts", "FactConfig": "kscope.facts", "prepare_facts": "kscope.facts", "load_facts": "kscope.facts",
    "Units": "kscope.units.base", "NeuronUnits": "kscope.units.base", "FeatureUnits": "kscope.units.base",
    "suppress": "kscope.units.base", "enhance": "kscope.units.base",
    "neuron_units": "kscope.units.provision", "load_sae": "kscope.units.sae", "feature_units": "kscope.units.sae",
    "TrainSAEConfig": "kscope.units.training",
    "AttributionConfig": "kscope.locate.attribution", "attribute_fact": "kscope.locate.attribution",
    "DeltaProbConfig": "kscope.locate.delta_prob", "fact_delta_prob": "kscope.locate.delta_prob",
    "CompareConfig": "kscope.locate.compare", "LocateConfig": "kscope.locate.compare", "run_study": "kscope.locate.compare",
    "forget": "kscope.privacy.forget.run", "ForgetConfig": "kscope.privacy.forget.run", "ForgetResult": "kscope.privacy.forget.audit",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'kscope' has no attribute {name!r}")
