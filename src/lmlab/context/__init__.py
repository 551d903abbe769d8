"""Long-context degradation: needle in a haystack, LongMemEval focused vs full, repeated words.

Layout: ``rows`` (the resumable row store keyed by cell id), ``engine`` (send only
unfinished cells, score, judge, write rows), ``scoring`` (whole-word answer matching),
one module per task (``niah`` with ``haystack``, ``longmemeval``, ``repeated_words``),
each with loaders that report what they read, and ``family`` (the sweep plug-in). The
chat clients, call accounting and the judge live in :mod:`lmlab.llm`.
"""
