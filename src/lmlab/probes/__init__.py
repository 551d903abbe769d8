"""Linear probes over (label, layer, lag) on annotated reasoning chains.

Lag convention (stated once, used everywhere): a probe for lag ``k`` reads the residual
activation at token ``t`` and predicts the label of token ``t + k``. Positive lags look
ahead (does layer L already "know" a backtrack is coming?), negative lags look back.
Only pairs where both ``t`` and ``t + k`` are chain tokens count; prompt tokens never
enter training or evaluation.
"""
