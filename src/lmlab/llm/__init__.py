"""Chat models behind one interface, shared by every family.

``clients``: the local model or any LiteLLM model (limiter, retries, budget);
``accounting``: tokens, latency and cost of every call and where the cost came from;
``judge``: an LLM judge with a structured verdict.
"""
