"""Long-context degradation: needle in a haystack, LongMemEval focused vs full, repeated words.

Layout: ``clients`` (local model or any LiteLLM model behind one interface, with call
accounting, limits and retries), ``rows`` (the resumable row store keyed by cell id),
``engine`` (send only unfinished cells, score, judge, write rows), one module per task
(``niah``, ``longmemeval``, ``repeated_words``) and ``family`` (the sweep plug-in).
"""
