"""``serve.py``: the model behind an HTTP endpoint (LitServe) and a page to drop a film on.

``uploads`` turns an HTTP upload into one JSON payload (in the API server process), ``api`` decodes,
batches and scores the payloads (in the inference worker) with the same steps as ``predict.py``, and
``server`` puts both into a ``LitServer`` with the page. Needs the ``serve`` extra.
"""
