"""Helpers shared by the tests (on sys.path through pyproject's `pythonpath = ["tests"]`).

They live here, not in test_*.py files, so pytest never collects them and no test module imports
another: `support.server` (server fixtures, SDK datums), `support.fake_engine` (the EngineAPI
stand-in), `support.raw_http` (byte-level hostile clients), `support.rebn` (trainer interrupts),
`support.import_graph` (the import graph of src/).
"""
