"""Language models as batched next-token distributions with per-token statistics.

* :mod:`egps_ppl.models.base`: the protocol (``extend`` / ``score``, batched, with costs) and the token policy;
* :mod:`egps_ppl.models.hf`: any transformers causal LM (local folder, GGUF file, hub id) with a KV slot pool;
* :mod:`egps_ppl.models.markov` and :mod:`egps_ppl.models.exact`: an exact tabular Markov LM and the exact
  dynamic programme for π (normaliser, sampler, marginals);
* :mod:`egps_ppl.models.testbeds`: random and sparse-decision Markov models;
* :mod:`egps_ppl.models.registry`: ``load_model`` by name, path, hub id or ``markov:PATH.json``.
"""
