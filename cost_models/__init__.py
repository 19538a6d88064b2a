"""cost_models: predict time and memory of layers, collectives and transfers.

Knows nothing of the planner's solver or of codegen: it is handed layer statistics and
device/cluster facts, and returns seconds and bytes.
"""
