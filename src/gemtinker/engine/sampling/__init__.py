"""Sampling: the scheduler that batches `Engine.sample` calls, and the pieces it runs.

Nothing is re-exported here; import from the module that owns a name (the engine imports
`scheduler.SamplingScheduler`).
"""
